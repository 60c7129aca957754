// Squeezed Attention, decode (one query row per sequence) over the paged fp16/bf16 cache.
//
// Why this shape. Per (sequence, query head) one block: the query is scored against the kv head's
// cluster centroids, the scores are sorted in shared memory (bitonic, ties to the lower cluster)
// and the topC clusters kept, then 4 warps walk the kept clusters' token lists (cluster c to warp
// c mod 4) and the tokens after the fixed context (token t to warp t mod 4), each with an online
// softmax; the 4 partial states are merged in a fixed order, so the result does not depend on
// timing. The cluster starts go through a running maximum (a scan in shared memory) clamped to the
// token list, and token positions outside the context are skipped: no device data can send the
// kernel outside its tensors. A first kernel: correct and deterministic; the selected keys are read
// once each, but one warp per token is latency-bound (to be measured on the GPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "core/cuda_stream.h"
#include "kernels/common/dtype_cuda.cuh"
#include "squeezed.h"

namespace sqz::cuda {
namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps, kMaxDPL = 8;  // head_dim <= 256: 8 elements per lane

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
  extern __shared__ __align__(16) unsigned char smem[];
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

  // online softmax over this warp's share of the visible keys
  const int dpl = (int)((a.D + 31) / 32);
  float m = -INFINITY, l = 0.f, acc[kMaxDPL];
#pragma unroll
  for (int i = 0; i < kMaxDPL; ++i) acc[i] = 0.f;
  auto take = [&](int64_t t) {
    const int64_t blk = t / a.ps;
    if (blk >= a.maxp) return;
    const int page = a.pt[b * a.maxp + blk];
    if (page < 0 || page >= a.pages) return;
    const int64_t base = ((page * a.ps + t % a.ps) * a.Hkv + g) * a.D;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxDPL; ++i) {
      const int64_t d = lane + 32 * i;
      if (i < dpl && d < a.D) s = fmaf(to_f32(kc[base + d]), qf[d], s);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    s *= a.scale;
    const float mn = fmaxf(m, s), f = expf(m - mn), p = expf(s - mn);
    l = l * f + p;
#pragma unroll
    for (int i = 0; i < kMaxDPL; ++i) {
      const int64_t d = lane + 32 * i;
      const float v = (i < dpl && d < a.D) ? to_f32(vc[base + d]) : 0.f;
      acc[i] = fmaf(acc[i], f, p * v);
    }
    m = mn;
  };
  if (sparse)
    for (int64_t c = warp; c < a.C; c += kWarps) {
      if (!keep[c]) continue;
      for (int64_t i = start[c]; i < start[c + 1]; ++i) {
        const int64_t t = a.ct[g * a.Pc + i];
        if (t >= 0 && t < P) take(t);
      }
    }
  for (int64_t t = P + warp; t < len; t += kWarps) take(t);

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

}  // namespace

void squeezed_attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
                        const Tensor& seq_lens, float scale, const Tensor& prefix_lens, const Tensor& centroids,
                        const Tensor& cluster_start, const Tensor& cluster_tokens, int top_c, cudaStream_t s) {
  Args a{};
  const int64_t B = q.dim(0);
  a.Hq = q.dim(1);
  a.D = q.dim(2);
  a.pages = kc.dim(0);
  a.ps = kc.dim(1);
  a.Hkv = kc.dim(2);
  a.maxp = page_table.dim(1);
  a.C = centroids.dim(1);
  a.Pc = cluster_tokens.dim(1);
  a.G = a.Hq / a.Hkv;
  a.pt = page_table.ptr<int>();
  a.lens = seq_lens.ptr<int>();
  a.pre = prefix_lens.ptr<int>();
  a.cen = centroids.ptr<float>();
  a.cs = cluster_start.ptr<int>();
  a.ct = cluster_tokens.ptr<int>();
  a.top_c = top_c;
  a.scale = scale;
  a.Cpad = 1;
  while (a.Cpad < a.C) a.Cpad <<= 1;
  if (B == 0 || a.Hq == 0) return;
  const size_t sel = (size_t)a.D * 4 + (size_t)a.Cpad * 8 + (size_t)(a.C + 1) * 4 + (size_t)a.C;
  const size_t merge = (size_t)kWarps * (a.D + 2) * 4;
  const size_t smem = (std::max(sel, merge) + 15) / 16 * 16;
  dispatch_float(q.dtype, "squeezedAttention", [&](auto tv) {
    using T = decltype(tv);
    auto kern = squeezed_kernel<T>;
    if (smem > 48 * 1024) cuda_check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "squeezedAttention: smem");
    kern<<<dim3((unsigned)a.Hq, (unsigned)B), kThreads, smem, s>>>(out.ptr<T>(), q.ptr<T>(), kc.ptr<T>(), vc.ptr<T>(), a);
  });
  cuda_check(cudaGetLastError(), "squeezedAttention: launch");
}

}  // namespace sqz::cuda
