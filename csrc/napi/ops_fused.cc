// Bindings of the decoder's fused ops: ropeAppend, linearRopeAppend and lutRopeAppend.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "../cpu/fused.h"
#include "../cpu/lut_gemm.h"
#include "linear_checks.h"
#include "op.h"
#ifdef SQUEEZELM_WITH_CUDA
#include "../kernels/common/fused.h"
#include "../kernels/gemm/gemm.h"
#include "../kernels/lut_gemm/lut_gemm.h"
#endif

namespace sqz::napi {

namespace {

// Checks shared by ropeAppend and linearRopeAppend: qOut [T, Hq, D], caches [pages, pageSize,
// kvHeads, D], the index tensors; the q|k|v rows are [T, width] (qkv, or the projection's
// output). Returns width = (Hq + 2 kvHeads) D.
int64_t check_rope_append(Args& a, const Tensor& qo, const Tensor& kc, const Tensor& vc, int64_t T, const Tensor& pos,
                          const Tensor& f, const Tensor& pt, const Tensor& lens, const Tensor& cuq) {
  a.same_device({{&qo, "qOut"}, {&kc, "kCache"}, {&vc, "vCache"}, {&pos, "positions"}, {&f, "invFreq"},
                 {&pt, "pageTable"}, {&lens, "seqLens"}, {&cuq, "cuQ"}});
  const std::initializer_list<DType> fl = {DType::F32, DType::F16, DType::BF16};
  a.dtype_in(qo, "qOut", fl);
  a.dtype_in(kc, "kCache", fl);
  a.same_dtype(kc, "kCache", vc, "vCache");
  a.dtype_in(pos, "positions", {DType::I32});
  a.dtype_in(f, "invFreq", {DType::F32});
  a.dtype_in(pt, "pageTable", {DType::I32});
  a.dtype_in(lens, "seqLens", {DType::I32});
  a.dtype_in(cuq, "cuQ", {DType::I32});
  a.ndim(qo, "qOut", 3);
  a.ndim(kc, "kCache", 4);
  a.shape_is(vc, "vCache", kc.shape);
  a.ndim(lens, "seqLens", 1);
  const int64_t Hq = qo.dim(1), D = qo.dim(2), Hkv = kc.dim(2), B = lens.dim(0);
  if (D < 2 || D % 2 != 0) a.error("ERR_SHAPE", "qOut " + qo.shape_str() + ": head dim must be even and non-zero");
  if (kc.dim(3) != D) a.error("ERR_SHAPE", "kCache " + kc.shape_str() + " and qOut " + qo.shape_str() + " differ in head_dim");
  if (kc.dim(1) < 1 || Hkv < 1) a.error("ERR_SHAPE", "kCache " + kc.shape_str() + " has an empty dimension");
  if (Hq < 1 || Hq % Hkv != 0)
    a.error("ERR_SHAPE", "qOut has " + std::to_string(Hq) + " heads, not a multiple of the cache's " +
                             std::to_string(Hkv) + " kv heads");
  a.shape_is(qo, "qOut", {T, Hq, D});
  a.shape_is(pos, "positions", {T});
  a.shape_is(f, "invFreq", {D / 2});
  a.shape_is(pt, "pageTable", {B, -1});
  a.shape_is(cuq, "cuQ", {B + 1});
  if (T > INT32_MAX || kc.dim(0) > INT32_MAX || B > 65535 || pt.dim(1) * kc.dim(1) > INT32_MAX)
    a.error("ERR_SHAPE", "kCache " + kc.shape_str() + " / pageTable " + pt.shape_str() + " / " + std::to_string(T) +
                             " rows exceed the supported sizes");
  if (overlap(qo, kc) || overlap(qo, vc)) a.error("ERR_ARG", "the caches must not overlap qOut");
  return (Hq + 2 * Hkv) * D;
}

}  // namespace

// ropeAppend(qOut[T,Hq,D], kCache, vCache, qkv[T,(Hq+2*kvHeads)*D], positions i32[T], invFreq f32[D/2],
//            pageTable i32[B,maxPages], seqLens i32[B], cuQ i32[B+1])
SQZ_OP(ropeAppend) {
  Args a(info, "ropeAppend");
  Tensor qo = a.tensor(0, "qOut"), kc = a.tensor(1, "kCache"), vc = a.tensor(2, "vCache"), qkv = a.tensor(3, "qkv");
  Tensor pos = a.tensor(4, "positions"), f = a.tensor(5, "invFreq"), pt = a.tensor(6, "pageTable");
  Tensor lens = a.tensor(7, "seqLens"), cuq = a.tensor(8, "cuQ");
  a.same_device({{&qo, "qOut"}, {&qkv, "qkv"}});
  a.dtype_in(qkv, "qkv", {DType::F32, DType::F16, DType::BF16});
  a.ndim(qkv, "qkv", 2);
  const int64_t T = qkv.dim(0);
  a.ndim(qo, "qOut", 3);
  if (qo.dim(0) != T) a.error("ERR_SHAPE", "qOut " + qo.shape_str() + " and qkv " + qkv.shape_str() + " differ in rows");
  const int64_t width = check_rope_append(a, qo, kc, vc, T, pos, f, pt, lens, cuq);
  a.shape_is(qkv, "qkv", {T, width});
  if (overlap(qo, qkv)) a.error("ERR_ARG", "qOut must not overlap qkv");
  if (overlap(kc, qkv) || overlap(vc, qkv)) a.error("ERR_ARG", "the caches must not overlap qkv");
  if (qo.device.is_cuda()) {
    a.same_dtype(qkv, "qkv", qo, "qOut");
    a.same_dtype(qkv, "qkv", kc, "kCache");
  }
  dispatch(
      qo.device, "ropeAppend", [=] { cpu::rope_append(qo, kc, vc, qkv, pos, f, pt, lens, cuq); },
      [&](int dev) { CUDA_ONLY(cuda::rope_append(qo, kc, vc, qkv, pos, f, pt, lens, cuq, cuda_stream(dev))); });
  return a.env().Undefined();
}

// linearRopeAppend(qOut[T,Hq,D], kCache, vCache, x[T,K], w[(Hq+2*kvHeads)*D,K], bias?, gamma?, eps,
//                  positions, invFreq, pageTable, seqLens, cuQ): fusedLinear (store) into q|k|v
// followed by ropeAppend, without q|k|v being stored (one launch on CUDA, up to 2 rows).
SQZ_OP(linearRopeAppend) {
  Args a(info, "linearRopeAppend");
  Tensor qo = a.tensor(0, "qOut"), kc = a.tensor(1, "kCache"), vc = a.tensor(2, "vCache");
  Tensor x = a.tensor(3, "x"), w = a.tensor(4, "w");
  std::optional<Tensor> bias = a.opt_tensor(5, "bias"), gamma = a.opt_tensor(6, "gamma");
  const double eps = a.number(7, "eps");
  Tensor pos = a.tensor(8, "positions"), f = a.tensor(9, "invFreq"), pt = a.tensor(10, "pageTable");
  Tensor lens = a.tensor(11, "seqLens"), cuq = a.tensor(12, "cuQ");
  a.ndim(x, "x", 2);
  a.ndim(qo, "qOut", 3);
  const int64_t width = check_rope_append(a, qo, kc, vc, x.dim(0), pos, f, pt, lens, cuq);
  check_linear_operands(a, qo, "qOut", x, w, bias, gamma, eps, width, 2);
  if (qo.device.is_cuda()) a.same_dtype(x, "x", kc, "kCache");
  if (overlap(qo, x) || overlap(kc, x) || overlap(vc, x) || overlap(qo, w) || overlap(kc, w) || overlap(vc, w))
    a.error("ERR_ARG", "qOut and the caches must not overlap x or w");
  const float e = (float)eps;
  const Tensor* bp = bias ? &*bias : nullptr;
  const Tensor* gp = gamma ? &*gamma : nullptr;
  dispatch(
      qo.device, "linearRopeAppend",
      [=] {
        cpu::linear_rope_append(qo, kc, vc, x, w, bias ? &*bias : nullptr, gamma ? &*gamma : nullptr, e, pos, f, pt,
                                lens, cuq);
      },
      [&](int dev) {
        CUDA_ONLY(cuda::linear_rope_append(qo, kc, vc, x, w, bp, gp, e, pos, f, pt, lens, cuq, cuda_stream(dev)));
      });
  return a.env().Undefined();
}

// lutRopeAppend(qOut[T,Hq,D], kCache, vCache, x[T,K], codes, lut[(Hq+2*kvHeads)*D, 2^bits], rows?, cols?,
//               vals?, bits, pairHalf, positions, invFreq, pageTable, seqLens, cuQ, normWeight?, eps = 1e-6):
// lutMatmulPacked into q|k|v (rows stored paired at pairHalf = D/2; normWeight: the RMSNorm of x in
// front) followed by ropeAppend, without q|k|v being stored (one launch on CUDA, up to 64 rows).
SQZ_OP(lutRopeAppend) {
  Args a(info, "lutRopeAppend");
  Tensor qo = a.tensor(0, "qOut"), kc = a.tensor(1, "kCache"), vc = a.tensor(2, "vCache");
  Tensor x = a.tensor(3, "x"), q = a.tensor(4, "codes"), lut = a.tensor(5, "lut");
  auto rows = a.opt_tensor(6, "rows"), cols = a.opt_tensor(7, "cols"), vals = a.opt_tensor(8, "vals");
  const int64_t bits = a.integer(9, "bits"), half = a.integer(10, "pairHalf");
  Tensor pos = a.tensor(11, "positions"), f = a.tensor(12, "invFreq"), pt = a.tensor(13, "pageTable");
  Tensor lens = a.tensor(14, "seqLens"), cuq = a.tensor(15, "cuQ");
  auto gamma = a.opt_tensor(16, "normWeight");
  const double eps = a.opt_number(17, "eps", 1e-6);
  const int64_t N = check_lut_operands(a, x, q, lut, rows, cols, vals, bits, half);
  check_lut_norm(a, x, gamma, eps);
  a.ndim(qo, "qOut", 3);
  const int64_t width = check_rope_append(a, qo, kc, vc, x.dim(0), pos, f, pt, lens, cuq);
  if (N != width)
    a.error("ERR_SHAPE", "lut " + lut.shape_str() + " is a weight of " + std::to_string(N) + " rows; q|k|v of qOut " +
                             qo.shape_str() + " and kCache " + kc.shape_str() + " has " + std::to_string(width));
  if (2 * half != qo.dim(2))
    a.error("ERR_ARG", "lutRopeAppend needs the rows paired at half the head dim (" + std::to_string(qo.dim(2) / 2) +
                           "), got " + std::to_string(half));
  a.same_device({{&qo, "qOut"}, {&x, "x"}});
  if (qo.device.is_cuda()) {
    a.same_dtype(x, "x", qo, "qOut");
    a.same_dtype(x, "x", kc, "kCache");
  }
  if (overlap(qo, x) || overlap(kc, x) || overlap(vc, x)) a.error("ERR_ARG", "qOut and the caches must not overlap x");
  const int b = (int)bits, h = (int)half;
  const float e = (float)eps;
  dispatch(
      qo.device, "lutRopeAppend",
      [=] {
        cpu::lut_rope_append(qo, kc, vc, x, q, lut, rows ? &*rows : nullptr, cols ? &*cols : nullptr, vals ? &*vals : nullptr,
                             b, h, pos, f, pt, lens, cuq, gamma ? &*gamma : nullptr, e);
      },
      [&](int dev) {
        CUDA_ONLY(cuda::lut_rope_append(qo, kc, vc, x, q, lut, rows ? &*rows : nullptr, cols ? &*cols : nullptr,
                                        vals ? &*vals : nullptr, b, h, pos, f, pt, lens, cuq, gamma ? &*gamma : nullptr, e,
                                        cuda_stream(dev)));
      });
  return a.env().Undefined();
}

}  // namespace sqz::napi
