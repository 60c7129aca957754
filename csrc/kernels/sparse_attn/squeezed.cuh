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
#include "squeezed_layout.h"

namespace sqz::cuda::squeezed_kernels {


constexpr int kWarps = 8, kThreads = 32 * kWarps, kMaxDPL = 8;  // head_dim <= 256: 8 elements per lane

struct Args {
  const int* pt;
  const int* lens;
  const int* pre;
  const int* cof;    // [B] each sequence's context (-1: none)
  const int* table;  // [N, 6] the contexts (squeezed_layout.h)
  const float* cen;
  const int* cs;
  const int* ct;
  int64_t n_contexts, cen_len, cs_len, ct_len;
  unsigned char* flags;  // [B, Hq, C]: the clusters each (sequence, query head) attends to
  float* part;           // [B, Hq, S, D + 2]: each split's unnormalised sums, then its maximum and sum
  int64_t pages, ps, Hkv, maxp, G, Hq, D;
  int max_clusters, S;
  float scale;
};

// Whether (ka, ia) comes before (kb, ib): higher score first, ties to the lower cluster.
__device__ __forceinline__ bool before(float ka, int ia, float kb, int ib) { return ka > kb || (ka == kb && ia < ib); }

// Sequence b's length, the part of it it attends sparsely (0: none) and its context.
__device__ __forceinline__ void lengths(const Args& a, int64_t b, int64_t& len, int64_t& P, squeezed::Context& cx) {
  len = a.lens[b] > 0 ? a.lens[b] : 0;
  const bool has = squeezed::context_at(a.table, a.n_contexts, a.cof[b], a.Hkv, a.D, a.cen_len, a.cs_len, a.ct_len, a.max_clusters, cx);
  P = !has || (int64_t)a.pre[b] < 0 ? 0 : ((int64_t)a.pre[b] < len ? (int64_t)a.pre[b] : len);
}

template <class T>
__device__ __forceinline__ void load_query(const T* q, const Args& a, int64_t b, int64_t h, float* qf) {
  for (int64_t d = threadIdx.x; d < a.D; d += kThreads) qf[d] = to_f32(q[(b * a.Hq + h) * a.D + d]);
  __syncthreads();
}

// Step 1, grid (Hq, B): the query against its kv head's centroids, the scores sorted (bitonic, in
// shared memory), the topC clusters flagged.
template <class T>
__global__ void __launch_bounds__(kThreads) select_kernel(const T* __restrict__ q, Args a) {
  SQZ_DYNAMIC_SMEM(smem);
  const int64_t h = blockIdx.x, b = blockIdx.y, g = h / a.G;
  const int tid = threadIdx.x;
  int64_t len, P;
  squeezed::Context cx{};
  lengths(a, b, len, P, cx);
  if (P == 0) return;  // block-uniform
  const int64_t C = cx.C;
  int Cpad = 1;
  while (Cpad < C) Cpad <<= 1;
  float* qf = reinterpret_cast<float*>(smem);      // [D]
  float* key = qf + a.D;                            // [Cpad]
  int* idx = reinterpret_cast<int*>(key + Cpad);    // [Cpad]
  load_query(q, a, b, h, qf);
  for (int i = tid; i < Cpad; i += kThreads) {
    float s = -INFINITY;
    if (i < C) {
      const float* c = a.cen + cx.cen + (g * C + i) * a.D;
      s = 0.f;
      for (int64_t d = 0; d < a.D; ++d) s = fmaf(c[d], qf[d], s);
      if (s != s) s = -INFINITY;  // NaN sorts last
    }
    key[i] = s;
    idx[i] = i;
  }
  unsigned char* flags = a.flags + (b * a.Hq + h) * a.max_clusters;
  for (int64_t c = tid; c < C; c += kThreads) flags[c] = 0;
  __syncthreads();
  for (int k = 2; k <= Cpad; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < Cpad; i += kThreads) {
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
  const int64_t nkeep = cx.top < C ? cx.top : C;
  for (int i = tid; i < nkeep; i += kThreads) flags[idx[i]] = 1;  // padding sorts last: idx < C here
}

// Step 2, grid (Hq, B, S): split z of the attention. Its warps take the flagged clusters' token lists
// (cluster c to warp c mod 8S of the splits' warps) and the tokens after the context in 32-token
// steps dealt the same way, each with an online softmax 32 tokens a step: lane i scores token i
// against q (its own key row), the warp takes the step's maximum and sum once, then accumulates
// p * v with the lanes over the channels (each token's value row one coalesced read). The block's
// 8 states are merged in order into the split's partial.
template <class T>
__global__ void __launch_bounds__(kThreads) attend_kernel(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc, Args a) {
  SQZ_DYNAMIC_SMEM(smem);
  const int64_t h = blockIdx.x, b = blockIdx.y, z = blockIdx.z, g = h / a.G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t gw = z * kWarps + warp, W = (int64_t)a.S * kWarps;
  int64_t len, P;
  squeezed::Context cx{};
  lengths(a, b, len, P, cx);
  const int64_t C = cx.C, Pc = cx.P;
  float* qf = reinterpret_cast<float*>(smem);                            // [D]
  int* start = reinterpret_cast<int*>(qf + a.D);                         // [C + 1]
  unsigned char* keep = reinterpret_cast<unsigned char*>(start + C + 1);  // [C]
  float* part = reinterpret_cast<float*>(smem);                          // reused at the end: [kWarps][D + 2]
  load_query(q, a, b, h, qf);
  const bool sparse = P > 0;  // block-uniform
  if (sparse) {
    const unsigned char* flags = a.flags + (b * a.Hq + h) * a.max_clusters;
    for (int64_t c = tid; c < C; c += kThreads) keep[c] = flags[c];
    for (int64_t c = tid; c <= C; c += kThreads) {
      const int64_t v = a.cs[cx.start + g * (C + 1) + c];
      start[c] = (int)(v < 0 ? 0 : (v > Pc ? Pc : v));
    }
    __syncthreads();
    // the starts as a running maximum (Hillis-Steele; a barrier between the reads and the writes)
    for (int off = 1; off <= C; off <<= 1) {
      int v[(kSqueezedMaxClusters + 1 + kThreads - 1) / kThreads];
      int n = 0;
      for (int64_t c = tid; c <= C; c += kThreads, ++n) v[n] = c >= off ? max(start[c], start[c - off]) : start[c];
      __syncthreads();
      n = 0;
      for (int64_t c = tid; c <= C; c += kThreads, ++n) start[c] = v[n];
      __syncthreads();
    }
  }

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
    for (int64_t c = gw; c < C; c += W) {
      if (!keep[c]) continue;
      for (int64_t i0 = start[c]; i0 < start[c + 1]; i0 += 32) {
        const int64_t i = i0 + lane;
        int64_t t = -1;
        if (i < start[c + 1]) {
          const int64_t x = a.ct[cx.tok + g * Pc + i];
          if (x >= 0 && x < P) t = x;
        }
        step(t);
      }
    }
  for (int64_t t0 = P + 32 * gw; t0 < len; t0 += 32 * W) step(t0 + lane < len ? t0 + lane : -1);

  // the block's warps merged in order into this split's partial
  __syncthreads();  // qf, start and keep are dead; part[] reuses them
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
    float* dst = a.part + ((b * a.Hq + h) * a.S + z) * (a.D + 2);
    for (int64_t d = lane; d < a.D; d += 32) {
      float o = 0.f;
      for (int w = 0; w < kWarps; ++w) o = fmaf(part[w * (a.D + 2) + d], fw[w], o);
      dst[d] = o;
    }
    if (lane == 0) {
      dst[a.D] = M;
      dst[a.D + 1] = L;
    }
  }
}

// Step 3, grid (Hq, B): the splits' partials merged in split order, normalised.
template <class T>
__global__ void __launch_bounds__(kThreads) combine_kernel(T* __restrict__ out, Args a) {
  const int64_t h = blockIdx.x, b = blockIdx.y;
  const float* src = a.part + (b * a.Hq + h) * a.S * (a.D + 2);
  float M = -INFINITY;
  for (int z = 0; z < a.S; ++z) M = fmaxf(M, src[z * (a.D + 2) + a.D]);
  float L = 0.f;
  for (int z = 0; z < a.S; ++z) {
    const float mz = src[z * (a.D + 2) + a.D];
    if (M != -INFINITY && mz != -INFINITY) L += src[z * (a.D + 2) + a.D + 1] * expf(mz - M);
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  for (int64_t d = threadIdx.x; d < a.D; d += kThreads) {
    float o = 0.f;
    for (int z = 0; z < a.S; ++z) {
      const float mz = src[z * (a.D + 2) + a.D];
      if (M != -INFINITY && mz != -INFINITY) o = fmaf(src[z * (a.D + 2) + d], expf(mz - M), o);
    }
    out[(b * a.Hq + h) * a.D + d] = from_f32<T>(o * inv);
  }
}

}  // namespace sqz::cuda::squeezed_kernels
