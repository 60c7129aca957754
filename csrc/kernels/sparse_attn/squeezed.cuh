// The Squeezed Attention decode kernel (launched by squeezed.cu; a header so that it can also be built
// for the host by the kernel emulator of the tests, test/emu). See squeezed.cu for the design.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/common/dtype_cuda.cuh"
#include "kernels/common/dynamic_smem.cuh"
#include "kernels/common/random.h"
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

// Element offset of token t's row of sequence b and kv head g in the paged cache, or -1 where the
// page table cannot address it.
__device__ __forceinline__ int64_t row_offset(const Args& a, int64_t b, int64_t g, int64_t t) {
  const int64_t blk = t / a.ps;
  if (t < 0 || blk >= a.maxp) return -1;
  const int page = a.pt[b * a.maxp + blk];
  if (page < 0 || page >= a.pages) return -1;
  return ((page * a.ps + t % a.ps) * a.Hkv + g) * a.D;
}

// The sums of warp_inclusive_scan (dtype_cuda.cuh) over counts.
struct Plus {
  __device__ __forceinline__ int operator()(int p, int u) const { return p + u; }
};

// The cluster starts of context cx and kv head g into start[0..C] (shared memory, block-wide): each
// clamped to the token list, then taken as a running maximum, so that no device data can make a range
// run backwards or past the list. Thread t takes a contiguous run of the C + 1 entries: its loads are
// issued together, its run is scanned serially, and one max-scan of the runs' maxima over the block
// joins the runs (one barrier between). A Hillis-Steele scan over the entries took two barriers per
// step, 24 at C = 2048, in every split of the attend kernels.
__device__ __forceinline__ void load_cluster_starts(const Args& a, const squeezed::Context& cx, int64_t g, int* start) {
  constexpr int kRun = (kSqueezedMaxClusters + 1 + kThreads - 1) / kThreads;
  __shared__ int wmax[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t C = cx.C, Pc = cx.P, n = C + 1, per = (n + kThreads - 1) / kThreads, c0 = tid * per;
  const int* cs = a.cs + cx.start + g * (C + 1);
  int v[kRun];
#pragma unroll
  for (int i = 0; i < kRun; ++i) {
    const int64_t c = c0 + i, raw = i < per && c < n ? cs[c] : 0;
    v[i] = (int)(raw < 0 ? 0 : (raw > Pc ? Pc : raw));
  }
  int run = 0;  // the clamped starts are >= 0
#pragma unroll
  for (int i = 0; i < kRun; ++i) {
    run = max(run, v[i]);
    v[i] = run;
  }
  const int incl = warp_inclusive_scan(run, [](int p, int u) { return max(p, u); });
  if (lane == 31) wmax[warp] = incl;
  __syncthreads();
  int before = __shfl_sync(0xffffffffu, incl, lane > 0 ? lane - 1 : 0);  // the runs before this thread's
  if (lane == 0) before = 0;
  for (int w = 0; w < warp; ++w) before = max(before, wmax[w]);
#pragma unroll
  for (int i = 0; i < kRun; ++i)
    if (i < per && c0 + i < n) start[c0 + i] = max(before, v[i]);
  __syncthreads();
}

// Step 1, grid (Hq, B), kSelThreads per block: the query against its kv head's centroids, then the
// topC clusters flagged. Each warp scores NB centroids at a time with every load issued before the
// first product (16-byte loads along D where the rows allow), so a block waits about one memory
// latency per NB centroids of a warp, not one per element. The topC are found without sorting: a
// radix select over the scores' order-preserving bit patterns finds the topC-th largest, T, a byte at
// a time (4 passes: a 256-bin histogram of the candidates' next byte in shared memory, integer
// atomics, so the counts are exact whatever the order; then one warp finds the byte where the count
// from the top reaches topC); then every cluster above T is flagged, and of those equal to T the
// lower-indexed ones up to topC (the order of before()). (A bitonic sort of all C scores took 66
// barrier-separated passes and, with one latency per element of each centroid, made the select the
// larger part of a batch-1 call; a bit at a time took 32 block-wide counts, 64 barriers.)
constexpr int kSelWarps = 32, kSelThreads = 32 * kSelWarps, kSelBins = 256;

// Bits of a score whose unsigned order is the order of the scores: NaN counts as -inf and -0 as +0,
// as the comparison in before() has them (order_key alone would put NaN below -inf).
__device__ __forceinline__ uint32_t score_key(float s) {
  if (s != s) s = -INFINITY;
  if (s == 0.f) s = 0.f;
  return rnd::order_key(s);
}

template <class T>
__global__ void __launch_bounds__(kSelThreads) select_kernel(const T* __restrict__ q, Args a) {
  SQZ_DYNAMIC_SMEM(smem);
  const int64_t h = blockIdx.x, b = blockIdx.y, g = h / a.G;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t len, P;
  squeezed::Context cx{};
  lengths(a, b, len, P, cx);
  if (P == 0) return;  // block-uniform
  const int64_t C = cx.C;
  float* qf = reinterpret_cast<float*>(smem);          // [D]
  uint32_t* key = reinterpret_cast<uint32_t*>(qf + a.D);  // [C]
  int* red = reinterpret_cast<int*>(key + a.max_clusters);  // [kSelWarps]
  int* hist = red + kSelWarps;                              // [kSelBins], then the pass's byte and rank
  for (int64_t d = tid; d < a.D; d += kSelThreads) qf[d] = to_f32(q[(b * a.Hq + h) * a.D + d]);
  __syncthreads();

  // Scores: lane-partial sums in a fixed order, then a fixed shuffle order.
  constexpr int NB = 8;
  const float* cg = a.cen + cx.cen + g * C * a.D;
  const bool vec = a.D % 4 == 0 && (reinterpret_cast<uintptr_t>(cg) & 15) == 0;
  for (int64_t i0 = (int64_t)warp * NB; i0 < C; i0 += (int64_t)kSelWarps * NB) {
    float s[NB];
#pragma unroll
    for (int u = 0; u < NB; ++u) s[u] = 0.f;
    if (vec) {
      for (int64_t d0 = 4 * lane; d0 < a.D; d0 += 128) {
        float4 c4[NB];
#pragma unroll
        for (int u = 0; u < NB; ++u)
          c4[u] = i0 + u < C ? *reinterpret_cast<const float4*>(cg + (i0 + u) * a.D + d0) : make_float4(0.f, 0.f, 0.f, 0.f);
        const float4 q4 = *reinterpret_cast<const float4*>(qf + d0);
#pragma unroll
        for (int u = 0; u < NB; ++u) {
          s[u] = fmaf(c4[u].x, q4.x, s[u]);
          s[u] = fmaf(c4[u].y, q4.y, s[u]);
          s[u] = fmaf(c4[u].z, q4.z, s[u]);
          s[u] = fmaf(c4[u].w, q4.w, s[u]);
        }
      }
    } else {
      for (int64_t d = lane; d < a.D; d += 32) {
        float cv[NB];
#pragma unroll
        for (int u = 0; u < NB; ++u) cv[u] = i0 + u < C ? cg[(i0 + u) * a.D + d] : 0.f;
#pragma unroll
        for (int u = 0; u < NB; ++u) s[u] = fmaf(cv[u], qf[d], s[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < NB; ++u) {
      for (int o = 16; o > 0; o >>= 1) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
      if (lane == 0 && i0 + u < C) key[i0 + u] = score_key(s[u]);
    }
  }
  __syncthreads();

  unsigned char* flags = a.flags + (b * a.Hq + h) * a.max_clusters;
  const int64_t nkeep = cx.top < C ? cx.top : C;
  if (nkeep <= 0) {
    for (int64_t c = tid; c < C; c += kSelThreads) flags[c] = 0;
    return;
  }
  // T: the nkeep-th largest key, a byte at a time from the top (the candidates share the bytes found
  // so far); kk: T's rank among the candidates, counted from the top.
  uint32_t prefix = 0, mask = 0;
  int kk = (int)nkeep;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < kSelBins; i += kSelThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t c = tid; c < C; c += kSelThreads) {
      const uint32_t k = key[c];
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1);
    }
    __syncthreads();
    if (warp == 0) {
      // lane l holds bins 255 - 8l .. 248 - 8l (from the top); the candidates in the bins above them
      // by a scan over the lanes, then the bin where the count from the top reaches kk
      int cnt[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        cnt[j] = hist[kSelBins - 1 - 8 * lane - j];
        sum += cnt[j];
      }
      int above = warp_inclusive_scan(sum, Plus{}) - sum;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (above < kk && above + cnt[j] >= kk) {  // exactly one bin of one lane
          hist[kSelBins] = kSelBins - 1 - 8 * lane - j;
          hist[kSelBins + 1] = kk - above;
        }
        above += cnt[j];
      }
    }
    __syncthreads();
    prefix |= (uint32_t)hist[kSelBins] << shift;
    mask |= 255u << shift;
    kk = hist[kSelBins + 1];
    __syncthreads();  // every thread has read the byte before the next pass clears the bins
  }
  // Above T: flagged. Equal to T: the first `need` in cluster order, ranked by a scan over the block
  // in chunks of kSelThreads clusters.
  int gt = 0;
  for (int64_t c = tid; c < C; c += kSelThreads) gt += key[c] > prefix;
  const int64_t need = nkeep - block_sum(gt, red);
  __syncthreads();  // every thread has read red before the scan writes it
  int64_t before_chunk = 0;  // clusters equal to T in the chunks already done
  for (int64_t c0 = 0; c0 < C; c0 += kSelThreads) {
    const int64_t c = c0 + tid;
    const uint32_t kc = c < C ? key[c] : 0u;
    const int eq = c < C && kc == prefix;
    const int incl = warp_inclusive_scan(eq, Plus{});
    if (lane == 31) red[warp] = incl;
    __syncthreads();
    int64_t rank = before_chunk + incl - eq, total = 0;
    for (int w = 0; w < kSelWarps; ++w) {
      if (w < warp) rank += red[w];
      total += red[w];
    }
    __syncthreads();
    if (c < C) flags[c] = kc > prefix || (eq && rank < need) ? 1 : 0;
    before_chunk += total;
  }
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
    load_cluster_starts(a, cx, g, start);
  }

  const int dpl = (int)((a.D + 31) / 32);
  float m = -INFINITY, l = 0.f, acc[kMaxDPL];
#pragma unroll
  for (int i = 0; i < kMaxDPL; ++i) acc[i] = 0.f;
  auto row_of = [&](int64_t t) { return row_offset(a, b, g, t); };
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

// Lanes that share one token's row: ceil(D / 8) pieces of 8 channels, rounded up to a power of two.
SQZ_HD int lanes_per_token(int64_t D) {
  const int pieces = (int)((D + 7) / 8);
  int l = 1;
  while (l < pieces) l <<= 1;
  return l;
}

// Shared memory of attend_group_kernel: the prologue's cluster tables, then (reused) the warps' states.
SQZ_HD size_t group_smem_bytes(int64_t max_clusters, int GP, int64_t D) {
  const size_t pro = (size_t)(max_clusters + 1) * 8 + (size_t)max_clusters, merge = (size_t)kWarps * GP * (D + 2) * 4;
  return ((pro > merge ? pro : merge) + 15) / 16 * 16;
}

// Step 2 for GQA (and MHA), grid (Hkv, B, S): one block reads each key and value row once for the G
// query heads of its kv head. The prologue gives each cluster the mask of the group's heads that
// flagged it and lays the kept clusters' token lists end to end (a scan of their sizes), followed by
// the tokens after the context: a virtual list that the S splits cut into equal ranges, whatever the
// cluster sizes. A warp takes chunks of TPW x NS tokens of its split: lane j finds chunk token j (a
// binary search over the scan, the token list, the page table), then TPW tokens at a time are read
// by LPT lanes each (16-byte loads of 8 channels: D = 128 is 16 lanes, two tokens per warp load),
// scored against every head (a key row counts only for the heads that flagged its cluster), and
// merged into each head's online softmax once per chunk. A warp's state holds one maximum per head
// for all its token slots, so the slots' sums add at the end; the block's warps are merged in order
// into each head's split partial (the layout combine_kernel reads). GP: G rounded up to 1, 2, 4 or 8
// (heads past G stay empty). VEC: D % 8 == 0, so the pieces are 16-byte loads.
template <class T, int GP, bool VEC>
__global__ void __launch_bounds__(kThreads) attend_group_kernel(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc, Args a) {
  SQZ_DYNAMIC_SMEM(smem);
  constexpr int NS = GP >= 8 ? 2 : 4;
  __shared__ int tsum[kThreads];
  const int64_t g = blockIdx.x, b = blockIdx.y, z = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, G = (int)a.G;
  int64_t len, P;
  squeezed::Context cx{};
  lengths(a, b, len, P, cx);
  const int64_t C = cx.C, Pc = cx.P;
  int* start = reinterpret_cast<int*>(smem);                             // [C + 1]
  int* cum = start + (C + 1);                                            // [C + 1]
  unsigned char* hm = reinterpret_cast<unsigned char*>(cum + (C + 1));  // [C]
  float* mstate = reinterpret_cast<float*>(smem);                        // reused at the end: [kWarps][GP][D + 2]
  const bool sparse = P > 0;  // block-uniform
  int64_t nsp = 0;
  if (sparse) {
    // The group's flags without a branch per load (GP heads unrolled), so a thread's loads are in
    // flight together.
    const unsigned char* fl = a.flags + (b * a.Hq + g * G) * a.max_clusters;
#pragma unroll 2
    for (int64_t c = tid; c < C; c += kThreads) {
      unsigned m = 0;
#pragma unroll
      for (int hh = 0; hh < GP; ++hh)
        if (hh < G) m |= (fl[hh * a.max_clusters + c] != 0 ? 1u : 0u) << hh;
      hm[c] = (unsigned char)m;
    }
    load_cluster_starts(a, cx, g, start);
    // cum[c]: the kept tokens before cluster c (thread t scans clusters [t per, (t + 1) per))
    const int64_t per = (C + kThreads - 1) / kThreads, c0 = tid * per, c1 = c0 + per < C ? c0 + per : C;
    int local = 0;
    for (int64_t c = c0; c < c1; ++c) local += hm[c] ? start[c + 1] - start[c] : 0;
    tsum[tid] = local;
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the 256 thread sums: 8 per lane, then across the lanes
      constexpr int kPer = kThreads / 32;
      int mine = 0;
      for (int i = 0; i < kPer; ++i) mine += tsum[lane * kPer + i];
      int run = warp_inclusive_scan(mine, Plus{}) - mine;
      for (int i = 0; i < kPer; ++i) {
        const int x = tsum[lane * kPer + i];
        tsum[lane * kPer + i] = run;
        run += x;
      }
    }
    __syncthreads();
    int run = tsum[tid];
    for (int64_t c = c0; c < c1; ++c) {
      cum[c] = run;
      run += hm[c] ? start[c + 1] - start[c] : 0;
    }
    if (c1 == C && c0 < c1) cum[C] = run;
    __syncthreads();
    nsp = cum[C];
  }
  const int64_t ntot = nsp + (len - P), lo = ntot * z / a.S, hi = ntot * (z + 1) / a.S;
  const int LPT = lanes_per_token(a.D), TPW = 32 / LPT, CH = TPW * NS, slot = lane / LPT, d0 = 8 * (lane % LPT);
  const int full = (1 << G) - 1;

  float qv[GP][8], acc[GP][8], m[GP], l[GP];
#pragma unroll
  for (int hh = 0; hh < GP; ++hh) {
    m[hh] = -INFINITY;
    l[hh] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      acc[hh][e] = 0.f;
      const int64_t d = d0 + e;
      qv[hh][e] = hh < G && d < a.D ? to_f32(q[(b * a.Hq + g * G + hh) * a.D + d]) : 0.f;
    }
  }
  auto row_of = [&](int64_t t) { return row_offset(a, b, g, t); };
  auto load_piece = [&](const T* base, float (&f)[8]) {
    if constexpr (VEC) {
      if (d0 < a.D) {
        constexpr int kN = Vec16<T>::N;  // 8 (f16, bf16) or 4 (f32)
#pragma unroll
        for (int part = 0; part < 8 / kN; ++part) {
          const Vec16<T> v = load16(base + d0 + part * kN);
#pragma unroll
          for (int e = 0; e < kN; ++e) f[part * kN + e] = to_f32(v.v[e]);
        }
        return;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = 0.f;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = d0 + e < a.D ? to_f32(base[d0 + e]) : 0.f;
    }
  };

  for (int64_t c0 = lo + (int64_t)warp * CH; c0 < hi; c0 += (int64_t)kWarps * CH) {
    // lane j < CH resolves token c0 + j of the virtual list: its row and the heads it counts for
    long long row = -1;
    int mask = 0;
    {
      const int64_t i = c0 + lane;
      if (lane < CH && i < hi) {
        if (i < nsp) {
          int64_t L0 = 0, H0 = C;  // cum[L0] <= i < cum[H0]
          while (H0 - L0 > 1) {
            const int64_t mid = (L0 + H0) >> 1;
            if (cum[mid] <= i) L0 = mid;
            else H0 = mid;
          }
          const int64_t x = a.ct[cx.tok + g * Pc + start[L0] + (i - cum[L0])];
          if (x >= 0 && x < P) {
            row = row_of(x);
            mask = hm[L0];
          }
        } else {
          row = row_of(P + (i - nsp));
          mask = full;
        }
        if (row < 0) mask = 0;
      }
    }
    float kf[NS][8], vf[NS][8], sc[NS][GP];
    int mk[NS];
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const int j = s * TPW + slot;
      const long long r = __shfl_sync(0xffffffffu, row, j);
      mk[s] = __shfl_sync(0xffffffffu, mask, j);
      if (mk[s]) {
        load_piece(kc + r, kf[s]);
        load_piece(vc + r, vf[s]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kf[s][e] = vf[s][e] = 0.f;
      }
    }
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int hh = 0; hh < GP; ++hh) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(kf[s][e], qv[hh][e], d);
        for (int o = LPT >> 1; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        sc[s][hh] = (mk[s] >> hh) & 1 ? d * a.scale : -INFINITY;
      }
#pragma unroll
    for (int hh = 0; hh < GP; ++hh) {
      float mx = sc[0][hh];
#pragma unroll
      for (int s = 1; s < NS; ++s) mx = fmaxf(mx, sc[s][hh]);
      for (int o = LPT; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      if (mx == -INFINITY) continue;  // warp-uniform: no key of this chunk counts for head hh
      const float mn = fmaxf(m[hh], mx), f = expf(m[hh] - mn);  // m = -inf: f = 0
      l[hh] *= f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[hh][e] *= f;
      m[hh] = mn;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const float p = expf(sc[s][hh] - mn);  // -inf: 0
        l[hh] += p;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[hh][e] = fmaf(p, vf[s][e], acc[hh][e]);
      }
    }
  }
  // the token slots of the warp summed (they share each head's maximum); lanes of slot 0 keep them
#pragma unroll
  for (int hh = 0; hh < GP; ++hh) {
    for (int o = LPT; o < 32; o <<= 1) {
      l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], o);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[hh][e] += __shfl_xor_sync(0xffffffffu, acc[hh][e], o);
    }
  }
  __syncthreads();  // the cluster tables are dead; mstate reuses them
  const int64_t W = a.D + 2;
  if (slot == 0)
#pragma unroll
    for (int hh = 0; hh < GP; ++hh) {
      float* mine = mstate + (warp * GP + hh) * W;
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (d0 + e < a.D) mine[d0 + e] = acc[hh][e];
      if (lane == 0) {
        mine[a.D] = m[hh];
        mine[a.D + 1] = l[hh];
      }
    }
  __syncthreads();
  // the block's warps merged in order into each head's split partial
  for (int hh = warp; hh < G; hh += kWarps) {
    float M = -INFINITY;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, mstate[(w * GP + hh) * W + a.D]);
    float L = 0.f, fw[kWarps];
    for (int w = 0; w < kWarps; ++w) {
      const float mw = mstate[(w * GP + hh) * W + a.D];
      fw[w] = (M == -INFINITY || mw == -INFINITY) ? 0.f : expf(mw - M);
      L += mstate[(w * GP + hh) * W + a.D + 1] * fw[w];
    }
    float* dst = a.part + ((b * a.Hq + g * G + hh) * a.S + z) * W;
    for (int64_t d = lane; d < a.D; d += 32) {
      float o = 0.f;
      for (int w = 0; w < kWarps; ++w) o = fmaf(mstate[(w * GP + hh) * W + d], fw[w], o);
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
