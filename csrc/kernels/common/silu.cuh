// SiLU as every kernel computes it: the elementwise siluMul and the epilogues that fuse it behind a
// gate|up projection (gemm/fuse.cuh, lut_gemm/lut_gemm.cu). One formula, so a fused and an unfused
// step round the same values the same way.
#pragma once
#include <cuda_runtime.h>

namespace sqz::cuda {

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

}  // namespace sqz::cuda
