// GEMV for few rows (M <= 16): y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias). Memory-bound on w, so each
// weight is read exactly once, with 16-byte loads, and used for all M rows of x. A warp owns
// R output rows: its lanes stride over K in 8-element chunks, keep R*U chunk loads in flight,
// accumulate M*R partial sums in fp32 registers, and reduce them with shuffles (a fixed order:
// deterministic). x is small and shared by every warp, so it is read through L1/L2; the R
// rows per warp divide that traffic by R.
//
// The decoder's fusions (GemvFuse, see fuse.cuh) ride along: with NORM every warp also sums
// x^2 over the K it walks anyway, so the RMSNorm of x costs no extra pass; x is scaled by
// gamma as it is read and the row's 1/rms is applied to the finished dot products. In
// silu-pairs mode the R rows of a warp are R/2 gate rows and the matching up rows, so one
// lane holds both halves of an output; with ROPE (kFuseRopeAppend) they are R/2 rotation
// pairs (i, i + D/2) of the q|k|v heads, rotated and stored to q_out and the paged caches.
#pragma once
#include "../common/pdl.cuh"
#include "common.cuh"
#include "fuse.cuh"

namespace sqz::cuda::gemm_detail {

constexpr int kGemvWarps = 8;  // warps per block
constexpr int kGemvRows = 2;   // output rows per warp (default; the launcher may pick 1 or 4)

// Eight x values of row m at chunk c as floats; with NORM, adds their squares to ss and
// scales them by gamma.
template <class T, bool NORM>
__device__ __forceinline__ void x_chunk(const T* xr, const T* gamma, int c, float (&xf)[8], float& ss) {
  const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xr) + c);
  const uint32_t xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = pair_to_f2<T>(xs[i]);
    xf[2 * i] = f.x;
    xf[2 * i + 1] = f.y;
  }
  if constexpr (NORM) {
    const uint4 gv = __ldg(reinterpret_cast<const uint4*>(gamma) + c);
    const uint32_t gs[4] = {gv.x, gv.y, gv.z, gv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 g = pair_to_f2<T>(gs[i]);
      ss = fmaf(xf[2 * i], xf[2 * i], ss);
      ss = fmaf(xf[2 * i + 1], xf[2 * i + 1], ss);
      xf[2 * i] *= g.x;
      xf[2 * i + 1] *= g.y;
    }
  }
}

template <class T, int R>
__device__ __forceinline__ void dot_chunk(float& acc, const float (&xf)[8], uint4 wv) {
  const float2 w0 = pair_to_f2<T>(wv.x), w1 = pair_to_f2<T>(wv.y), w2 = pair_to_f2<T>(wv.z), w3 = pair_to_f2<T>(wv.w);
  float s = acc;
  s = fmaf(xf[0], w0.x, s); s = fmaf(xf[1], w0.y, s);
  s = fmaf(xf[2], w1.x, s); s = fmaf(xf[3], w1.y, s);
  s = fmaf(xf[4], w2.x, s); s = fmaf(xf[5], w2.y, s);
  s = fmaf(xf[6], w3.x, s); s = fmaf(xf[7], w3.y, s);
  acc = s;
}

// Where rotation pair pp (head pp / half, element pp % half) of q|k|v row m goes, ropeAppend's
// way: q heads rotated into q_out, k heads rotated into the key cache, v heads copied to the
// value cache; out is null where the row's slot is out of range. Worked out before the product
// (it needs only positions and the page table), so its loads overlap the weight stream instead
// of adding their latency to every warp's end.
template <class T> struct RopeTarget {
  T* out = nullptr;  // element i; its partner is out[half]
  float c = 1.f, s = 0.f;
  bool rotate = false;
};
template <class T>
__device__ __forceinline__ RopeTarget<T> rope_target(const GemvFuse& f, int m, long long pp) {
  const RopeAppendParams& p = f.rope;
  const int half = p.half, D = 2 * half;
  const int hh = (int)(pp / half), i = (int)(pp - (long long)hh * half);
  RopeTarget<T> t;
  t.rotate = hh < p.Hq + p.Hkv;
  if (t.rotate) rope_cos_sin(p, m, i, &t.c, &t.s);
  if (hh < p.Hq) {
    t.out = static_cast<T*>(f.q_out) + ((long long)m * p.Hq + hh) * D + i;
  } else {
    const long long dst = rope_slot_offset(p, m);
    if (dst >= 0)
      t.out = (hh < p.Hq + p.Hkv ? static_cast<T*>(f.kc) + dst + (long long)(hh - p.Hq) * D
                                 : static_cast<T*>(f.vc) + dst + (long long)(hh - p.Hq - p.Hkv) * D) + i;
  }
  return t;
}

// U: 16-byte chunks per row in flight per lane. VEC: K % 8 == 0 and every base pointer 16-byte
// aligned (each row then starts aligned); otherwise lanes read single elements (slower, still
// correct). NORM: fuse.gamma is set (RMSNorm of x fused in). ROPE:
// kFuseRopeAppend (rotation pairs, stored through rope_target; y is unused).
template <class T, int M, bool VEC, int U, int R = kGemvRows, bool NORM = false, bool ROPE = false>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(T* y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, int N, int K,
                GemvFuse fuse) {
  static_assert(R == 1 || R % 2 == 0, "rows per warp: 1 or even");
  static_assert(!ROPE || (R % 2 == 0 && M * R <= 32), "rotation pairs: an even number of rows, one pair per lane");
  const int lane = threadIdx.x & 31;
  const long long warp = (long long)blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  const bool pairs = !ROPE && fuse.mode == kFuseSiluPairs;  // R is even whenever the launcher sets it
  // Plain: rows n0 .. n0+R-1. Pairs: gate rows p0 .. p0+R/2-1 and up rows P+p0 ... ROPE:
  // rotation pairs p0 .. p0+R/2-1, first elements then their partners D/2 further.
  const long long P = N / 2;
  const long long n0 = (pairs || ROPE) ? warp * (R / 2) : warp * R;
  if (n0 >= ((pairs || ROPE) ? P : N)) {  // whole warp leaves together: no shuffle is left waiting
    pdl_wait();
    return;
  }
  long long rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if constexpr (ROPE) {
      const int half = fuse.rope.half;
      const long long pp = min(n0 + (r % (R / 2)), P - 1), hh = pp / half;
      rows[r] = hh * 2 * half + (pp - hh * half) + (r >= R / 2 ? half : 0);
    } else if (pairs) {
      rows[r] = r < R / 2 ? min(n0 + r, P - 1) : P + min(n0 + r - R / 2, P - 1);
    } else {
      rows[r] = min(n0 + r, (long long)N - 1);  // rows past N reread the last one, never stored
    }
  }
  const T* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = w + (size_t)rows[r] * K;
  const T* gamma = static_cast<const T*>(fuse.gamma);

  // No L2 prefetch of the first weights before the wait: launched early (PDL), this grid waits
  // while the previous GEMV streams its own weights through L2, which evicts such lines before
  // they are read; the prefetch only cost bandwidth. No early trigger either: the next kernel is
  // launched as this grid exits, so its waiting blocks never hold SM slots this grid's later
  // blocks need (see pdl.cuh for both measurements).
  pdl_wait();
  // ROPE: lane m * R + r (r < R/2) will store pair n0 + r of row m
  RopeTarget<T> tgt;
  if constexpr (ROPE) {
    const int m = lane / R, r = lane % R;
    if (m < M && r < R / 2 && n0 + r < P) tgt = rope_target<T>(fuse, m, n0 + r);
  }

  float acc[M][R], ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    ss[m] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  }

  if constexpr (VEC) {
    const int chunks = K >> 3;
    int c = lane;
    // Main loop: U chunks per row per lane, all weight loads issued before any math.
    for (; c + 32 * (U - 1) < chunks; c += 32 * U) {
      uint4 wv[U][R];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) wv[u][r] = ld_stream(wrow[r] + (size_t)(c + 32 * u) * 8);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xf[8];
          x_chunk<T, NORM>(x + (size_t)m * K, gamma, c + 32 * u, xf, ss[m]);
#pragma unroll
          for (int r = 0; r < R; ++r) dot_chunk<T, R>(acc[m][r], xf, wv[u][r]);
        }
    }
    // Remaining chunks (fewer than 32*U): one at a time.
    for (; c < chunks; c += 32) {
      uint4 wv[R];
#pragma unroll
      for (int r = 0; r < R; ++r) wv[r] = ld_stream(wrow[r] + (size_t)c * 8);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[8];
        x_chunk<T, NORM>(x + (size_t)m * K, gamma, c, xf, ss[m]);
#pragma unroll
        for (int r = 0; r < R; ++r) dot_chunk<T, R>(acc[m][r], xf, wv[r]);
      }
    }
  } else {
    for (int k = lane; k < K; k += 32) {
      float wf[R];
#pragma unroll
      for (int r = 0; r < R; ++r) wf[r] = to_f<T>(wrow[r][k]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf = to_f<T>(x[(size_t)m * K + k]);
        if constexpr (NORM) {
          ss[m] = fmaf(xf, xf, ss[m]);
          xf *= to_f<T>(gamma[k]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = fmaf(xf, wf[r], acc[m][r]);
      }
    }
  }

  // Butterfly reduction: every lane ends with the full sums; stores are spread over lanes so
  // the stores of one warp go out in parallel.
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      acc[m][r] = s;
    }
    if constexpr (NORM) {
      float s = ss[m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      ss[m] = rsqrtf(s / (float)K + fuse.eps);  // now 1/rms of row m
    }
  }
  if constexpr (ROPE) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R / 2; ++r) {
        if (lane != m * R + r || tgt.out == nullptr) continue;
        const float inv = NORM ? ss[m] : 1.f;
        float x1 = acc[m][r] * inv, x2 = acc[m][r + R / 2] * inv;
        if (bias) {
          x1 += to_f<T>(bias[rows[r]]);
          x2 += to_f<T>(bias[rows[r + R / 2]]);
        }
        // rounded as a plain store leaves q|k|v, so the rest is ropeAppend's arithmetic
        x1 = to_f<T>(from_f<T>(x1));
        x2 = to_f<T>(from_f<T>(x2));
        if (tgt.rotate) rope_apply(x1, x2, tgt.c, tgt.s, &x1, &x2);
        tgt.out[0] = from_f<T>(x1);
        tgt.out[fuse.rope.half] = from_f<T>(x2);
      }
  } else {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (lane != ((m * R + r) & 31)) continue;
        const float inv = NORM ? ss[m] : 1.f;
        if (pairs) {
          if (r >= R / 2 || n0 + r >= P) continue;
          float g = acc[m][r] * inv, u = acc[m][r + R / 2] * inv;
          if (bias) {
            g += to_f<T>(bias[rows[r]]);
            u += to_f<T>(bias[rows[r + R / 2]]);
          }
          y[(size_t)m * P + n0 + r] = from_f<T>(silu_f(g) * u);
        } else {
          const long long n = n0 + r;
          if (n >= N) continue;
          float v = acc[m][r] * inv;
          if (bias) v += to_f<T>(bias[n]);
          T* out = y + (size_t)m * N + n;
          if (fuse.mode == kFuseResidual) v += to_f<T>(*out);
          *out = from_f<T>(v);
        }
      }
  }
}

}  // namespace sqz::cuda::gemm_detail
