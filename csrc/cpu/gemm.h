// Dense matmul on the CPU: the reference of the CUDA GEMV/GEMM and the CPU backend's linear layer.
#pragma once
#include "../core/tensor.h"

namespace sqz::cpu {

// y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias[N]); any float dtypes, fp32 accumulation.
// bias may be null (Tensor with no storage).
void matmul(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias);

}  // namespace sqz::cpu
