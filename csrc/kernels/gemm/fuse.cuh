// What a GEMV may do around its product, so a decode step needs fewer kernels:
//   gamma set    y = (rmsnorm(x) * gamma) · wᵀ: the norm of the layer input fused in front;
//   kFuseResidual  y += x · wᵀ: the residual add fused behind (y is the residual stream);
//   kFuseSiluPairs y[m, j] = silu(z[m, j]) * z[m, j + N/2] with z = x · wᵀ: the gated MLP's
//                  activation fused behind the gate|up projection (y is [M, N/2]).
#pragma once
#include <cuda_runtime.h>

namespace sqz::cuda::gemm_detail {

constexpr int kFusePlain = 0, kFuseResidual = 1, kFuseSiluPairs = 2;

struct GemvFuse {
  const void* gamma;  // RMSNorm weight [K] (the activation dtype) or null
  float eps;
  int mode;
};

__device__ __forceinline__ float silu_f(float g) { return g / (1.f + expf(-g)); }

}  // namespace sqz::cuda::gemm_detail
