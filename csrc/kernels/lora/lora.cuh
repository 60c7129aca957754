// The batched LoRA kernel (launched by lora.cu; a header so that it can also be built for the host
// by the kernel emulator of the tests, test/emu). See lora.cu for the design.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cpu/lora.h"
#include "kernels/common/dtype_cuda.cuh"

namespace sqz::cuda::lora_kernels {


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


}  // namespace sqz::cuda::lora_kernels
