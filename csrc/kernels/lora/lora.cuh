// The batched LoRA kernels (launched by lora.cu; a header so that the kernel emulator of the tests,
// test/emu, can build them for the host). See lora.cu for the design.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cpu/lora.h"
#include "kernels/common/dtype_cuda.cuh"

namespace sqz::cuda::lora_kernels {

constexpr int kThreads = 256, kWarps = kThreads / 32;
// Shrink: a block takes kShrinkRows rank rows of one batch row, kWarps / kShrinkRows warps per rank
// row splitting K. Expand: a block takes kExpandOut outputs of one batch row (8 per lane), its warps
// splitting the rank.
constexpr int kShrinkRows = 2, kWarpsPerRankRow = kWarps / kShrinkRows, kExpandOut = 32 * 8;

// The pool range of row t's adapter, or false where the row has none or its entry is not a range
// inside the pool (the CPU op's skipping rule, csrc/cpu/lora.h).
__device__ __forceinline__ bool adapter_of(const int* slots, const int* desc, int64_t t, int S, int64_t R, int64_t& off,
                                           int64_t& rank) {
  const int s = slots[t];
  if (s < 0 || s >= S) return false;
  off = desc[2 * s];
  rank = desc[2 * s + 1];
  return off >= 0 && rank > 0 && rank <= cpu::kLoraMaxRank && off + rank <= R;
}

// Eight consecutive elements as floats: one 16-byte load for 2-byte types, two for f32.
template <class E> __device__ __forceinline__ void load8(const E* p, float (&f)[8]) {
  if constexpr (sizeof(E) == 2) {
    const Vec16<E> v = load16(p);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = to_f32(v.v[i]);
  } else {
    const Vec16<E> a = load16(p), b = load16(p + 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[i] = to_f32(a.v[i]);
      f[4 + i] = to_f32(b.v[i]);
    }
  }
}

// v[t][j] = scale_s * (A[off + j] . x[t]) for j < rank_s. Grid (T, ceil(rank bound / kShrinkRows)).
// The kWarpsPerRankRow warps of a rank row take interleaved 8-element pieces of K (VEC: K % 8 == 0 and
// 16-byte aligned rows; otherwise single elements), several loads in flight per lane; their sums are
// added in warp order, so the bits do not depend on timing.
template <class E, bool VEC>
__global__ void __launch_bounds__(kThreads) shrink_kernel(float* __restrict__ v, const E* __restrict__ x, const int* __restrict__ slots,
                                                          const E* __restrict__ a, const int* __restrict__ desc,
                                                          const float* __restrict__ scale, int64_t K, int64_t R, int S, int64_t vstride) {
  __shared__ float part[kWarps];
  const int64_t t = blockIdx.x;
  int64_t off, rank;
  if (!adapter_of(slots, desc, t, S, R, off, rank)) return;
  const int64_t j0 = (int64_t)blockIdx.y * kShrinkRows;
  if (j0 >= rank) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = warp % kWarpsPerRankRow;
  const int64_t j = j0 + warp / kWarpsPerRankRow;
  const E* xr = x + t * K;
  float acc = 0.f;
  if (j < rank) {
    const E* ar = a + (off + j) * K;
    if constexpr (VEC) {
      const int64_t pieces = K / 8, step = 32 * kWarpsPerRankRow;
      float acc2 = 0.f;
      int64_t i = sub * 32 + lane;
      for (; i + step < pieces; i += 2 * step) {  // two pieces in flight per lane, two sums
        float fa[8], fx[8], ga[8], gx[8];
        load8(ar + 8 * i, fa);
        load8(xr + 8 * i, fx);
        load8(ar + 8 * (i + step), ga);
        load8(xr + 8 * (i + step), gx);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          acc = fmaf(fa[e], fx[e], acc);
          acc2 = fmaf(ga[e], gx[e], acc2);
        }
      }
      if (i < pieces) {
        float fa[8], fx[8];
        load8(ar + 8 * i, fa);
        load8(xr + 8 * i, fx);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(fa[e], fx[e], acc);
      }
      acc += acc2;
    } else {
      for (int64_t k = sub * 32 + lane; k < K; k += 32 * kWarpsPerRankRow) acc = fmaf(to_f32(ar[k]), to_f32(xr[k]), acc);
    }
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) part[warp] = acc;
  __syncthreads();
  if (threadIdx.x < kShrinkRows) {
    const int64_t jj = j0 + threadIdx.x;
    if (jj < rank) {
      float sum = 0.f;
      for (int w = 0; w < kWarpsPerRankRow; ++w) sum += part[threadIdx.x * kWarpsPerRankRow + w];
      v[t * vstride + jj] = sum * scale[slots[t]];
    }
  }
}

// y[t][n] += sum_{j < rank} v[t][j] * Bt[off + j][n]. Grid (T, ceil(N / kExpandOut)): lane l of every
// warp owns outputs n0 + 8l .. n0 + 8l + 7 (VEC: N % 8 == 0 and 16-byte aligned rows, one load per
// rank row), warp w takes rank rows j = w, w + kWarps, ...; the warps' partial sums meet in shared
// memory and are added in warp order by one thread per output.
template <class E, bool VEC>
__global__ void __launch_bounds__(kThreads) expand_kernel(E* __restrict__ y, const float* __restrict__ v, const int* __restrict__ slots,
                                                          const E* __restrict__ bt, const int* __restrict__ desc, int64_t N, int64_t R,
                                                          int S, int64_t vstride) {
  __shared__ float part[kWarps][kExpandOut + 1];
  const int64_t t = blockIdx.x;
  int64_t off, rank;
  if (!adapter_of(slots, desc, t, S, R, off, rank)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n0 = (int64_t)blockIdx.y * kExpandOut, nl = n0 + 8 * lane;
  const float* vr = v + t * vstride;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (VEC ? nl < N : true) {
    int64_t j = warp;
    if constexpr (VEC) {
      for (; j + kWarps < rank; j += 2 * kWarps) {  // two rank rows in flight
        float b0[8], b1[8];
        load8(bt + (off + j) * N + nl, b0);
        load8(bt + (off + j + kWarps) * N + nl, b1);
        const float c0 = vr[j], c1 = vr[j + kWarps];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(c1, b1[e], fmaf(c0, b0[e], acc[e]));
      }
      if (j < rank) {
        float b0[8];
        load8(bt + (off + j) * N + nl, b0);
        const float c0 = vr[j];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(c0, b0[e], acc[e]);
      }
    } else {
      for (; j < rank; j += kWarps) {
        const float c = vr[j];
        const E* br = bt + (off + j) * N;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (nl + e < N) acc[e] = fmaf(c, to_f32(br[nl + e]), acc[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) part[warp][8 * lane + e] = acc[e];
  __syncthreads();
  for (int i = threadIdx.x; i < kExpandOut; i += kThreads) {
    const int64_t n = n0 + i;
    if (n >= N) break;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += part[w][i];
    y[t * N + n] = from_f32<E>(to_f32(y[t * N + n]) + sum);
  }
}

}  // namespace sqz::cuda::lora_kernels
