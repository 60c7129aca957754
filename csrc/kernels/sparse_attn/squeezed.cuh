// The Squeezed Attention decode kernel (launched by squeezed.cu; a header so that it can also be built
// for the host by the kernel emulator of the tests, test/emu). See squeezed.cu for the design.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "kernels/common/dtype_cuda.cuh"
#include "kernels/common/dynamic_smem.cuh"
#include "squeezed.h"

namespace sqz::cuda::squeezed_kernels {


constexpr int kWarps = 8, kThreads = 32 * kWarps, kMaxDPL = 8;  // head_dim <= 256: 8 elements per lane

struct Args {
  const int* pt;
  const int* lens;
  const int* pre;
  const float* cen;
  const int* cs;
  const int* ct;
  int64_t pages, ps, Hkv, maxp, C, Pc, G, Hq, D;
  int Cpad, top_c;
  float scale;
};

// Whether (ka, ia) comes before (kb, ib): higher score first, ties to the lower cluster.
__device__ __forceinline__ bool before(float ka, int ia, float kb, int ib) { return ka > kb || (ka == kb && ia < ib); }

template <class T>
__global__ void __launch_bounds__(kThreads) squeezed_kernel(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ kc,
                                                            const T* __restrict__ vc, Args a) {
  SQZ_DYNAMIC_SMEM(smem);
  const int64_t h = blockIdx.x, b = blockIdx.y, g = h / a.G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* qf = reinterpret_cast<float*>(smem);                  // [D]
  float* key = qf + a.D;                                         // [Cpad]
  int* idx = reinterpret_cast<int*>(key + a.Cpad);               // [Cpad]
  int* start = idx + a.Cpad;                                     // [C + 1]
  unsigned char* keep = reinterpret_cast<unsigned char*>(start + a.C + 1);  // [C]
  float* part = reinterpret_cast<float*>(smem);                  // reused at the end: [kWarps][D + 2]

  const int64_t len = a.lens[b] > 0 ? a.lens[b] : 0;
  const int64_t P = (int64_t)a.pre[b] < 0 ? 0 : ((int64_t)a.pre[b] < len ? (int64_t)a.pre[b] : len);
  for (int64_t d = tid; d < a.D; d += kThreads) qf[d] = to_f32(q[(b * a.Hq + h) * a.D + d]);
  __syncthreads();
  const bool sparse = P > 0 && a.C > 0;
  if (sparse) {
    for (int i = tid; i < a.Cpad; i += kThreads) {
      float s = -INFINITY;
      if (i < a.C) {
        const float* c = a.cen + (g * a.C + i) * a.D;
        s = 0.f;
        for (int64_t d = 0; d < a.D; ++d) s = fmaf(c[d], qf[d], s);
        if (s != s) s = -INFINITY;  // NaN sorts last
      }
      key[i] = s;
      idx[i] = i;
    }
    for (int64_t c = tid; c <= a.C; c += kThreads) {
      const int64_t v = a.cs[g * (a.C + 1) + c];
      start[c] = (int)(v < 0 ? 0 : (v > a.Pc ? a.Pc : v));
    }
    for (int64_t c = tid; c < a.C; c += kThreads) keep[c] = 0;
    __syncthreads();
    // running maximum of the starts (Hillis-Steele, in place with a barrier between read and write)
    for (int off = 1; off <= a.C; off <<= 1) {
      int v[ (kSqueezedMaxClusters + 1 + kThreads - 1) / kThreads ];
      int n = 0;
      for (int64_t c = tid; c <= a.C; c += kThreads, ++n) v[n] = c >= off ? max(start[c], start[c - off]) : start[c];
      __syncthreads();
      n = 0;
      for (int64_t c = tid; c <= a.C; c += kThreads, ++n) start[c] = v[n];
      __syncthreads();
    }
    // bitonic sort of (score, cluster), best first
    for (int k = 2; k <= a.Cpad; k <<= 1)
      for (int j = k >> 1; j > 0; j >>= 1) {
        for (int i = tid; i < a.Cpad; i += kThreads) {
          const int ixj = i ^ j;
          if (ixj > i) {
            const bool up = (i & k) == 0;
            const float ki = key[i], kj = key[ixj];
            const int ii = idx[i], ij = idx[ixj];
            if (up ? before(kj, ij, ki, ii) : before(ki, ii, kj, ij)) {
              key[i] = kj; key[ixj] = ki;
              idx[i] = ij; idx[ixj] = ii;
            }
          }
        }
        __syncthreads();
      }
    const int64_t nkeep = (int64_t)a.top_c < a.C ? (int64_t)a.top_c : a.C;
    for (int i = tid; i < nkeep; i += kThreads) keep[idx[i]] = 1;
    __syncthreads();
  }

  // Online softmax over this warp's share of the visible keys, 32 tokens per step: lane i scores
  // token i of the step against q (its own key row, no shuffles), the warp takes the step's maximum
  // and sum once, then accumulates p * v with the lanes over the channels (each token's value row
  // one coalesced read), p and the row broadcast from the token's lane.
  const int dpl = (int)((a.D + 31) / 32);
  float m = -INFINITY, l = 0.f, acc[kMaxDPL];
#pragma unroll
  for (int i = 0; i < kMaxDPL; ++i) acc[i] = 0.f;
  // row offset of token t of this sequence and kv head, or -1 where it cannot be addressed
  auto row_of = [&](int64_t t) -> int64_t {
    const int64_t blk = t / a.ps;
    if (t < 0 || blk >= a.maxp) return -1;
    const int page = a.pt[b * a.maxp + blk];
    if (page < 0 || page >= a.pages) return -1;
    return ((page * a.ps + t % a.ps) * a.Hkv + g) * a.D;
  };
  // one step: lane i holds token t (t < 0: none)
  auto step = [&](int64_t t) {
    const int64_t base = t >= 0 ? row_of(t) : -1;
    float s = -INFINITY;
    if (base >= 0) {
      const T* kr = kc + base;
      float x = 0.f;
      for (int64_t d = 0; d < a.D; ++d) x = fmaf(to_f32(kr[d]), qf[d], x);
      s = x * a.scale;
    }
    float mx = s;
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (mx == -INFINITY) return;  // no key in this step (warp-uniform)
    const float mn = fmaxf(m, mx), f = expf(m - mn);
    const float p = base >= 0 ? expf(s - mn) : 0.f;
    float ps = p;
    for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
    l = l * f + ps;
#pragma unroll
    for (int i = 0; i < kMaxDPL; ++i) acc[i] *= f;
    m = mn;
    for (int j = 0; j < 32; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      const long long bj = __shfl_sync(0xffffffffu, (long long)base, j);
      if (bj < 0) continue;  // warp-uniform
      const T* vr = vc + bj;
#pragma unroll
      for (int i = 0; i < kMaxDPL; ++i) {
        const int64_t d = lane + 32 * i;
        if (i < dpl && d < a.D) acc[i] = fmaf(pj, to_f32(vr[d]), acc[i]);
      }
    }
  };
  if (sparse)
    for (int64_t c = warp; c < a.C; c += kWarps) {
      if (!keep[c]) continue;
      for (int64_t i0 = start[c]; i0 < start[c + 1]; i0 += 32) {
        const int64_t i = i0 + lane;
        int64_t t = -1;
        if (i < start[c + 1]) {
          const int64_t x = a.ct[g * a.Pc + i];
          if (x >= 0 && x < P) t = x;
        }
        step(t);
      }
    }
  for (int64_t t0 = P + 32 * warp; t0 < len; t0 += 32 * kWarps) step(t0 + lane < len ? t0 + lane : -1);

  // merge the warps in order
  __syncthreads();  // the selection arrays are dead; part[] reuses them
  float* mine = part + warp * (a.D + 2);
#pragma unroll
  for (int i = 0; i < kMaxDPL; ++i) {
    const int64_t d = lane + 32 * i;
    if (i < dpl && d < a.D) mine[d] = acc[i];
  }
  if (lane == 0) {
    mine[a.D] = m;
    mine[a.D + 1] = l;
  }
  __syncthreads();
  if (warp == 0) {
    float M = -INFINITY;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, part[w * (a.D + 2) + a.D]);
    float L = 0.f, fw[kWarps];
    for (int w = 0; w < kWarps; ++w) {
      const float mw = part[w * (a.D + 2) + a.D];
      fw[w] = (M == -INFINITY || mw == -INFINITY) ? 0.f : expf(mw - M);
      L += part[w * (a.D + 2) + a.D + 1] * fw[w];
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    for (int64_t d = lane; d < a.D; d += 32) {
      float o = 0.f;
      for (int w = 0; w < kWarps; ++w) o = fmaf(part[w * (a.D + 2) + d], fw[w], o);
      out[(b * a.Hq + h) * a.D + d] = from_f32<T>(o * inv);
    }
  }
}


}  // namespace sqz::cuda::squeezed_kernels
