// Tensor-core GEMV for few rows (M <= 16): y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias). Memory-bound on
// w, but with several rows the fp32 FMA path runs out of issue slots before HBM runs out of
// bandwidth; mma.m16n8k16 does the 16x8x16 product in one instruction.
//
// No shared memory on the load path: the dot product does not care about the order of k, so a
// fixed permutation of k within each 32-wide chunk lets every operand arrive as one 16-byte
// load per thread. Lane (g = lane/4, t = lane%4) loads w[n0+g][8t .. 8t+7] and x[g][8t ..],
// x[g+8][8t ..]; the first mma takes elements 0-3 of each (logical k 2t,2t+1 | 2t+8,2t+9 of the
// fragment layout), the second elements 4-7. A and B use the same permutation, so the sum is
// the plain dot product.
//
// A block (8 warps) owns NT tiles of 8 rows of w at a time and splits its K range over its warps
// (chunk c goes to warp c % 8). Each x fragment a warp loads feeds NT tiles: x is re-read from L2
// by every block, so with one tile per block the x traffic is (M > 8 ? 2 : 1) times the weight
// traffic and L2, not HBM, becomes the limit at M = 16; NT = 2 halves it. U chunks per tile are
// in flight per lane. The NT x 8 partial tiles are summed in shared memory in warp order.
//
// The grid is persistent: the launcher starts as many blocks as fit on the GPU at once (more
// resident warps = more weight loads in flight, which decides the speed; fewer blocks per SM
// measured 20-30% slower) and each block walks tiles with a grid stride, so no block pays a
// launch and ramp-up per tile.
// Needs K % 8 == 0 and 16-byte aligned x, w (the caller checks).
#pragma once
#include <type_traits>

#include "../common/pdl.cuh"
#include "../common/ptx.cuh"
#include "common.cuh"

namespace sqz::cuda::gemm_detail {

constexpr int kGemvTcWarps = 8;

template <class T, int NT, int U>
__global__ void __launch_bounds__(kGemvTcWarps * 32)
    gemv_tc_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                   int M, int N, int K) {
  __shared__ float red[kGemvTcWarps][NT][32][4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int tiles = (N + 8 * NT - 1) / (8 * NT);
  const bool v0 = g < M, v1 = g + 8 < M;
  const T* x0 = x + (size_t)min(g, M - 1) * K + 8 * t;
  const T* x1 = x + (size_t)min(g + 8, M - 1) * K + 8 * t;
  const uint4 zero = make_uint4(0, 0, 0, 0);

  // Full chunks, then the partial last one (K % 32 in {8, 16, 24}).
  const int full = K / 32, chunks = (K + 31) / 32;

  // Rows past N: clamped to a valid row for loading, never stored.
  auto row_ptrs = [&](int tile, const T* (&wr)[NT]) {
#pragma unroll
    for (int j = 0; j < NT; ++j) wr[j] = w + (size_t)min(tile * 8 * NT + 8 * j + g, N - 1) * K + 8 * t;
  };
  // No L2 prefetch of the first weights before the wait and no early trigger (see gemv.cuh).
  pdl_wait();

  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int n0 = tile * 8 * NT;
    const T* wr[NT];
    row_ptrs(tile, wr);
    float c[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
    int ch = warp;
    // Main loop: U full chunks per tile in flight, strided by the warp count.
    for (; ch + (U - 1) * kGemvTcWarps < full; ch += U * kGemvTcWarps) {
      uint4 wv[U][NT], xa[U], xb[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < NT; ++j) wv[u][j] = ld_stream(wr[j] + (size_t)(ch + u * kGemvTcWarps) * 32);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const size_t o = (size_t)(ch + u * kGemvTcWarps) * 32;
        xa[u] = v0 ? ld_act(x0 + o) : zero;
        xb[u] = v1 ? ld_act(x1 + o) : zero;
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_chunk32<T>(c[j], xa[u], xb[u], wv[u][j]);
    }
    // Remaining chunks one at a time; in a partial last chunk lanes past K load zeros.
    for (; ch < chunks; ch += kGemvTcWarps) {
      const size_t o = (size_t)ch * 32;
      const bool in = (int)o + 8 * t < K;
      const uint4 xa = (in && v0) ? __ldg(reinterpret_cast<const uint4*>(x0 + o)) : zero;
      const uint4 xb = (in && v1) ? __ldg(reinterpret_cast<const uint4*>(x1 + o)) : zero;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint4 wv = in ? ld_stream(wr[j] + o) : zero;
        mma_chunk32<T>(c[j], xa, xb, wv);
      }
    }

#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][j][lane][i] = c[j][i];
    __syncthreads();
    // Warp j < NT finishes tile j: sums the 8 partial tiles in warp order.
    if (warp < NT) {
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float a = 0.f;
#pragma unroll
        for (int k = 0; k < kGemvTcWarps; ++k) a += red[k][warp][lane][i];
        v[i] = a;
      }
      // C fragment: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at (row g+8, same cols); col = w row.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = g + (i >> 1) * 8, n = n0 + 8 * warp + 2 * t + (i & 1);
        if (m < M && n < N) {
          float o = v[i];
          if (bias) o += to_f<T>(bias[n]);
          y[(size_t)m * N + n] = from_f<T>(o);
        }
      }
    }
    __syncthreads();  // red is free for the next tile
  }
}
}  // namespace sqz::cuda::gemm_detail
