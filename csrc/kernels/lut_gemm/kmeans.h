// Weighted 1-D k-means per row on CUDA (semantics: csrc/cpu/kmeans.h).
#pragma once
#include <cuda_runtime.h>

#include "core/tensor.h"

namespace sqz::cuda {

// lut f32 [N, E], codes u8 [N,K], w f32|f16|bf16 [N,K], sens f32|f16 [N,K] or [K]. Same
// initialisation (weighted quantiles over the sorted row), the same Lloyd update over sorted
// segments and the same tie rules as the CPU reference; deterministic. Scratch memory comes from
// the device pool (rows are processed in chunks of about 4M weights).
void kmeans_rows(const Tensor& lut, const Tensor& codes, const Tensor& w, const Tensor& sens, int iters, int device,
                 cudaStream_t stream);

}  // namespace sqz::cuda
