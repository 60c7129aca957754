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
// A block (8 warps) owns NT tiles of 8 rows of w and splits K over its warps (chunk c goes to
// warp c % 8). Each x fragment a warp loads feeds NT tiles: x is re-read from L2 by every block,
// so with one tile per block the x traffic is (M > 8 ? 2 : 1) times the weight traffic and L2,
// not HBM, becomes the limit at M = 16; NT = 4 cuts it to a half or a quarter. NT is chosen by
// the launcher so that narrow N still has enough blocks. U chunks per tile are in flight per
// lane. The NT x 8 partial tiles are summed in shared memory in warp order (deterministic).
// Needs K % 8 == 0 and 16-byte aligned x, w (the caller checks).
//
// Fusions (fuse.cuh): with NORM, the lanes that load row g (and g+8) of x also sum its squares
// and scale it by gamma (rounded back to the operand dtype, as the unfused norm's output would
// be); the per-row 1/rms is applied to the finished tile. In silu-pairs mode tile row 2i is
// gate row p0+i and tile row 2i+1 the matching up row, so the C fragment's column pair
// (2t, 2t+1) held by one lane is exactly (gate, up) of output p0+t.
#pragma once
#include <type_traits>

#include "../common/pdl.cuh"
#include "common.cuh"
#include "fuse.cuh"

namespace sqz::cuda::gemm_detail {

constexpr int kGemvTcWarps = 8;

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

// Eight operand values (one uint4) scaled by eight gamma values, rounded back to T; their
// squares (before scaling) are added to ss.
template <class T>
__device__ __forceinline__ uint4 norm_scale(uint4 xv, uint4 gv, float& ss) {
  uint32_t xs[4] = {xv.x, xv.y, xv.z, xv.w};
  const uint32_t gs[4] = {gv.x, gv.y, gv.z, gv.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = pair_to_f2<T>(xs[i]), b = pair_to_f2<T>(gs[i]);
    ss = fmaf(a.x, a.x, ss);
    ss = fmaf(a.y, a.y, ss);
    const T lo = from_f<T>(a.x * b.x), hi = from_f<T>(a.y * b.y);
    xs[i] = (uint32_t)(*reinterpret_cast<const uint16_t*>(&lo)) | ((uint32_t)(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
  }
  return make_uint4(xs[0], xs[1], xs[2], xs[3]);
}

template <class T, int NT, int U, bool NORM = false>
__global__ void __launch_bounds__(kGemvTcWarps * 32)
    gemv_tc_kernel(T* y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, int M, int N,
                   int K, GemvFuse fuse) {
  __shared__ float red[kGemvTcWarps][NT][32][4];
  __shared__ float red_ss[kGemvTcWarps][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const bool pairs = fuse.mode == kFuseSiluPairs;
  const int P = N / 2;
  // Plain: tile j holds rows n0+8j .. n0+8j+7. Pairs: tile j holds outputs q0+4j .. q0+4j+3.
  const int n0 = blockIdx.x * 8 * NT, q0 = blockIdx.x * 4 * NT;
  // Rows past N / M: clamped to a valid row for loading (w) or replaced by zeros (x); never stored.
  const T* wr[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    int row;
    if (pairs) row = (g & 1) * P + min(q0 + 4 * j + (g >> 1), P - 1);
    else row = min(n0 + 8 * j + g, N - 1);
    wr[j] = w + (size_t)row * K + 8 * t;
  }
  const T* gm = NORM ? static_cast<const T*>(fuse.gamma) + 8 * t : nullptr;
  float ssa = 0.f, ssb = 0.f;
  const bool v0 = g < M, v1 = g + 8 < M;
  const T* x0 = x + (size_t)min(g, M - 1) * K + 8 * t;
  const T* x1 = x + (size_t)min(g + 8, M - 1) * K + 8 * t;
  const uint4 zero = make_uint4(0, 0, 0, 0);

  const int chunks = (K + 31) / 32;  // the last one may be partial (K % 32 in {8, 16, 24})
  const int full = K / 32;
  // The weights do not depend on earlier kernels: start pulling the first round into L2 while
  // the previous kernel drains (programmatic dependent launch), then wait for x.
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (warp + u * kGemvTcWarps < full)
#pragma unroll
      for (int j = 0; j < NT; ++j) prefetch_l2(wr[j] + (size_t)(warp + u * kGemvTcWarps) * 32);
  pdl_wait();
  pdl_trigger();

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
    if constexpr (NORM) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const uint4 gv = ld_act(gm + (size_t)(ch + u * kGemvTcWarps) * 32);
        xa[u] = norm_scale<T>(xa[u], gv, ssa);
        xb[u] = norm_scale<T>(xb[u], gv, ssb);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma_16816<T>(c[j], xa[u].x, xb[u].x, xa[u].y, xb[u].y, wv[u][j].x, wv[u][j].y);
        mma_16816<T>(c[j], xa[u].z, xb[u].z, xa[u].w, xb[u].w, wv[u][j].z, wv[u][j].w);
      }
  }
  // Remaining chunks one at a time; in a partial last chunk lanes past K load zeros.
  for (; ch < chunks; ch += kGemvTcWarps) {
    const size_t o = (size_t)ch * 32;
    const bool in = (int)o + 8 * t < K;
    uint4 xa = (in && v0) ? __ldg(reinterpret_cast<const uint4*>(x0 + o)) : zero;
    uint4 xb = (in && v1) ? __ldg(reinterpret_cast<const uint4*>(x1 + o)) : zero;
    if constexpr (NORM) {
      const uint4 gv = in ? __ldg(reinterpret_cast<const uint4*>(gm + o)) : zero;
      xa = norm_scale<T>(xa, gv, ssa);
      xb = norm_scale<T>(xb, gv, ssb);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint4 wv = in ? ld_stream(wr[j] + o) : zero;
      mma_16816<T>(c[j], xa.x, xb.x, xa.y, xb.y, wv.x, wv.y);
      mma_16816<T>(c[j], xa.z, xb.z, xa.w, xb.w, wv.z, wv.w);
    }
  }

#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][j][lane][i] = c[j][i];
  if constexpr (NORM) {
    // Rows g and g+8: sum the four lanes t of the group, then (below) the warps in order.
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      ssa += __shfl_xor_sync(0xffffffffu, ssa, o);
      ssb += __shfl_xor_sync(0xffffffffu, ssb, o);
    }
    if (t == 0) {
      red_ss[warp][g] = ssa;
      red_ss[warp][g + 8] = ssb;
    }
  }
  __syncthreads();
  // Warp j < NT finishes tile j: sums the 8 partial tiles in warp order.
  if (warp >= NT) return;
  const int j = warp;
  float s[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float a = 0.f;
#pragma unroll
    for (int k = 0; k < kGemvTcWarps; ++k) a += red[k][j][lane][i];
    s[i] = a;
  }
  float inv[2] = {1.f, 1.f};  // rows g, g+8
  if constexpr (NORM) {
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int k = 0; k < kGemvTcWarps; ++k) {
      a += red_ss[k][g];
      b += red_ss[k][g + 8];
    }
    inv[0] = rsqrtf(a / (float)K + fuse.eps);
    inv[1] = rsqrtf(b / (float)K + fuse.eps);
  }
  // C fragment: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at (row g+8, same cols); col = tile row.
  if (pairs) {
    const int q = q0 + 4 * j + t;  // c0/c2: gate row q, c1/c3: up row P + q
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = g + 8 * h;
      if (m < M && q < P) {
        float gv = s[2 * h] * inv[h], uv = s[2 * h + 1] * inv[h];
        if (bias) {
          gv += to_f<T>(bias[q]);
          uv += to_f<T>(bias[P + q]);
        }
        y[(size_t)m * P + q] = from_f<T>(silu_f(gv) * uv);
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = g + (i >> 1) * 8, n = n0 + 8 * j + 2 * t + (i & 1);
    if (m < M && n < N) {
      float v = s[i] * inv[i >> 1];
      if (bias) v += to_f<T>(bias[n]);
      T* out = y + (size_t)m * N + n;
      if (fuse.mode == kFuseResidual) v += to_f<T>(*out);
      *out = from_f<T>(v);
    }
  }
}

}  // namespace sqz::cuda::gemm_detail
