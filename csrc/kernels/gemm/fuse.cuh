// What a GEMV may do around its product, so a decode step needs fewer kernels:
//   gamma set    y = (rmsnorm(x) * gamma) · wᵀ: the norm of the layer input fused in front;
//   kFuseResidual  y += x · wᵀ: the residual add fused behind (y is the residual stream);
//   kFuseSiluPairs y[m, j] = silu(z[m, j]) * z[m, j + N/2] with z = x · wᵀ: the gated MLP's
//                  activation fused behind the gate|up projection (y is [M, N/2]).
//   kFuseRopeAppend  w is the packed q|k|v projection: z is rounded to the activation dtype
//                  as a store would leave it, then ropeAppend's work is done on it (rotate q
//                  into q_out, rotate k and copy v into the paged caches; y is unused): the
//                  decode step's RoPE/append kernel folded into the projection. Rows are taken
//                  in rotation pairs (i, i + D/2) of each head, so one lane holds both.
#pragma once
#include <cuda_runtime.h>

#include "../common/rope_append.cuh"
#include "../common/silu.cuh"

namespace sqz::cuda::gemm_detail {

constexpr int kFusePlain = 0, kFuseResidual = 1, kFuseSiluPairs = 2, kFuseRopeAppend = 3;

struct GemvFuse {
  const void* gamma;  // RMSNorm weight [K] (the activation dtype) or null
  float eps;
  int mode;
  // kFuseRopeAppend only
  RopeAppendParams rope;
  void* q_out;
  void* kc;
  void* vc;
};

}  // namespace sqz::cuda::gemm_detail
