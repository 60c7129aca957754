// GEMV for few rows (M <= 16): y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias). Memory-bound on w, so each
// weight is read exactly once, with 16-byte loads, and used for all M rows of x. A warp owns
// R consecutive output rows: its lanes stride over K in 8-element chunks, keep R*U chunk loads
// in flight, accumulate M*R partial sums in fp32 registers, and reduce them with shuffles
// (a fixed order: deterministic). x is small and shared by every warp, so it is read through
// L1/L2; the R rows per warp divide that traffic by R.
#pragma once
#include "../common/pdl.cuh"
#include "common.cuh"

namespace sqz::cuda::gemm_detail {

constexpr int kGemvWarps = 8;  // warps per block
constexpr int kGemvRows = 2;   // output rows per warp (default; the launcher may pick 1 or 4)

// U: 16-byte chunks per row in flight per lane (the launcher picks 2 or 4).
// VEC: K % 8 == 0 and every base pointer 16-byte aligned (each row then starts aligned).
// Otherwise lanes read single elements (unaligned or odd K: slower, still correct).
template <class T, int M, bool VEC, int U, int R = kGemvRows>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                int N, int K) {
  const int lane = threadIdx.x & 31;
  const long long warp = (long long)blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  const long long n0 = warp * R;
  if (n0 >= N) {  // whole warp leaves together: no shuffle is left waiting
    pdl_wait();
    return;
  }
  // Rows past N reread the last valid row (in bounds) and are never stored.
  const T* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = w + (size_t)min(n0 + r, (long long)N - 1) * K;

  // Weights do not depend on earlier kernels: pull this warp's first round into L2 while the
  // previous kernel drains (programmatic dependent launch), then wait for x.
  if (VEC)
#pragma unroll
    for (int u = 0; u < U; ++u)
      if ((lane + 32 * u) * 8 < K)
#pragma unroll
        for (int r = 0; r < R; ++r) prefetch_l2(wrow[r] + (size_t)(lane + 32 * u) * 8);
  pdl_wait();
  pdl_trigger();

  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  if constexpr (VEC) {
    const int chunks = K >> 3;
    int c = lane;
    // Main loop: U chunks per row per lane, all loads issued before any math.
    for (; c + 32 * (U - 1) < chunks; c += 32 * U) {
      uint4 wv[U][R];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) wv[u][r] = ld_stream(wrow[r] + (size_t)(c + 32 * u) * 8);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K) + (c + 32 * u));
          const float2 x0 = pair_to_f2<T>(xv.x), x1 = pair_to_f2<T>(xv.y), x2 = pair_to_f2<T>(xv.z),
                       x3 = pair_to_f2<T>(xv.w);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const float2 w0 = pair_to_f2<T>(wv[u][r].x), w1 = pair_to_f2<T>(wv[u][r].y),
                         w2 = pair_to_f2<T>(wv[u][r].z), w3 = pair_to_f2<T>(wv[u][r].w);
            float s = acc[m][r];
            s = fmaf(x0.x, w0.x, s); s = fmaf(x0.y, w0.y, s);
            s = fmaf(x1.x, w1.x, s); s = fmaf(x1.y, w1.y, s);
            s = fmaf(x2.x, w2.x, s); s = fmaf(x2.y, w2.y, s);
            s = fmaf(x3.x, w3.x, s); s = fmaf(x3.y, w3.y, s);
            acc[m][r] = s;
          }
        }
      }
    }
    // Remaining chunks (fewer than 32*U): one at a time.
    for (; c < chunks; c += 32) {
      uint4 wv[R];
#pragma unroll
      for (int r = 0; r < R; ++r) wv[r] = ld_stream(wrow[r] + (size_t)c * 8);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K) + c);
        const float2 x0 = pair_to_f2<T>(xv.x), x1 = pair_to_f2<T>(xv.y), x2 = pair_to_f2<T>(xv.z),
                     x3 = pair_to_f2<T>(xv.w);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float2 w0 = pair_to_f2<T>(wv[r].x), w1 = pair_to_f2<T>(wv[r].y), w2 = pair_to_f2<T>(wv[r].z),
                       w3 = pair_to_f2<T>(wv[r].w);
          float s = acc[m][r];
          s = fmaf(x0.x, w0.x, s); s = fmaf(x0.y, w0.y, s);
          s = fmaf(x1.x, w1.x, s); s = fmaf(x1.y, w1.y, s);
          s = fmaf(x2.x, w2.x, s); s = fmaf(x2.y, w2.y, s);
          s = fmaf(x3.x, w3.x, s); s = fmaf(x3.y, w3.y, s);
          acc[m][r] = s;
        }
      }
    }
  } else {
    for (int k = lane; k < K; k += 32) {
      float wf[R];
#pragma unroll
      for (int r = 0; r < R; ++r) wf[r] = to_f<T>(wrow[r][k]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float xf = to_f<T>(x[(size_t)m * K + k]);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = fmaf(xf, wf[r], acc[m][r]);
      }
    }
  }

  // Butterfly reduction: every lane ends with the full sums; lane r*M.. stores are spread
  // over lanes so the stores of one warp go out in parallel.
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      acc[m][r] = s;
    }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const long long n = n0 + r;
      if (lane == ((m * R + r) & 31) && n < N) {
        float v = acc[m][r];
        if (bias) v += to_f<T>(bias[n]);
        y[(size_t)m * N + n] = from_f<T>(v);
      }
    }
}

}  // namespace sqz::cuda::gemm_detail
