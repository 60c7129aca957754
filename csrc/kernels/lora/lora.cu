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
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cpu/lora.h"
#include "core/cuda_stream.h"
#include "kernels/common/dtype_cuda.cuh"
#include "lora.h"

namespace sqz::cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32, kPerThread = 4, kChunk = kThreads * kPerThread;

template <class T>
__global__ void __launch_bounds__(kThreads) lora_kernel(T* __restrict__ y, const T* __restrict__ x, const int* __restrict__ slots,
                                                        const T* __restrict__ a, const T* __restrict__ bt, const int* __restrict__ desc,
                                                        const float* __restrict__ scale, int64_t K, int64_t N, int64_t R, int S) {
  __shared__ float tmp[cpu::kLoraMaxRank];
  const int64_t t = blockIdx.x;
  const int s = slots[t];
  if (s < 0 || s >= S) return;
  const int64_t off = desc[2 * s], rank = desc[2 * s + 1];
  if (off < 0 || rank <= 0 || rank > cpu::kLoraMaxRank || off + rank > R) return;
  const float sc = scale[s];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* xr = x + t * K;
  for (int64_t j = warp; j < rank; j += kWarps) {
    const T* ar = a + (off + j) * K;
    float acc = 0.f;
    for (int64_t k = lane; k < K; k += 32) acc = fmaf(to_f32(ar[k]), to_f32(xr[k]), acc);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) tmp[j] = acc * sc;
  }
  __syncthreads();
  T* yr = y + t * N;
  const int64_t n0 = (int64_t)blockIdx.y * kChunk;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t n = n0 + i * kThreads + threadIdx.x;  // consecutive threads, consecutive outputs
    if (n >= N) break;
    float acc = 0.f;
    for (int64_t j = 0; j < rank; ++j) acc = fmaf(tmp[j], to_f32(bt[(off + j) * N + n]), acc);
    yr[n] = from_f32<T>(to_f32(yr[n]) + acc);
  }
}

}  // namespace

void lora_apply(const Tensor& y, const Tensor& x, const Tensor& slots, const Tensor& a, const Tensor& bt,
                const Tensor& desc, const Tensor& scale, cudaStream_t s) {
  const int64_t T = x.dim(0), K = x.dim(1), N = y.dim(1), R = a.dim(0);
  const int S = (int)desc.dim(0);
  if (T == 0 || N == 0 || S == 0) return;
  const dim3 grid((unsigned)T, (unsigned)((N + kChunk - 1) / kChunk));
  dispatch_float(y.dtype, "loraApply", [&](auto tv) {
    using T_ = decltype(tv);
    lora_kernel<T_><<<grid, kThreads, 0, s>>>(y.ptr<T_>(), x.ptr<T_>(), slots.ptr<int>(), a.ptr<T_>(), bt.ptr<T_>(),
                                              desc.ptr<int>(), scale.ptr<float>(), K, N, R, S);
  });
  cuda_check(cudaGetLastError(), "loraApply: launch");
}

}  // namespace sqz::cuda
