// Dense matmul on the CPU: the reference of the CUDA GEMV/GEMM and the CPU backend's linear layer.
#pragma once
#include "../core/tensor.h"

namespace sqz::cpu {

// y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias[N]); any float dtypes, fp32 accumulation.
// bias may be null (Tensor with no storage).
void matmul(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias);

// The decoder's fused linear (reference of the CUDA fused GEMV; any M here):
//   h = gamma ? x * gamma / rms(x) : x   (fp32, rms over each row of K with eps)
//   z = h · wᵀ (+ bias)
//   mode 0: y = z;  mode 1: y += z;  mode 2: y[m, j] = silu(z[m, j]) * z[m, j + N/2] (y is [M, N/2]).
void fused_linear(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* gamma, float eps,
                  int mode);

}  // namespace sqz::cpu
