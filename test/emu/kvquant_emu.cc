// Runs the KVQuant CUDA launchers (csrc/kernels/kvquant/kvquant.cu, whole: planning, the three
// attention kernels, the split combine, quantize-and-append, dequantize) in the emulator
// (cuda_emu.h; shim/ supplies ptx.cuh and pdl.cuh) against the CPU ops of the same signature
// (csrc/cpu/kvquant.cc): append and dequantize byte for byte, attention to 2e-3 (fp16) / 1e-2
// (bf16) relative error. Prints one line per case and "emu: N passed, M failed".
#include "emu_main.h"

#include <numeric>

// As an sm_90a build: the emulated device is compute capability 9.0, so the attention launcher takes its
// TMA kernel where a GPU build for 90a would.
#define SQUEEZELM_CUDA_ARCHS_STR "90a"
#include "cpu/kvquant.h"
#include "kernels/kvquant/kvquant.cu"

using emu::fill_bytes;
using emu::host;
using emu::ints;
using emu::report;
using sqz::DType;
using sqz::Tensor;

static long first_diff(const Tensor& a, const Tensor& b) {
  const size_t n = emu::nbytes(a);
  const uint8_t *x = static_cast<const uint8_t*>(a.data()), *y = static_cast<const uint8_t*>(b.data());
  for (size_t i = 0; i < n; ++i)
    if (x[i] != y[i]) return (long)i;
  return -1;
}
static std::vector<float> codebook(int bits, std::mt19937& r) {
  const int n = 1 << bits;
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  std::vector<float> cb(n);
  for (int i = 0; i < n; ++i) cb[i] = -1.f + 2.f * i / (n - 1) + (i > 0 && i < n - 1 ? u(r) * 0.5f / n : 0.f);
  std::sort(cb.begin(), cb.end());
  return cb;
}

struct Setup {
  sqz::kvq::Cache cache;
  sqz::kvq::Calib cal;
  Tensor page_table, seq_lens, cu_q;
};

// A cache of `lens` tokens per sequence in shuffled pages of 16, all tokens appended in one call
// from rows of `dt` (what the CPU op and the CUDA launcher each write into their own copy).
static Setup make_setup(int H, int D, int bits, int nk, int nv, int sink, const std::vector<int>& lens, std::mt19937& r) {
  Setup s;
  const int B = (int)lens.size(), P = 16;
  int maxp = 0;
  for (int l : lens) maxp = std::max(maxp, (l + P - 1) / P);
  const int pages = B * maxp + 1;
  auto& c = s.cache;
  c.bits = bits, c.nk = nk, c.nv = nv, c.sink = sink, c.kv_heads = H, c.head_dim = D, c.page_size = P;
  c.k_codes = host(DType::U8, {pages, P, H, sqz::kvq::code_bytes(D, bits)});
  c.v_codes = host(DType::U8, {pages, P, H, sqz::kvq::code_bytes(D, bits)});
  c.meta = host(DType::U8, {pages, P, H, sqz::kvq::meta_bytes(nk, nv)});
  c.sink_k = host(DType::F16, {B, std::max(sink, 1), H, D});
  c.sink_v = host(DType::F16, {B, std::max(sink, 1), H, D});
  for (auto* t : {&c.k_codes, &c.v_codes, &c.meta, &c.sink_k, &c.sink_v}) fill_bytes(*t, 0);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> lo(H * D), hi(H * D);
  for (int i = 0; i < H * D; ++i) {
    const float off = (u(r) - 0.5f) * 2.f;
    lo[i] = off - 1.5f - u(r);
    hi[i] = off + 1.5f + u(r);
  }
  auto vec = [](const std::vector<float>& v) {
    Tensor t = host(DType::F32, {(int64_t)v.size()});
    std::memcpy(t.data(), v.data(), v.size() * 4);
    return t;
  };
  s.cal.key_lo = vec(lo), s.cal.key_hi = vec(hi), s.cal.key_cb = vec(codebook(bits, r)), s.cal.val_cb = vec(codebook(bits, r));
  std::vector<int32_t> perm(pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), r);
  s.page_table = ints(std::vector<int32_t>(perm.begin(), perm.begin() + B * maxp), {B, maxp});
  std::vector<int32_t> cu{0};
  for (int l : lens) cu.push_back(cu.back() + l);
  s.seq_lens = ints(std::vector<int32_t>(lens.begin(), lens.end()), {B});
  s.cu_q = ints(cu, {B + 1});
  return s;
}

static Setup copy_of(const Setup& s) {
  Setup o = s;
  for (auto* t : {&o.cache.k_codes, &o.cache.v_codes, &o.cache.meta, &o.cache.sink_k, &o.cache.sink_v}) {
    Tensor n = host(t->dtype, t->shape);
    fill_bytes(n, 0);
    *t = n;
  }
  return o;
}

static void kvq_case(int Hq, int H, int D, std::vector<int> lens, int bits, DType dt, int sink, int nk, int nv,
                     std::initializer_list<int> variants, unsigned seed) {
  std::mt19937 r(seed);
  char name[200];
  std::snprintf(name, sizeof name, "kvq Hq %d H %d D %d %d-bit %s sink %d slots %d+%d L", Hq, H, D, bits,
                dt == DType::F16 ? "f16" : "bf16", sink, nk, nv);
  std::string nm = name;
  for (int l : lens) nm += " " + std::to_string(l);
  const int B = (int)lens.size();
  const int total = std::accumulate(lens.begin(), lens.end(), 0);
  Setup c = make_setup(H, D, bits, nk, nv, sink, lens, r);
  Setup g = copy_of(c);
  Tensor k = host(dt, {total, H * D}), v = host(dt, {total, H * D});
  emu::randomize(k, r, 1.f, 3.f, 37);
  emu::randomize(v, r, 1.f, 8.f, 53);
  try {
    sqz::cpu::kvq_append(c.cache, c.cal, k, v, c.page_table, c.seq_lens, c.cu_q);
    sqz::cuda::kvq_append(g.cache, g.cal, k, v, g.page_table, g.seq_lens, g.cu_q, nullptr);
    long d = -1;
    const char* which = "";
    const std::pair<const Tensor*, const Tensor*> parts[] = {{&g.cache.k_codes, &c.cache.k_codes}, {&g.cache.v_codes, &c.cache.v_codes},
                                                             {&g.cache.meta, &c.cache.meta}, {&g.cache.sink_k, &c.cache.sink_k},
                                                             {&g.cache.sink_v, &c.cache.sink_v}};
    const char* names[] = {"kCodes", "vCodes", "meta", "sinkK", "sinkV"};
    for (int i = 0; i < 5 && d < 0; ++i) {
      d = first_diff(*parts[i].first, *parts[i].second);
      which = names[i];
    }
    report(nm + " append", d < 0, d < 0 ? "same bytes" : std::string(which) + " differs at byte " + std::to_string(d));
    // Slots past each sequence's length (and the spare page) now hold 0xff bytes in both caches (codes
    // 2^b - 1, NaN fp16 metadata): a kernel that lets them reach its sums (the TMA kernel reads whole
    // 16-token tiles) fails.
    {
      const int P = (int)c.cache.page_size, pages = (int)c.cache.k_codes.dim(0), maxp = (int)c.page_table.dim(1);
      std::vector<bool> used(pages, false);
      const int32_t* pt = c.page_table.ptr<int32_t>();
      auto poison = [&](int page, int slot) {
        for (Setup* s : {&c, &g})
          for (Tensor* t : {&s->cache.k_codes, &s->cache.v_codes, &s->cache.meta}) {
            const int64_t row = t->numel() / ((int64_t)pages * P);
            std::memset(static_cast<uint8_t*>(t->data()) + ((int64_t)page * P + slot) * row, 0xff, row);
          }
      };
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < maxp * P; ++t) {
          const int page = pt[b * maxp + t / P];
          if (page < 0 || page >= pages) continue;
          if (t < lens[b]) used[page] = true;
          else poison(page, t % P);
        }
      for (int page = 0; page < pages; ++page)
        if (!used[page])
          for (int slot = 0; slot < P; ++slot) poison(page, slot);
    }

    // dequantize of the last sequence
    const int L = lens.back();
    Tensor kc = host(DType::F16, {L, H, D}), vc = host(DType::F16, {L, H, D}), kg = host(DType::F16, {L, H, D}),
           vg = host(DType::F16, {L, H, D});
    fill_bytes(kg, 0x7e), fill_bytes(vg, 0x7e);
    sqz::cpu::kvq_dequantize(kc, vc, c.cache, c.cal, c.page_table, B - 1, B - 1);
    sqz::cuda::kvq_dequantize(kg, vg, c.cache, c.cal, c.page_table, B - 1, B - 1, nullptr);
    const bool same = first_diff(kg, kc) < 0 && first_diff(vg, vc) < 0;
    report(nm + " dequantize", same, same ? "same bytes" : "differs");

    // one decode row per sequence over its whole length
    std::vector<int32_t> cu1(B + 1);
    std::iota(cu1.begin(), cu1.end(), 0);
    Tensor cu_rows = ints(cu1, {B + 1});
    Tensor q = host(dt, {B, Hq, D});
    emu::randomize(q, r);
    std::vector<float> inv(D / 2);
    for (int i = 0; i < D / 2; ++i) inv[i] = (float)std::pow(500000.0, -2.0 * i / D);
    Tensor invt = host(DType::F32, {D / 2});
    std::memcpy(invt.data(), inv.data(), inv.size() * 4);
    const float scale = 1.f / std::sqrt((float)D);
    Tensor want = host(dt, {B, Hq, D});
    sqz::cpu::kvq_attention(want, q, c.cache, c.cal, c.page_table, c.seq_lens, cu_rows, invt, scale);
    const int maxlen = *std::max_element(lens.begin(), lens.end());
    const int64_t wf = sqz::cuda::kvq_attention_workspace_floats(0, B, Hq, H, D, maxlen);
    std::vector<float> work(wf, NAN);
    const double tol = dt == DType::F16 ? 2e-3 : 1e-2;
    for (int variant : variants)
      for (int copies : {1, 0}) {  // variant 0 also with the cp.async copies instead of TMA
        if (copies == 0 && variant != 0) continue;
        if (copies == 0) setenv("SQUEEZELM_KVQ_TMA", "0", 1);
        Tensor got = host(dt, {B, Hq, D});
        fill_bytes(got, 0xff);  // NaN
        sqz::cuda::kvq_attention(got, q, c.cache, c.cal, c.page_table, c.seq_lens, cu_rows, invt, scale, 1, maxlen,
                                 work.data(), wf, variant, nullptr);
        unsetenv("SQUEEZELM_KVQ_TMA");
        const double e = emu::rel_err(got, want);
        char buf[80];
        std::snprintf(buf, sizeof buf, "rel err %.3g (tol %.0e)", e, tol);
        report(nm + " attention variant " + std::to_string(variant) + (copies == 0 ? " (cp.async)" : ""), e <= tol, buf);
      }
  } catch (const std::exception& e) {
    report(nm, false, std::string("threw: ") + e.what());
  }
}

// Decode rows appended from packed q|k|v rows (the decoder's path): q rotated into q_out, keys
// and values quantized behind earlier tokens, sink rows in reverse order.
static void rope_append_case(int Hq, int H, int D, std::vector<int> rows, int bits, unsigned seed) {
  std::mt19937 r(seed);
  std::string nm = "kvqRopeAppend Hq " + std::to_string(Hq) + " H " + std::to_string(H) + " D " + std::to_string(D) + " " +
                   std::to_string(bits) + "-bit rows";
  for (int n : rows) nm += " " + std::to_string(n);
  const int B = (int)rows.size(), N = std::accumulate(rows.begin(), rows.end(), 0), P = 16, maxp = 4, pages = B * maxp;
  std::vector<int32_t> lens(B), cu{0}, pos(N), pt(B * maxp), sink_rows(B);
  for (int b = 0; b < B; ++b) {
    lens[b] = (int)(r() % 40) + rows[b];
    cu.push_back(cu.back() + rows[b]);
    for (int j = 0; j < rows[b]; ++j) pos[cu[b] + j] = lens[b] - rows[b] + j;
    sink_rows[b] = B - 1 - b;
  }
  for (int i = 0; i < B * maxp; ++i) pt[i] = (i * 7 + 3) % pages;
  Setup c = make_setup(H, D, bits, 2, 1, 2, std::vector<int>(B, 1), r);
  c.page_table = ints(pt, {B, maxp});
  c.seq_lens = ints(lens, {B});
  c.cu_q = ints(cu, {B + 1});
  auto& k = c.cache;
  k.k_codes = host(DType::U8, {pages, P, H, sqz::kvq::code_bytes(D, bits)});
  k.v_codes = host(DType::U8, {pages, P, H, sqz::kvq::code_bytes(D, bits)});
  k.meta = host(DType::U8, {pages, P, H, sqz::kvq::meta_bytes(2, 1)});
  k.sink_rows = ints(sink_rows, {B});
  Setup g = copy_of(c);
  for (Setup* s : {&c, &g})
    for (auto* t : {&s->cache.k_codes, &s->cache.v_codes, &s->cache.meta, &s->cache.sink_k, &s->cache.sink_v}) fill_bytes(*t, 0xa5);
  Tensor qkv = host(DType::F16, {N, (Hq + 2 * H) * D});
  emu::randomize(qkv, r);
  std::vector<float> inv(D / 2);
  for (int i = 0; i < D / 2; ++i) inv[i] = (float)std::pow(10000.0, -2.0 * i / D);
  Tensor invt = host(DType::F32, {D / 2});
  std::memcpy(invt.data(), inv.data(), inv.size() * 4);
  Tensor positions = ints(pos, {N});
  Tensor qc = host(DType::F16, {N, Hq, D}), qg = host(DType::F16, {N, Hq, D});
  fill_bytes(qc, 0x7e), fill_bytes(qg, 0x7e);
  try {
    sqz::cpu::kvq_rope_append(&qc, c.cache, c.cal, qkv, positions, invt, c.page_table, c.seq_lens, c.cu_q, false);
    sqz::cuda::kvq_rope_append(&qg, g.cache, g.cal, qkv, positions, invt, g.page_table, g.seq_lens, g.cu_q, false, nullptr);
    const double e = emu::rel_err(qg, qc);
    long d = -1;
    const std::pair<const Tensor*, const Tensor*> parts[] = {{&g.cache.k_codes, &c.cache.k_codes}, {&g.cache.v_codes, &c.cache.v_codes},
                                                             {&g.cache.meta, &c.cache.meta}, {&g.cache.sink_k, &c.cache.sink_k},
                                                             {&g.cache.sink_v, &c.cache.sink_v}};
    for (int i = 0; i < 5 && d < 0; ++i) d = first_diff(*parts[i].first, *parts[i].second);
    char buf[120];
    std::snprintf(buf, sizeof buf, "q rel err %.3g (tol 1e-3), cache %s", e, d < 0 ? "same bytes" : "differs");
    report(nm, e <= 1e-3 && d < 0, buf);
  } catch (const std::exception& ex) {
    report(nm, false, std::string("threw: ") + ex.what());
  }
}

int main(int argc, char** argv) {
  const unsigned seed = emu::seed_of(argc, argv);
  // variant 0: the rotation-plane kernel where it covers the shape (head_dim 64/96/128, <= 8 query
  // heads per kv head), else the earlier tensor-core kernel, else the flash kernel; 1: the flash
  // kernel; 2: the earlier tensor-core kernel
  kvq_case(4, 4, 64, {1, 17, 140}, 2, DType::F16, 3, 2, 2, {0, 1, 2}, seed);
  kvq_case(6, 2, 80, {33, 70}, 3, DType::F16, 3, 2, 2, {0}, seed + 1);
  kvq_case(12, 3, 96, {70}, 4, DType::BF16, 3, 2, 2, {0, 2}, seed + 2);
  kvq_case(8, 2, 128, {150, 5}, 3, DType::F16, 0, 2, 2, {0}, seed + 3);
  kvq_case(16, 2, 128, {90}, 4, DType::F16, 40, 4, 1, {0}, seed + 4);
  kvq_case(8, 2, 256, {45, 2}, 3, DType::BF16, 3, 2, 2, {0}, seed + 5);
  kvq_case(32, 1, 64, {60, 3}, 3, DType::F16, 3, 0, 0, {0}, seed + 6);
  rope_append_case(8, 2, 64, {5, 1, 9}, 4, seed + 7);
  rope_append_case(12, 3, 96, {6, 1}, 2, seed + 8);
  return emu::finish();
}
