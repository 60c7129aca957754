// Batched LoRA (S-LoRA's heterogeneous batch) on CUDA: y[t] += scale_s * Bt_s^T (A_s x[t]) with
// each row's adapter slot s read from device memory, so one launch serves a batch that mixes
// adapters of different ranks (and rows with none), and a captured decode graph stays valid
// whichever adapters the next step's rows use.
//
// Why this shape. A decode step has few rows and small ranks (8-64): the work is reading the
// adapter's A (rank x K) and Bt (rank x N) once per row, far less than the base GEMV reads. Grid =
// (rows, output chunks of kChunk): each block computes its row's rank products (the shrink, one warp
// per rank index, lane-strided dot products summed in a fixed shuffle order) into shared memory,
// then its chunk of outputs (the expand, a thread per output, the rank loop in order), so the result
// does not depend on the grid. The blocks of one row redo the shrink: K * rank multiply-adds,
// against N / gridDim.y * rank for the expand, and no second launch or workspace. Rows that share an
// adapter reread it from L2. Deterministic: no atomics.
#include "core/cuda_stream.h"
#include "lora.cuh"
#include "lora.h"

namespace sqz::cuda {

void lora_apply(const Tensor& y, const Tensor& x, const Tensor& slots, const Tensor& a, const Tensor& bt,
                const Tensor& desc, const Tensor& scale, cudaStream_t s) {
  const int64_t T = x.dim(0), K = x.dim(1), N = y.dim(1), R = a.dim(0);
  const int S = (int)desc.dim(0);
  if (T == 0 || N == 0 || S == 0) return;
  using lora_kernels::kChunk;
  using lora_kernels::kThreads;
  const dim3 grid((unsigned)T, (unsigned)((N + kChunk - 1) / kChunk));
  dispatch_float(y.dtype, "loraApply", [&](auto tv) {
    using T_ = decltype(tv);
    lora_kernels::lora_kernel<T_><<<grid, kThreads, 0, s>>>(y.ptr<T_>(), x.ptr<T_>(), slots.ptr<int>(), a.ptr<T_>(), bt.ptr<T_>(),
                                              desc.ptr<int>(), scale.ptr<float>(), K, N, R, S);
  });
  cuda_check(cudaGetLastError(), "loraApply: launch");
}

}  // namespace sqz::cuda
