// SqueezeLLM ops: lutRepack + lutMatmulPacked (dense-and-sparse LUT matmul), kmeansRows and
// gptqRefitRows (the quantizer).
#include <string>

#include "../cpu/gptq.h"
#include "../cpu/kmeans.h"
#include "../cpu/lut_gemm.h"
#include "linear_checks.h"
#include "op.h"

#ifdef SQUEEZELM_WITH_CUDA
#include "../kernels/lut_gemm/kmeans.h"
#include "../kernels/lut_gemm/lut_gemm.h"
#endif

namespace sqz::napi {

// lutRepack(dst i32[Np, Kp*bits/32], qweight i32[Kg*bits/32, N], bits): interchange -> packed
// layout (csrc/cpu/lut_gemm.h). Done once when weights are loaded.
SQZ_OP(lutRepack) {
  Args a(info, "lutRepack");
  Tensor d = a.tensor(0, "dst"), q = a.tensor(1, "qweight");
  const int64_t bits = a.integer(2, "bits");
  if (bits != 3 && bits != 4) a.error("ERR_UNSUPPORTED", "bits must be 3 or 4, got " + std::to_string(bits));
  a.ndim(q, "qweight", 2);
  a.dtype_in(q, "qweight", {DType::I32, DType::U32});
  a.dtype_in(d, "dst", {DType::I32, DType::U32});
  if (q.dim(0) % bits != 0) a.error("ERR_SHAPE", "qweight rows must be a multiple of bits");
  const cpu::LutPacked L((int)bits, q.dim(1), q.dim(0) / bits * 32);
  a.shape_is(d, "dst", {L.Np, L.words_per_row()});
  a.same_device({{&d, "dst"}, {&q, "qweight"}});
  if (q.numel() > INT32_MAX || d.numel() > INT32_MAX) a.error("ERR_SHAPE", "weight too large");
  const int b = (int)bits;
  dispatch(
      q.device, "lutRepack", [=] { cpu::lut_repack(d, q, b); },
      [&](int dev) { CUDA_ONLY(cuda::lut_repack(d, q, b, cuda_stream(dev))); });
  return a.env().Undefined();
}

// lutMatmulPacked(y, x[M,K], codes i32[Np, Kp*bits/32], lut[N, 2^bits], rows?, cols?, vals?, bits,
// pairHalf = 0, epilogue = 0, normWeight? [K], eps = 1e-6, nextCodes?) codes in the packed layout made by lutRepack,
// stored rows paired at pairHalf (cpu/lut_gemm.h; 0: not paired); y [M, N], or [M, N/2] for epilogue 1
// (SiLU pairs, pairHalf = N/2); epilogue 2 adds the product to y (the residual stream; y must not
// overlap x); normWeight: the RMSNorm of x in front; nextCodes: the packed codes (i32 2-D, x's device) of the
// weight whose launch follows, requested into L2 at the end (a hint acted on by the 4-bit CUDA decode GEMVs only). The outlier CSR's contents are checked on the host
// when the weights are loaded (ts/ops/lut.ts checkOutlierCsr); here only shapes and dtypes.
SQZ_OP(lutMatmulPacked) {
  Args a(info, "lutMatmulPacked");
  Tensor y = a.tensor(0, "y"), x = a.tensor(1, "x"), q = a.tensor(2, "codes"), lut = a.tensor(3, "lut");
  auto rows = a.opt_tensor(4, "rows"), cols = a.opt_tensor(5, "cols"), vals = a.opt_tensor(6, "vals");
  const int64_t bits = a.integer(7, "bits");
  const int64_t half = a.opt_integer(8, "pairHalf", 0), epilogue_arg = a.opt_integer(9, "epilogue", cpu::kLutStore);
  if (epilogue_arg != cpu::kLutStore && epilogue_arg != cpu::kLutSiluPairs && epilogue_arg != cpu::kLutResidual)
    a.error("ERR_ARG", "epilogue must be 0 (store), 1 (siluPairs) or 2 (residual), got " + std::to_string(epilogue_arg));
  const cpu::LutEpilogue epilogue = static_cast<cpu::LutEpilogue>(epilogue_arg);
  auto gamma = a.opt_tensor(10, "normWeight");
  const double eps = a.opt_number(11, "eps", 1e-6);
  auto next = a.opt_tensor(12, "nextCodes");
  if (next) {
    a.ndim(*next, "nextCodes", 2);
    a.dtype_in(*next, "nextCodes", {DType::I32});
    a.same_device({{&x, "x"}, {&*next, "nextCodes"}});
  }
  const int64_t N = check_lut_operands(a, x, q, lut, rows, cols, vals, bits, half), M = x.dim(0);
  check_lut_norm(a, x, gamma, eps);
  if (epilogue == cpu::kLutResidual && overlap(y, x)) a.error("ERR_ARG", "the residual epilogue's y must not overlap x");
  if (epilogue == cpu::kLutSiluPairs && 2 * half != N)
    a.error("ERR_ARG", "the siluPairs epilogue needs rows paired at half the rows (" + std::to_string(N / 2) + "), got " +
                           std::to_string(half));
  a.ndim(y, "y", 2);
  const int64_t ny = epilogue == cpu::kLutSiluPairs ? N / 2 : N;
  if (y.dim(1) != ny)
    a.error("ERR_SHAPE", "lut " + lut.shape_str() + " is a weight of " + std::to_string(N) + " rows, so y must have " +
                             std::to_string(ny) + " columns; y is " + y.shape_str());
  a.shape_is(y, "y", {M, ny});
  a.same_device({{&y, "y"}, {&x, "x"}});
  if (x.device.is_cuda()) a.same_dtype(y, "y", x, "x");
  else a.dtype_in(y, "y", {DType::F32, DType::F16, DType::BF16});
  const int b = (int)bits;
  const float e = (float)eps;
  dispatch(
      x.device, "lutMatmulPacked",
      [=] {
        cpu::lut_matmul_packed(y, x, q, lut, rows ? &*rows : nullptr, cols ? &*cols : nullptr, vals ? &*vals : nullptr, b,
                               (int)half, epilogue, gamma ? &*gamma : nullptr, e);
      },
      [&](int dev) {
        CUDA_ONLY(cuda::lut_matmul_packed(y, x, q, lut, rows ? &*rows : nullptr, cols ? &*cols : nullptr,
                                          vals ? &*vals : nullptr, b, (int)half, epilogue, gamma ? &*gamma : nullptr, e,
                                          next ? &*next : nullptr, cuda_stream(dev)));
      });
  return a.env().Undefined();
}

// kmeansRows(lut f32[N, 2^bits], codes u8[N,K], w[N,K], sens f32[N,K] | f32[K], iters)
SQZ_OP(kmeansRows) {
  Args a(info, "kmeansRows");
  Tensor lut = a.tensor(0, "lut"), codes = a.tensor(1, "codes"), w = a.tensor(2, "w"), s = a.tensor(3, "sens");
  const int64_t iters = a.integer(4, "iters");
  if (iters < 0 || iters > 10000) a.error("ERR_ARG", "iters must be in [0, 10000]");
  a.ndim(w, "w", 2);
  const int64_t N = w.dim(0), K = w.dim(1);
  a.dtype_in(w, "w", {DType::F32, DType::F16, DType::BF16});
  a.dtype_in(lut, "lut", {DType::F32});
  a.ndim(lut, "lut", 2);
  const int64_t E = lut.dim(1);
  if (E < 2 || E > 256 || (E & (E - 1)) != 0) a.error("ERR_SHAPE", "lut must be [N, 2^bits] with 1 <= bits <= 8");
  a.shape_is(lut, "lut", {N, E});
  a.tensor_is(codes, "codes", DType::U8, {N, K});
  a.dtype_in(s, "sens", {DType::F32, DType::F16});
  if (s.ndim() == 1) a.shape_is(s, "sens", {K});
  else a.shape_is(s, "sens", {N, K});
  a.same_device({{&lut, "lut"}, {&codes, "codes"}, {&w, "w"}, {&s, "sens"}});
  if (w.device.is_cuda() && K > (int64_t(1) << 30)) a.error("ERR_SHAPE", "rows longer than 2^30");
  const int it = (int)iters;
  dispatch(
      w.device, "kmeansRows", [=] { cpu::kmeans_rows(lut, codes, w, s, it); },
      [&](int dev) { CUDA_ONLY(cuda::kmeans_rows(lut, codes, w, s, it, dev, cuda_stream(dev))); });
  return a.env().Undefined();
}

// gptqRefitRows(lut f32[N,E] in/out, codes u8[N,K] in/out, q f32[N,K], err f32[N,2], w f32[N,K],
//               out u8[N,K], h f32[K,K], u f32[K,K], perm i32[K], rounds): CPU only.
SQZ_OP(gptqRefitRows) {
  Args a(info, "gptqRefitRows");
  Tensor lut = a.tensor(0, "lut"), codes = a.tensor(1, "codes"), q = a.tensor(2, "q"), err = a.tensor(3, "err"),
         w = a.tensor(4, "w"), out = a.tensor(5, "out"), h = a.tensor(6, "h"), u = a.tensor(7, "u"),
         perm = a.tensor(8, "perm");
  const int64_t rounds = a.integer(9, "rounds");
  if (rounds < 0 || rounds > 100) a.error("ERR_ARG", "rounds must be in [0, 100]");
  a.ndim(w, "w", 2);
  a.dtype_in(w, "w", {DType::F32});
  const int64_t N = w.dim(0), K = w.dim(1);
  a.dtype_in(lut, "lut", {DType::F32});
  a.ndim(lut, "lut", 2);
  const int64_t E = lut.dim(1);
  if (E < 2 || E > 256) a.error("ERR_SHAPE", "lut must be [N, E] with 2 <= E <= 256");
  a.shape_is(lut, "lut", {N, E});
  a.tensor_is(codes, "codes", DType::U8, {N, K});
  a.tensor_is(q, "q", DType::F32, {N, K});
  a.tensor_is(err, "err", DType::F32, {N, 2});
  a.tensor_is(out, "out", DType::U8, {N, K});
  a.tensor_is(h, "h", DType::F32, {K, K});
  a.tensor_is(u, "u", DType::F32, {K, K});
  a.tensor_is(perm, "perm", DType::I32, {K});
  a.same_device({{&lut, "lut"}, {&codes, "codes"}, {&q, "q"}, {&err, "err"}, {&w, "w"}, {&out, "out"}, {&h, "h"},
                 {&u, "u"}, {&perm, "perm"}});
  if (!w.device.is_cpu()) a.error("ERR_DEVICE", "runs on CPU tensors only");
  const int r = (int)rounds;
  dispatch(
      w.device, "gptqRefitRows", [=] { cpu::gptq_refit_rows(lut, codes, q, err, w, out, h, u, perm, r); },
      [&](int) {});
  return a.env().Undefined();
}

}  // namespace sqz::napi
