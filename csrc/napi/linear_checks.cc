#include "linear_checks.h"

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

}  // namespace sqz::napi
