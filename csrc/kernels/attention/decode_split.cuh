// Pieces shared by the two split-KV decode kernels (decode.cu: CUDA cores, decode_mma.cu: tensor
// cores): the split bookkeeping, the fixed-order merge of the splits, and the end of a split (its
// warps merged, its partial written, the last block of a group merging all splits).
#pragma once
#include <cmath>

#include "common.cuh"

namespace sqz::cuda::attn {
namespace split_kv {

// Warps per block of the CUDA-core kernel, and finish_split's default; the tensor-core kernel
// has its own count (kMmaWarps, decode_mma.cu) and passes it to finish_split.
constexpr int kWarps = 4;
constexpr int kMaxSplits = 256;

// Max or sum over a warp (fixed xor tree: every lane gets the same, deterministic result).
template <bool MAX>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  return v;
}

// Tokens per split for a sequence of kend keys, decided in the kernel from the length of the
// moment (a graph captured once serves every length): the keys spread evenly over the planned
// splits, but no split shorter than the plan's floor p.chunk (below it the partials cost more
// than they save), in multiples of 16 (whole pages of typical sizes).
__host__ __device__ __forceinline__ int split_length(int kend, int splits, int chunk) {
  const int even = (kend + splits - 1) / splits;
  return ((even > chunk ? even : chunk) + 15) & ~15;
}
__device__ __forceinline__ int split_tokens(const Params& p, int kend) { return split_length(kend, p.splits, p.chunk); }

// Splits that hold keys (at least one, so an empty sequence still writes its zero row).
// Blocks of later splits exit at once and are never merged: a short context in a graph
// planned for a long one costs a few empty blocks, and still gets its parallelism.
__device__ __forceinline__ int active_splits(const Params& p, int kend) {
  if (kend <= 0) return 1;
  const int c = split_tokens(p, kend);
  return (kend + c - 1) / c;
}

// Query vector vi of a (sequence, kv head) group, the g query heads of GQA times the step's query
// rows, heads fastest: row j = vi / g of the step, query head kvh * g + vi % g.
struct QueryVec {
  int j, h;
};
__device__ __forceinline__ QueryVec query_vec(int vi, int kvh, int g) { return {vi / g, kvh * g + vi % g}; }
// Its row of the split workspace (ws_ml, ws_acc: p.splits partials per row).
__device__ __forceinline__ int64_t ws_row(const Params& p, int b, QueryVec v) {
  return ((int64_t)b * p.max_q + v.j) * p.Hq + v.h;
}

// Weighted sums of two output pairs of a query vector over its splits (combine_splits_warp), added
// one split at a time in the fixed order of the calls.
struct PairSums {
  float a0 = 0.f, a1 = 0.f, b0 = 0.f, b1 = 0.f;
  __device__ __forceinline__ void add(float w, float2 v, float2 u) {
    a0 = fmaf(w, v.x, a0);
    a1 = fmaf(w, v.y, a1);
    b0 = fmaf(w, u.x, b0);
    b1 = fmaf(w, u.y, b1);
  }
};

// The weight of a warp's (or split's) running state with maximum m, under the merged maximum M.
__device__ __forceinline__ float merge_weight(float m, float M) { return m == -INFINITY ? 0.f : exp2f(m - M); }

// The maximum of row r's running maxima over a block's NW warps (s_m[w * R + r]).
template <int R, int NW>
__device__ __forceinline__ float warps_max(const float* s_m, int r) {
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < NW; ++w) M = fmaxf(M, s_m[w * R + r]);
  return M;
}

// Merges the first `splits` splits of query vector qi (row out_row, head h) into out. One warp
// does it, with no block barrier, so a block merges several query vectors at once (a GQA group's
// heads in parallel instead of one after another). s_w: this warp's `splits` floats for the
// splits' weights; then each output pair is a fixed-order sum over splits, with several loads in
// flight (a decode step waits on this latency, not on bandwidth). Partials are read through L2
// (other blocks wrote them during this grid). Both merge paths (the last split block, and the
// combine kernel) run this function, so they give the same bits.
// With parts > 1, this warp writes only output pairs part*32 + lane + k*32*parts (several warps
// share one query vector when a block has fewer query vectors than warps).
template <class T, int EARLY = 8>
__device__ void combine_splits_warp(const Params& p, int64_t qi, int64_t out_row, int h, int splits, float* s_w,
                                    int part = 0, int parts = 1) {
  const int lane = threadIdx.x & 31;
  const float2* ml = reinterpret_cast<const float2*>(p.ws_ml + qi * p.splits * 2);  // (max, sum) per split
  const float* acc = p.ws_acc + qi * p.splits * p.D;
  T* out = static_cast<T*>(p.out) + (out_row * p.Hq + h) * p.D;
  // The end of every decode step waits on this function (the last split block runs it after all
  // others are done), so it is written as few dependent L2 round trips: the (max, sum) pairs of the
  // first 32 splits (one per lane) and the first EARLY splits' partials of this lane's first two
  // output pairs (head_dim <= 128 has no others) are requested at once, before the weights they are
  // multiplied with are known. Each output is the same fixed-order sum over the splits as ever.
  // Two output pairs per lane and pass: d2 and d2 + 32 parts. (EARLY: 16 in the tensor-core kernel;
  // 8 where the registers it takes would cost the CUDA-core kernels occupancy.)
  const int d2 = part * 32 + lane, e2 = d2 + 32 * parts;
  const bool one = d2 * 2 < p.D, two = e2 * 2 < p.D;
  const float* pa = acc + 2 * d2;
  const float* pb = acc + 2 * (two ? e2 : d2);
  float2 va[EARLY], vb[EARLY];
#pragma unroll
  for (int s = 0; s < EARLY; ++s) {
    const bool ok = one && s < splits;
    va[s] = ok ? __ldcg(reinterpret_cast<const float2*>(pa + (int64_t)s * p.D)) : make_float2(0.f, 0.f);
    vb[s] = ok ? __ldcg(reinterpret_cast<const float2*>(pb + (int64_t)s * p.D)) : make_float2(0.f, 0.f);
  }
  const float2 ml0 = lane < splits ? __ldcg(ml + lane) : make_float2(-INFINITY, 0.f);
  float m = ml0.x;
  for (int s = lane + 32; s < splits; s += 32) m = fmaxf(m, __ldcg(ml + s).x);
  const float M = warp_reduce<true>(m);
  float l = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float2 v = s == lane ? ml0 : __ldcg(ml + s);
    const float w = merge_weight(v.x, M);
    s_w[s] = w;
    l += w * v.y;
  }
  const float L = warp_reduce<false>(l);
  __syncwarp();  // s_w is published to the warp
  const float inv = L > 0.f ? 1.f / L : 0.f;  // no attendable key: the row is zero
  if (one) {
    PairSums sum;
#pragma unroll
    for (int s = 0; s < EARLY; ++s)
      if (s < splits) sum.add(s_w[s], va[s], vb[s]);
#pragma unroll 8
    for (int s = EARLY; s < splits; ++s) {
      const float2 v = __ldcg(reinterpret_cast<const float2*>(pa + (int64_t)s * p.D));
      const float2 u = __ldcg(reinterpret_cast<const float2*>(pb + (int64_t)s * p.D));
      sum.add(s_w[s], v, u);
    }
    *reinterpret_cast<uint32_t*>(out + 2 * d2) = pack2<T>(sum.a0 * inv, sum.a1 * inv);
    if (two) *reinterpret_cast<uint32_t*>(out + 2 * e2) = pack2<T>(sum.b0 * inv, sum.b1 * inv);
  }
  // later passes (head_dim above 128: the CUDA-core kernel)
  for (int d2n = d2 + 64 * parts; d2n * 2 < p.D; d2n += 64 * parts) {
    const int e2n = d2n + 32 * parts;
    const bool twon = e2n * 2 < p.D;
    const float* qa = acc + 2 * d2n;
    const float* qb = acc + 2 * (twon ? e2n : d2n);
    PairSums sum;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
      const float2 v = __ldcg(reinterpret_cast<const float2*>(qa + (int64_t)s * p.D));
      const float2 u = __ldcg(reinterpret_cast<const float2*>(qb + (int64_t)s * p.D));
      sum.add(s_w[s], v, u);
    }
    *reinterpret_cast<uint32_t*>(out + 2 * d2n) = pack2<T>(sum.a0 * inv, sum.a1 * inv);
    if (twon) *reinterpret_cast<uint32_t*>(out + 2 * e2n) = pack2<T>(sum.b0 * inv, sum.b1 * inv);
  }
  __syncwarp();  // s_w is free
}

// The block's warps merged into this split's partial (finish_split's first step), in two passes:
// first each row's maximum, its warps' weights (into shared memory) and the (max, sum) pair, then the
// accumulators four channels per thread and step. The weights are computed once per row, not once per
// (row, channel) as a per-element loop would (NW exponentials and 2 NW shared loads per channel, on the
// path every call waits on), and the accumulators move in 16-byte loads and stores: ~1 us of a GQA 32K
// call on the H100 (docs/ops.md). Where the workspace or head_dim does not allow 16-byte accesses, one
// channel per step. Each output is the same fixed-order sum over the warps either way.
template <int R, int NW>
__device__ void merge_block(const Params& p, int kvh, int qc, int b, int split, int g, int n, const float* s_m,
                               const float* s_l, const float* s_acc) {
  __shared__ float s_f[NW * R];
  __shared__ int64_t s_pi[R];  // each row's partial index, for the second pass
  const int rows = min(R, g * n - qc * R);  // active query vectors of the block
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const float M = warps_max<R, NW>(s_m, r);
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float f = merge_weight(s_m[w * R + r], M);
      s_f[w * R + r] = f;
      v += f * s_l[w * R + r];
    }
    const int64_t pi = ws_row(p, b, query_vec(qc * R + r, kvh, g)) * p.splits + split;
    s_pi[r] = pi;
    p.ws_ml[pi * 2] = M;
    p.ws_ml[pi * 2 + 1] = v;
  }
  __syncthreads();
  if (p.D % 4 == 0 && (reinterpret_cast<uintptr_t>(p.ws_acc) & 15u) == 0) {
    const int D4 = p.D / 4;
    for (int i = threadIdx.x; i < rows * D4; i += blockDim.x) {
      const int r = i / D4, d = (i % D4) * 4;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float f = s_f[w * R + r];
        const float4 a = *reinterpret_cast<const float4*>(s_acc + (w * R + r) * p.D + d);
        v.x += f * a.x;
        v.y += f * a.y;
        v.z += f * a.z;
        v.w += f * a.w;
      }
      *reinterpret_cast<float4*>(p.ws_acc + s_pi[r] * p.D + d) = v;
    }
  } else {
    for (int i = threadIdx.x; i < rows * p.D; i += blockDim.x) {
      const int r = i / p.D, d = i % p.D;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) v += s_f[w * R + r] * s_acc[(w * R + r) * p.D + d];
      p.ws_acc[s_pi[r] * p.D + d] = v;
    }
  }
}

// The end of a split: merges the block's warps (their running max s_m[w * R + r], sum
// s_l[w * R + r] and accumulator s_acc[(w * R + r) * D + d] for query vector r of the block)
// into this split's partial of every active query vector; then, with arrival counters, the
// last block of the (sequence, kv head, query chunk) group to get here merges all splits.
// Called by every thread of a block that wrote its partial state to shared memory and passed
// a barrier (NW warps); s_acc must hold at least NW * splits floats (reused for the splits' weights).
template <class T, int R, int NW = kWarps, int EARLY = 8>
__device__ void finish_split(const Params& p, int kvh, int qc, int b, int split, int splits, int g, int n, int q0,
                             const float* s_m, const float* s_l, float* s_acc) {
  merge_block<R, NW>(p, kvh, qc, b, split, g, n, s_m, s_l, s_acc);
  if (p.counters == nullptr) return;

  // The last split block of this group to arrive merges all splits of its query vectors, a warp
  // per query vector.
  __shared__ int s_last;
  // One thread counts the block, with a release-acquire atomic: the barrier orders every thread's
  // partials before it (release), and the last block's reads after it (acquire, then the
  // barrier), the pattern of a grid barrier; no fence per thread.
  __syncthreads();
  if (threadIdx.x == 0) {
    int* ctr = p.counters + (int64_t)b * gridDim.x + blockIdx.x;
    const int prev = atom_add_acq_rel_gpu(ctr, 1);
    s_last = prev == splits - 1;
    if (s_last) *ctr = 0;  // ready for the next launch (stream order publishes it)
  }
  __syncthreads();
  if (!s_last) return;
  // Fewer query vectors than warps (MHA decode: one): the warps of a vector split its outputs.
  const int warp = threadIdx.x >> 5;
  const int rows = min(R, g * n - qc * R);
  const int parts = rows >= NW ? 1 : NW / max(rows, 1);
  if (warp >= rows * parts && rows < NW) return;
  for (int r = warp / parts; r < rows; r += NW / parts) {
    const QueryVec v = query_vec(qc * R + r, kvh, g);
    combine_splits_warp<T, EARLY>(p, ws_row(p, b, v), q0 + v.j, v.h, splits, s_acc + warp * splits, warp % parts, parts);
  }
}

}  // namespace split_kv
}  // namespace sqz::cuda::attn
