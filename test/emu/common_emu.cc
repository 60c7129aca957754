// Runs the decode step's small CUDA ops (csrc/kernels/common: add, cast, silu_mul, gather_rows,
// fill_random, rms_norm, add_rms_norm, rope, rope_append, argmax, sample; each .cu file a translation
// unit of its own with cuda_emu.h in front) in the emulator against the CPU ops of the same signature
// (csrc/cpu/elementwise.cc, fused.cc) on fresh random inputs: integer results and caches byte for
// byte, floats to 5e-4 (fp16) / 4e-3 (bf16) / 1e-5 (f32) relative error. Prints "emu: N passed, M failed".
#include "emu_main.h"

#include <functional>

#include "cpu/elementwise.h"
#include "cpu/fused.h"
#include "kernels/common/common.h"
#include "kernels/common/fused.h"

using emu::copy;
using emu::host;
using emu::ints;
using emu::nbytes;
using emu::randomize;
using emu::report;
using sqz::DType;
using sqz::Tensor;

static const char* dname(DType dt) { return dt == DType::F16 ? "f16" : dt == DType::BF16 ? "bf16" : "f32"; }

// Runs `cpu` and `cuda` on their own copies of the outputs (poisoned where `fresh`), then compares.
static void check_float(const std::string& name, DType dt, const std::vector<Tensor>& outs, bool fresh,
                        const std::function<void(const std::vector<Tensor>&)>& cpu,
                        const std::function<void(const std::vector<Tensor>&)>& cuda) {
  try {
    std::vector<Tensor> a, b;
    for (const Tensor& t : outs) {
      a.push_back(copy(t));
      b.push_back(copy(t));
      if (fresh) emu::fill_bytes(b.back(), 0xff);  // NaN
    }
    cpu(a);
    cuda(b);
    // these ops round once (no long sums): CPU and CUDA agree to a fraction of the output's ulp
    const double tol = dt == DType::F16 ? 5e-4 : dt == DType::BF16 ? 4e-3 : 1e-5;
    double e = 0;
    for (size_t i = 0; i < a.size(); ++i)
      e = std::max(e, a[i].dtype == DType::I32 || a[i].dtype == DType::U32 || a[i].dtype == DType::U8
                          ? (std::memcmp(a[i].data(), b[i].data(), nbytes(a[i])) == 0 ? 0.0 : INFINITY)
                          : emu::rel_err(b[i], a[i]));
    char buf[80];
    std::snprintf(buf, sizeof buf, "rel err %.3g (tol %.0e)", e, tol);
    report(name + " " + dname(dt), e <= tol, buf);
  } catch (const std::exception& ex) {
    report(name, false, std::string("threw: ") + ex.what());
  }
}

int main(int argc, char** argv) {
  const unsigned seed = emu::seed_of(argc, argv);
  std::mt19937 r(seed);
  namespace C = sqz::cpu;
  namespace G = sqz::cuda;
  for (DType dt : {DType::F16, DType::BF16, DType::F32}) {
    const int M = 5, K = 200, N = 72;
    Tensor x = host(dt, {M, K}), y = host(dt, {M, K}), bias = host(dt, {K}), w = host(dt, {K}), out = host(dt, {M, K});
    randomize(x, r), randomize(y, r), randomize(bias, r), randomize(w, r, 0.3f);
    check_float("add", dt, {out}, true, [&](auto& o) { C::add(o[0], x, y); }, [&](auto& o) { G::add(o[0], x, y, nullptr); });
    check_float("add (bias row)", dt, {out}, true, [&](auto& o) { C::add(o[0], x, bias); },
                [&](auto& o) { G::add(o[0], x, bias, nullptr); });
    Tensor gu = host(dt, {M, 2 * N}), sm = host(dt, {M, N});
    randomize(gu, r, 2.f);
    check_float("silu_mul", dt, {sm}, true, [&](auto& o) { C::silu_mul(o[0], gu); }, [&](auto& o) { G::silu_mul(o[0], gu, nullptr); });
    Tensor c16 = host(dt == DType::F32 ? DType::F16 : DType::F32, {M, K});
    check_float("cast", dt, {c16}, true, [&](auto& o) { C::cast(o[0], x); }, [&](auto& o) { G::cast(o[0], x, nullptr); });
    Tensor idx = ints({3, 0, 4, 4, 1, 2, 0}, {7}), rows = host(dt, {7, K});
    check_float("gather_rows", dt, {rows}, true, [&](auto& o) { C::gather_rows(o[0], x, idx); },
                [&](auto& o) { G::gather_rows(o[0], x, idx, nullptr); });
    check_float("rms_norm", dt, {out}, true, [&](auto& o) { C::rms_norm(o[0], x, w, 1e-6f); },
                [&](auto& o) { G::rms_norm(o[0], x, w, 1e-6f, nullptr); });
    Tensor res = copy(y);
    check_float("add_rms_norm", dt, {res, out}, false, [&](auto& o) { C::add_rms_norm(o[0], x, o[1], w, 1e-5f); },
                [&](auto& o) { G::add_rms_norm(o[0], x, o[1], w, 1e-5f, nullptr); });
    Tensor fr = host(dt, {1000});
    check_float("fill_random", dt, {fr}, true, [&](auto& o) { C::fill_random(o[0], seed, 0.5f, 2.f); },
                [&](auto& o) { G::fill_random(o[0], seed, 0.5f, 2.f, nullptr); });
    // RoPE in place, and the fused RoPE + paged fp16 cache append
    const int T = 6, Hq = 4, Hkv = 2, D = 64;
    Tensor q = host(dt, {T, Hq, D}), inv = host(DType::F32, {D / 2});
    randomize(q, r);
    for (int i = 0; i < D / 2; ++i) inv.ptr<float>()[i] = (float)std::pow(10000.0, -2.0 * i / D);
    Tensor pos = ints({0, 7, 100, 3, 4095, 31}, {T});
    check_float("rope", dt, {q}, false, [&](auto& o) { C::rope(o[0], pos, inv); }, [&](auto& o) { G::rope(o[0], pos, inv, nullptr); });
    if (dt != DType::F32) {
      const int P = 16, pages = 6;
      Tensor qkv = host(dt, {T, (Hq + 2 * Hkv) * D}), qo = host(dt, {T, Hq, D}), kc = host(dt, {pages, P, Hkv, D}),
             vc = host(dt, {pages, P, Hkv, D});
      randomize(qkv, r), randomize(kc, r), randomize(vc, r);
      Tensor pt = ints({4, 1, 5, 0, 2, 3}, {2, 3}), lens = ints({40, 3}, {2}), cu = ints({0, 4, 6}, {3});
      Tensor p2 = ints({36, 37, 38, 39, 1, 2}, {T});
      check_float("rope_append", dt, {qo, kc, vc}, false, [&](auto& o) { C::rope_append(o[0], o[1], o[2], qkv, p2, inv, pt, lens, cu); },
                  [&](auto& o) { G::rope_append(o[0], o[1], o[2], qkv, p2, inv, pt, lens, cu, nullptr); });
    }
    // token choice: argmax, and sampling from (seed, counter) per row (counters advance alike)
    const int B = 4, V = 1000;
    Tensor logits = host(dt, {B, V}), tok = host(DType::I32, {B});
    randomize(logits, r, 3.f);
    check_float("argmax", dt, {tok}, true, [&](auto& o) { C::argmax(o[0], logits); }, [&](auto& o) { G::argmax(o[0], logits, nullptr); });
    Tensor temp = host(DType::F32, {B}), topk = ints({0, 5, 50, 1}, {B}), topp = host(DType::F32, {B}), rng = host(DType::U32, {B, 2});
    const float tv[B] = {1.f, 0.7f, 1.3f, 0.f}, pv[B] = {1.f, 0.9f, 0.5f, 1.f};
    for (int b = 0; b < B; ++b) {
      temp.ptr<float>()[b] = tv[b], topp.ptr<float>()[b] = pv[b];
      rng.ptr<uint32_t>()[2 * b] = r(), rng.ptr<uint32_t>()[2 * b + 1] = r() % 100;
    }
    check_float("sample", dt, {tok, rng}, false, [&](auto& o) { C::sample(o[0], logits, temp, topk, topp, o[1]); },
                [&](auto& o) { G::sample(o[0], logits, temp, topk, topp, o[1], nullptr); });
  }
  return emu::finish();
}
