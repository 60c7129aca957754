// Dense matmul bindings: matmul (ours, CPU and CUDA) and the cuBLAS baseline.
#include "../cpu/gemm.h"
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
