#include "linear_checks.h"

#include "../cpu/lut_gemm.h"

#include <climits>
#include <cmath>
#include <string>

namespace sqz::napi {

LinearShape check_linear_operands(const Args& a, const Tensor& out, const char* out_name, const Tensor& x,
                                  const Tensor& w, const std::optional<Tensor>& bias,
                                  const std::optional<Tensor>& gamma, double eps, int64_t n, int64_t cuda_rows) {
  if (!(eps >= 0) || !std::isfinite(eps)) a.error("ERR_ARG", "eps must be a finite number >= 0");
  a.ndim(x, "x", 2);
  a.ndim(w, "w", 2);
  const int64_t M = x.dim(0), K = x.dim(1), N = n < 0 ? w.dim(0) : n;
  if (w.dim(0) != N || w.dim(1) != K)
    a.error("ERR_SHAPE", "w " + w.shape_str() + " must be [" + std::to_string(N) + ", " + std::to_string(K) +
                             "] (x is " + x.shape_str() + ")");
  if (bias) {
    a.ndim(*bias, "bias", 1);
    a.shape_is(*bias, "bias", {N});
  }
  if (gamma) {
    a.ndim(*gamma, "gamma", 1);
    a.shape_is(*gamma, "gamma", {K});
  }
  a.same_device({{&out, out_name}, {&x, "x"}, {&w, "w"}});
  if (bias) a.same_device({{&out, out_name}, {&*bias, "bias"}});
  if (gamma) a.same_device({{&out, out_name}, {&*gamma, "gamma"}});
  const std::initializer_list<DType> fl = {DType::F32, DType::F16, DType::BF16};
  if (out.device.is_cpu()) {
    for (const Tensor* t : {&out, &x, &w}) a.dtype_in(*t, t == &out ? out_name : t == &x ? "x" : "w", fl);
    if (bias) a.dtype_in(*bias, "bias", fl);
    if (gamma) a.dtype_in(*gamma, "gamma", fl);
  } else {
    a.dtype_in(x, "x", {DType::F16, DType::BF16});
    a.same_dtype(x, "x", out, out_name);
    a.same_dtype(x, "x", w, "w");
    if (bias) a.same_dtype(x, "x", *bias, "bias");
    if (gamma) a.same_dtype(x, "x", *gamma, "gamma");
    if (M > cuda_rows)
      a.error("ERR_UNSUPPORTED", "CUDA fuses up to " + std::to_string(cuda_rows) + " rows (decode), got " + std::to_string(M));
    if (K == 0) a.error("ERR_SHAPE", "x " + x.shape_str() + " has no columns");
  }
  return {M, K, N};
}

bool overlap(const Tensor& a, const Tensor& b) {
  const char* pa = static_cast<const char*>(a.data());
  const char* pb = static_cast<const char*>(b.data());
  const size_t na = (size_t)a.numel() * dtype_size(a.dtype), nb = (size_t)b.numel() * dtype_size(b.dtype);
  return na > 0 && nb > 0 && pa < pb + nb && pb < pa + na;
}

void check_lut_norm(const Args& a, const Tensor& x, const std::optional<Tensor>& gamma, double eps) {
  if (!gamma) return;
  if (!(eps >= 0) || !std::isfinite(eps)) a.error("ERR_ARG", "eps must be a finite number >= 0");
  a.ndim(*gamma, "normWeight", 1);
  a.shape_is(*gamma, "normWeight", {x.dim(1)});
  a.same_device({{&x, "x"}, {&*gamma, "normWeight"}});
  if (x.device.is_cuda()) a.same_dtype(x, "x", *gamma, "normWeight");
  else a.dtype_in(*gamma, "normWeight", {DType::F32, DType::F16, DType::BF16});
}

int64_t check_lut_operands(const Args& a, const Tensor& x, const Tensor& q, const Tensor& lut,
                           const std::optional<Tensor>& rows, const std::optional<Tensor>& cols,
                           const std::optional<Tensor>& vals, int64_t bits, int64_t half) {
  if (bits != 3 && bits != 4) a.error("ERR_UNSUPPORTED", "bits must be 3 or 4, got " + std::to_string(bits));
  a.ndim(x, "x", 2);
  a.ndim(lut, "lut", 2);
  const int64_t K = x.dim(1), N = lut.dim(0);
  if (half != 0 && !cpu::lut_pairable(N, half))
    a.error("ERR_ARG", "pairHalf " + std::to_string(half) + " does not pair the rows of a " + std::to_string(N) +
                           "-row weight (a multiple of 8 that 2 * pairHalf divides)");
  const cpu::LutPacked L((int)bits, N, K);
  a.dtype_in(q, "codes", {DType::I32, DType::U32});
  a.shape_is(q, "codes", {L.Np, L.words_per_row()});
  a.dtype_in(lut, "lut", {DType::F16, DType::F32});
  a.shape_is(lut, "lut", {N, int64_t(1) << bits});
  const int given = (rows ? 1 : 0) + (cols ? 1 : 0) + (vals ? 1 : 0);
  if (given != 0 && given != 3) a.error("ERR_ARG", "rows, cols and vals come together (or none of them)");
  if (rows) {
    a.tensor_is(*rows, "rows", DType::I32, {N + 1});
    a.dtype_in(*cols, "cols", {DType::I32});
    a.ndim(*cols, "cols", 1);
    a.dtype_in(*vals, "vals", {DType::F16, DType::F32});
    a.shape_is(*vals, "vals", {cols->dim(0)});
    a.same_device({{&x, "x"}, {&*rows, "rows"}, {&*cols, "cols"}, {&*vals, "vals"}});
  }
  a.same_device({{&x, "x"}, {&q, "codes"}, {&lut, "lut"}});
  if (x.device.is_cuda()) {
    a.dtype_in(x, "x", {DType::F16, DType::BF16});
    if (K > INT32_MAX / 2 || N > INT32_MAX / 2 || x.dim(0) > INT32_MAX / 2 || q.numel() > INT32_MAX)
      a.error("ERR_SHAPE", "dimensions too large");
  } else {
    a.dtype_in(x, "x", {DType::F32, DType::F16, DType::BF16});
  }
  return N;
}

}  // namespace sqz::napi
