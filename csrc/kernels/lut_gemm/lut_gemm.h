// SqueezeLLM dense-and-sparse matmul on CUDA (layout and semantics: csrc/cpu/lut_gemm.h).
#pragma once
#include <cuda_runtime.h>

#include "core/tensor.h"

namespace sqz::cuda {

// y[M,N] = x[M,K] * dequant(qweight, lut)^T + CSR outliers. x, y: f16 | bf16 (one dtype);
// lut, vals: f16 | f32. rows/cols/vals may be null (no outliers); their contents must have been
// checked on the host (cpu::check_outlier_csr) when they were loaded.
// M <= 8: GEMV (each code decoded once, applied to all rows); larger M: tiled tensor-core GEMM.
void lut_matmul(const Tensor& y, const Tensor& x, const Tensor& qweight, const Tensor& lut,
                const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, cudaStream_t stream);

}  // namespace sqz::cuda
