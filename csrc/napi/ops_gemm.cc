// Dense matmul bindings: matmul (ours, CPU and CUDA) and the cuBLAS baseline.
#include <cmath>
#include <vector>

#include "../cpu/gemm.h"
#include "linear_checks.h"
#include "op.h"

#ifdef SQUEEZELM_WITH_CUDA
#include "../kernels/gemm/gemm.h"
#endif

namespace sqz::napi {
namespace {

struct MatmulArgs {
  Tensor y, x, w;
  std::optional<Tensor> bias;
};

// Shapes, dtypes and devices shared by matmul and cublasMatmul.
MatmulArgs check_matmul(Args& a, bool allow_bias) {
  MatmulArgs m{a.tensor(0, "y"), a.tensor(1, "x"), a.tensor(2, "w"), std::nullopt};
  if (allow_bias) m.bias = a.opt_tensor(3, "bias");
  a.ndim(m.y, "y", 2);
  a.ndim(m.x, "x", 2);
  a.ndim(m.w, "w", 2);
  const int64_t M = m.x.dim(0), K = m.x.dim(1), N = m.w.dim(0);
  if (m.w.dim(1) != K)
    a.error("ERR_SHAPE", "w " + m.w.shape_str() + " must be [N, K] with K = " + std::to_string(K) + " (x is " +
                             m.x.shape_str() + ")");
  a.shape_is(m.y, "y", {M, N});
  if (m.bias) {
    a.ndim(*m.bias, "bias", 1);
    a.shape_is(*m.bias, "bias", {N});
    a.same_device({{&m.y, "y"}, {&m.x, "x"}, {&m.w, "w"}, {&*m.bias, "bias"}});
  } else {
    a.same_device({{&m.y, "y"}, {&m.x, "x"}, {&m.w, "w"}});
  }
  if (m.y.device.is_cpu()) {
    a.dtype_in(m.y, "y", {DType::F32, DType::F16, DType::BF16});
    a.dtype_in(m.x, "x", {DType::F32, DType::F16, DType::BF16});
    a.dtype_in(m.w, "w", {DType::F32, DType::F16, DType::BF16});
    if (m.bias) a.dtype_in(*m.bias, "bias", {DType::F32, DType::F16, DType::BF16});
  } else {
    // The CUDA kernels take one half-precision dtype for every operand.
    a.dtype_in(m.x, "x", {DType::F16, DType::BF16});
    a.same_dtype(m.x, "x", m.y, "y");
    a.same_dtype(m.x, "x", m.w, "w");
    if (m.bias) a.same_dtype(m.x, "x", *m.bias, "bias");
  }
  return m;
}

}  // namespace

// matmul(y[M,N], x[M,K], w[N,K], bias?[N]): y = x·wᵀ (+ bias).
SQZ_OP(matmul) {
  Args a(info, "matmul");
  MatmulArgs m = check_matmul(a, true);
  Tensor y = m.y, x = m.x, w = m.w;
  std::optional<Tensor> bias = m.bias;
  dispatch(
      y.device, "matmul", [=] { cpu::matmul(y, x, w, bias ? &*bias : nullptr); },
      [&](int dev) { CUDA_ONLY(cuda::matmul(y, x, w, bias ? &*bias : nullptr, cuda_stream(dev))); });
  return a.env().Undefined();
}

// fusedLinear(y, x, w, bias?, gamma?, eps, mode): the decoder's fused linear (see
// cpu/gemm.h): optional RMSNorm of x in front (gamma), then store (mode 0), accumulate into y
// (mode 1, the residual add) or the gated activation silu(gate) * up over the two halves of
// w's rows (mode 2, y [M, N/2]). CUDA fuses up to 16 rows (the decode case).
SQZ_OP(fusedLinear) {
  Args a(info, "fusedLinear");
  Tensor y = a.tensor(0, "y"), x = a.tensor(1, "x"), w = a.tensor(2, "w");
  std::optional<Tensor> bias = a.opt_tensor(3, "bias"), gamma = a.opt_tensor(4, "gamma");
  const double eps = a.number(5, "eps");
  const int64_t mode = a.integer(6, "mode");
  if (mode < 0 || mode > 2) a.error("ERR_ARG", "mode must be 0 (store), 1 (residual) or 2 (silu pairs), got " + std::to_string(mode));
  a.ndim(y, "y", 2);
  const LinearShape s = check_linear_operands(a, y, "y", x, w, bias, gamma, eps, -1, 16);
  if (mode == 2 && s.N % 2 != 0) a.error("ERR_SHAPE", "silu pairs need an even number of rows in w, got " + std::to_string(s.N));
  a.shape_is(y, "y", {s.M, mode == 2 ? s.N / 2 : s.N});
  if (y.storage == x.storage) a.error("ERR_ARG", "y and x share storage; the fused linear reads x while it writes y");
  const float e = (float)eps;
  const int md = (int)mode;
  dispatch(
      y.device, "fusedLinear",
      [=] { cpu::fused_linear(y, x, w, bias ? &*bias : nullptr, gamma ? &*gamma : nullptr, e, md); },
      [&](int dev) {
        CUDA_ONLY(cuda::fused_linear(y, x, w, bias ? &*bias : nullptr, gamma ? &*gamma : nullptr, e, md, cuda_stream(dev)));
      });
  return a.env().Undefined();
}

// cublasMatmul(y, x, w): the same product through cuBLAS (CUDA tensors only; a baseline).
SQZ_OP(cublasMatmul) {
  Args a(info, "cublasMatmul");
  MatmulArgs m = check_matmul(a, false);
  if (m.y.device.is_cpu()) a.error("ERR_DEVICE", "cuBLAS runs on CUDA tensors only; y is on cpu");
#ifdef SQUEEZELM_WITH_CUDA
  if (!cuda::cublas_available())
    a.error("ERR_UNSUPPORTED", "cuBLAS could not be loaded: " + cuda::cublas_unavailable_reason());
  Tensor y = m.y, x = m.x, w = m.w;
  dispatch(y.device, "cublasMatmul", [] {}, [&](int dev) { cuda::cublas_matmul(y, x, w, dev, cuda_stream(dev)); });
#else
  a.error("ERR_UNSUPPORTED", "this build has no CUDA backend, so no cuBLAS baseline");
#endif
  return a.env().Undefined();
}

// cublasAvailable() -> boolean (loads cuBLAS on first call).
SQZ_OP(cublasAvailable) {
  Args a(info, "cublasAvailable");
#ifdef SQUEEZELM_WITH_CUDA
  return Napi::Boolean::New(a.env(), cuda::cublas_available());
#else
  return Napi::Boolean::New(a.env(), false);
#endif
}

}  // namespace sqz::napi
