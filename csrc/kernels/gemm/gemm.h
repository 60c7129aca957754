// Dense matmul on CUDA: y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias[N]), f16 or bf16, fp32 accumulation.
// M <= 16 runs a bandwidth-bound GEMV (each weight read once for all rows); larger M a
// tensor-core GEMM (mma.sync m16n8k16, ldmatrix, cp.async multi-stage pipeline).
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "core/tensor.h"

namespace sqz::cuda {

// All tensors on one CUDA device with one dtype (f16 | bf16); bias may be null. Checked by the caller.
void matmul(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias, cudaStream_t stream);

// The decoder's fused GEMV (M <= 16): y = [rmsnorm(x) * gamma] · wᵀ (+ bias) with mode 0 (store),
// 1 (y += product: the residual add) or 2 (y[m, j] = silu(z[m, j]) * z[m, j + N/2], y [M, N/2]).
// gamma may be null (no norm). Shapes and dtypes checked by the caller.
void fused_linear(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* gamma, float eps,
                  int mode, cudaStream_t stream);

// linearRopeAppend (M <= 2): qkv = [rmsnorm(x) * gamma] · wᵀ (+ bias), rounded to x's dtype,
// then rope_append(q_out, kc, vc, qkv, ...) (common/fused.h) in the GEMV's epilogue, without
// qkv ever being stored. Bit for bit fused_linear (mode 0) followed by rope_append.
void linear_rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& x, const Tensor& w,
                        const Tensor* bias, const Tensor* gamma, float eps, const Tensor& positions,
                        const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q,
                        cudaStream_t stream);

// The same product through cuBLAS, loaded at run time (a benchmark baseline; never linked).
bool cublas_available();
std::string cublas_unavailable_reason();
void cublas_matmul(const Tensor& y, const Tensor& x, const Tensor& w, int device, cudaStream_t stream);

}  // namespace sqz::cuda
