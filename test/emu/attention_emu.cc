// Runs the paged fp16/bf16 attention launchers (csrc/kernels/attention: append, the split-KV decode
// kernels and their in-kernel merge, the tensor-core decode, prefill) in the emulator against the CPU
// ops of the same signature (csrc/cpu/attention.cc): append byte for byte, attention to 2e-3 (fp16) /
// 1e-2 (bf16) relative error. The .cu files are compiled as their own translation units with
// cuda_emu.h in front (test/emu_build.ts). Prints one line per case and "emu: N passed, M failed".
#include "emu_main.h"

#include <numeric>

#include "cpu/attention.h"
#include "kernels/attention/attention.h"

using emu::host;
using emu::ints;
using emu::report;
using sqz::DType;
using sqz::Tensor;

// Sequences of `lens` tokens in shuffled pages of page_size tokens, filled by a first append (each
// sequence's tokens but its last `rows`), then the last `rows` of each are appended by the CPU op and by
// the CUDA launcher (same bytes), and attended from: q rows per sequence = rows (decode for rows <= 4).
// nan_pages: the pages start as NaN instead of random values, so a kernel that lets a slot no sequence
// wrote reach its sums (a tile's rows past the end of a sequence) fails.
static void attention_case(int Hq, int Hkv, int D, std::vector<int> lens, int rows, DType dt, unsigned seed,
                           int page_size = 16, bool nan_pages = false) {
  std::mt19937 r(seed);
  std::string name = "attention " + std::to_string(Hq) + "q/" + std::to_string(Hkv) + "kv D " + std::to_string(D) +
                     (dt == DType::F16 ? " f16" : " bf16") + " rows " + std::to_string(rows) + " L";
  for (int l : lens) name += " " + std::to_string(l);
  if (page_size != 16) name += " page " + std::to_string(page_size);
  if (nan_pages) name += " nan pages";
  try {
    const int B = (int)lens.size();
    int maxp = 0;
    for (int l : lens) maxp = std::max(maxp, (l + page_size - 1) / page_size);
    const int pages = B * maxp + 1;
    Tensor kc = host(dt, {pages, page_size, Hkv, D}), vc = host(dt, {pages, page_size, Hkv, D});
    emu::randomize(kc, r), emu::randomize(vc, r);  // earlier tokens: whatever the pages hold
    std::vector<int32_t> perm(pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), r);
    Tensor pt = ints(std::vector<int32_t>(perm.begin(), perm.begin() + B * maxp), {B, maxp});
    if (nan_pages) {  // every slot past a sequence's length (and the spare page) holds NaN in f16 and bf16
      const int64_t slot_elems = (int64_t)Hkv * D;
      auto poison = [&](int page, int slot) {
        for (Tensor* t : {&kc, &vc}) {
          auto* h = static_cast<uint16_t*>(t->data()) + ((int64_t)page * page_size + slot) * slot_elems;
          std::fill(h, h + slot_elems, (uint16_t)0x7fff);
        }
      };
      for (int b = 0; b < B; ++b)
        for (int t = lens[b]; t < maxp * page_size; ++t) poison(perm[b * maxp + t / page_size], t % page_size);
      for (int slot = 0; slot < page_size; ++slot) poison(perm[B * maxp], slot);
    }
    std::vector<int32_t> cu{0};
    for (int b = 0; b < B; ++b) cu.push_back(cu.back() + std::min(rows, lens[b]));
    const int N = cu.back();
    Tensor lt = ints(std::vector<int32_t>(lens.begin(), lens.end()), {B}), cut = ints(cu, {B + 1});
    Tensor k = host(dt, {N, Hkv * D}), v = host(dt, {N, Hkv * D});
    emu::randomize(k, r), emu::randomize(v, r);
    Tensor kg = host(dt, {pages, page_size, Hkv, D}), vg = host(dt, {pages, page_size, Hkv, D});
    std::memcpy(kg.data(), kc.data(), (size_t)kc.numel() * sqz::dtype_size(dt));
    std::memcpy(vg.data(), vc.data(), (size_t)vc.numel() * sqz::dtype_size(dt));
    sqz::cpu::kv_append(kc, vc, k, v, pt, lt, cut);
    sqz::cuda::kv_append(kg, vg, k, v, pt, lt, cut, nullptr);
    const bool same = std::memcmp(kg.data(), kc.data(), (size_t)kc.numel() * sqz::dtype_size(dt)) == 0 &&
                      std::memcmp(vg.data(), vc.data(), (size_t)vc.numel() * sqz::dtype_size(dt)) == 0;
    report(name + " append", same, same ? "same bytes" : "differs");

    Tensor q = host(dt, {N, Hq, D});
    emu::randomize(q, r);
    const float scale = 1.f / std::sqrt((float)D);
    Tensor want = host(dt, {N, Hq, D}), got = host(dt, {N, Hq, D});
    emu::fill_bytes(got, 0xff);
    sqz::cpu::attention(want, q, kc, vc, pt, lt, cut, scale);
    const int maxlen = *std::max_element(lens.begin(), lens.end());
    const int64_t wf = sqz::cuda::attention_workspace_floats(0, B, Hq, Hkv, D, rows, maxlen);
    std::vector<float> ws((size_t)std::max<int64_t>(wf, 1), NAN);
    sqz::cuda::attention(got, q, kc, vc, pt, lt, cut, scale, rows, maxlen, ws.data(), wf, 0, nullptr);
    const double e = emu::rel_err(got, want), tol = dt == DType::F16 ? 2e-3 : 1e-2;
    char buf[80];
    std::snprintf(buf, sizeof buf, "%s, rel err %.3g (tol %.0e)",
                  sqz::cuda::attention_uses_decode(Hq, Hkv, D, rows) ? "decode" : "prefill", e, tol);
    report(name, e <= tol, buf);
  } catch (const std::exception& ex) {
    report(name, false, std::string("threw: ") + ex.what());
  }
}

int main(int argc, char** argv) {
  const unsigned seed = emu::seed_of(argc, argv);
  unsigned s = seed;
  attention_case(8, 2, 64, {1, 37, 300}, 1, DType::F16, s++);
  attention_case(4, 4, 128, {70, 129}, 1, DType::BF16, s++);
  attention_case(12, 3, 96, {45}, 1, DType::F16, s++);
  attention_case(8, 1, 128, {200, 17}, 3, DType::F16, s++);
  attention_case(4, 2, 64, {40, 90}, 40, DType::F16, s++);
  attention_case(8, 2, 128, {33}, 33, DType::BF16, s++);
  // 4 query heads per kv head over short splits: the tensor-core kernel's 4-warp deep-ring shape
  attention_case(8, 2, 128, {300, 40}, 1, DType::F16, s++);
  attention_case(6, 2, 128, {300, 41}, 1, DType::BF16, s++, 24);  // and its per-token page lookups
  // head_dim 64 and 128 with pages of whole tiles take the TMA kernels (this program is built as for
  // sm_90a); the same cases through the cp.async kernels
  setenv("SQUEEZELM_ATTN_TMA", "0", 1);
  attention_case(8, 2, 64, {1, 37, 300}, 1, DType::F16, s++);
  attention_case(8, 1, 128, {200, 17}, 3, DType::BF16, s++);
  attention_case(8, 2, 128, {300, 40}, 1, DType::F16, s++);
  unsetenv("SQUEEZELM_ATTN_TMA");
  // TMA with sequences ending inside a tile (NaN in the rest of the page), pages of 32 and 64 tokens,
  // 8 query heads per kv head
  attention_case(16, 2, 128, {2000, 45, 16}, 1, DType::F16, s++, 32, true);
  attention_case(16, 2, 64, {777, 3}, 2, DType::BF16, s++, 64, true);
  // more than 32 splits (132 emulated SMs): the last block's merge past the (max, sum) pairs and the
  // partials it requests first, in the tensor-core (63 splits) and the CUDA-core kernel (47)
  attention_case(8, 1, 128, {4000}, 1, DType::F16, s++);
  attention_case(4, 4, 128, {3000}, 1, DType::BF16, s++);
  return emu::finish();
}
