// Tensor-core GEMV for 2 <= M <= 16: y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias). Still memory-bound on
// w, but with up to 16 rows the fp32 FMA path runs out of issue slots before HBM runs out of
// bandwidth; mma.m16n8k16 does the 16x8x16 product in one instruction.
//
// No shared memory on the load path: the dot product does not care about the order of k, so a
// fixed permutation of k within each 32-wide chunk lets every operand arrive as one 16-byte
// load per thread. Lane (g = lane/4, t = lane%4) loads w[n0+g][8t .. 8t+7] and x[g][8t ..],
// x[g+8][8t ..]; the first mma takes elements 0-3 of each (logical k 2t,2t+1 | 2t+8,2t+9 of the
// fragment layout), the second elements 4-7. A and B use the same permutation, so the sum is
// the plain dot product.
// A block (8 warps) owns 8 rows of w and splits K over its warps (chunk c goes to warp c % 8),
// so even N = 4096 puts 4096 warps in flight; the 8 partial tiles are summed in shared memory in
// warp order (deterministic). Needs K % 8 == 0 and 16-byte aligned x, w (the caller checks).
#pragma once
#include <type_traits>

#include "common.cuh"

namespace sqz::cuda::gemm_detail {

constexpr int kGemvTcWarps = 8;
constexpr int kGemvTcUnroll = 4;

template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <class T>
__global__ void __launch_bounds__(kGemvTcWarps * 32)
    gemv_tc_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                   int M, int N, int K) {
  __shared__ float red[kGemvTcWarps][32][4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 8;
  // Rows past N / M: clamped to a valid row for loading (w) or replaced by zeros (x); never stored.
  const T* wr = w + (size_t)min(n0 + g, N - 1) * K + 8 * t;
  const bool v0 = g < M, v1 = g + 8 < M;
  const T* x0 = x + (size_t)min(g, M - 1) * K + 8 * t;
  const T* x1 = x + (size_t)min(g + 8, M - 1) * K + 8 * t;
  const uint4 zero = make_uint4(0, 0, 0, 0);

  float c[4] = {0.f, 0.f, 0.f, 0.f};
  const int chunks = (K + 31) / 32;  // the last one may be partial (K % 32 in {8, 16, 24})
  const int full = K / 32;
  int ch = warp;
  constexpr int U = kGemvTcUnroll;
  // Main loop: U full chunks per warp in flight, strided by the warp count.
  for (; ch + (U - 1) * kGemvTcWarps < full; ch += U * kGemvTcWarps) {
    uint4 wv[U], xa[U], xb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) wv[u] = ld_stream(wr + (size_t)(ch + u * kGemvTcWarps) * 32);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const size_t o = (size_t)(ch + u * kGemvTcWarps) * 32;
      xa[u] = v0 ? __ldg(reinterpret_cast<const uint4*>(x0 + o)) : zero;
      xb[u] = v1 ? __ldg(reinterpret_cast<const uint4*>(x1 + o)) : zero;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      mma_16816<T>(c, xa[u].x, xb[u].x, xa[u].y, xb[u].y, wv[u].x, wv[u].y);
      mma_16816<T>(c, xa[u].z, xb[u].z, xa[u].w, xb[u].w, wv[u].z, wv[u].w);
    }
  }
  // Remaining chunks one at a time; in a partial last chunk lanes past K load zeros.
  for (; ch < chunks; ch += kGemvTcWarps) {
    const size_t o = (size_t)ch * 32;
    const bool in = (int)o + 8 * t < K;
    const uint4 wv = in ? ld_stream(wr + o) : zero;
    const uint4 xa = (in && v0) ? __ldg(reinterpret_cast<const uint4*>(x0 + o)) : zero;
    const uint4 xb = (in && v1) ? __ldg(reinterpret_cast<const uint4*>(x1 + o)) : zero;
    mma_16816<T>(c, xa.x, xb.x, xa.y, xb.y, wv.x, wv.y);
    mma_16816<T>(c, xa.z, xb.z, xa.w, xb.w, wv.z, wv.w);
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) red[warp][lane][i] = c[i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kGemvTcWarps; ++k) s += red[k][lane][i];
    c[i] = s;
  }
  // C fragment: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at (row g+8, same cols); col = w row.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = g + (i >> 1) * 8, n = n0 + 2 * t + (i & 1);
    if (m < M && n < N) {
      float v = c[i];
      if (bias) v += to_f<T>(bias[n]);
      y[(size_t)m * N + n] = from_f<T>(v);
    }
  }
}

}  // namespace sqz::cuda::gemm_detail
