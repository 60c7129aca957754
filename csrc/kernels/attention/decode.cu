// Split-KV flash-decoding over the paged cache.
//
// Grid (kv head x query chunk, sequence, split). One block streams the keys and values of
// its split once and scores them against every query vector that shares the kv head (the
// g query heads of GQA times the few query rows of a decode step): the cache is what costs
// bandwidth, so it is read once per group, 16 bytes per load, never staged through shared
// memory. Each warp keeps its own running max / sum / accumulator (online softmax in base
// 2), the block merges its warps, and writes one partial (max, sum, acc) per query vector
// and split. The splits are merged in a fixed order, so results do not depend on scheduling:
// the last block of a (sequence, kv head, query chunk) to finish does it (an arrival counter
// per group, reset by that block, so a captured graph replays with zeroed counters), which
// saves a kernel boundary per layer in a decode step; without counters a second kernel does it.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>

#include "../common/launch_config.h"
#include "../common/pdl.cuh"
#include "common.cuh"
#include "core/cuda_stream.h"
#include "core/env.h"
#include "core/error.h"
#include "launch.h"

namespace sqz::cuda::attn {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxSplits = 256;

// Sum over the block's threads (fixed shuffle tree, then warp order: deterministic).
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* s_red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  __syncthreads();  // s_red is free
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = v;
  __syncthreads();
  v = s_red[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) v = MAX ? fmaxf(v, s_red[w]) : v + s_red[w];
  return v;
}

// Splits that hold keys of a sequence with kend keys (at least one, so an empty sequence still
// writes its zero row). Blocks of later splits exit at once and are never merged: a graph
// planned for the longest context costs little at short ones.
__device__ __forceinline__ int active_splits(const Params& p, int kend) {
  return kend <= 0 ? 1 : min(p.splits, (kend + p.chunk - 1) / p.chunk);
}

// Merges the first `splits` splits of query vector qi (row q0 + j, head h) into out: the splits' weights in
// shared memory (s_w: at least `splits` floats), then each output element is a fixed-order sum
// over splits. Every loop keeps several loads in flight (a decode step waits on this latency,
// not on bandwidth). Partials are read through L2 (other blocks wrote them during this grid).
template <class T>
__device__ void combine_splits(const Params& p, int64_t qi, int64_t out_row, int h, int splits, float* s_w,
                               float* s_red) {
  const float2* ml = reinterpret_cast<const float2*>(p.ws_ml + qi * p.splits * 2);  // (max, sum) per split
  float m = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) m = fmaxf(m, __ldcg(ml + s).x);
  const float M = block_reduce<true>(m, s_red);
  float l = 0.f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float2 v = __ldcg(ml + s);
    const float w = v.x == -INFINITY ? 0.f : exp2f(v.x - M);
    s_w[s] = w;
    l += w * v.y;
  }
  const float L = block_reduce<false>(l, s_red);  // its barriers also publish s_w
  const float inv = L > 0.f ? 1.f / L : 0.f;     // no attendable key: the row is zero
  const float* acc = p.ws_acc + qi * p.splits * p.D;
  T* out = static_cast<T*>(p.out) + (out_row * p.Hq + h) * p.D;
  for (int d2 = threadIdx.x; d2 * 2 < p.D; d2 += blockDim.x) {
    float a0 = 0.f, a1 = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
      const float2 v = __ldcg(reinterpret_cast<const float2*>(acc + (int64_t)s * p.D + 2 * d2));
      a0 = fmaf(s_w[s], v.x, a0);
      a1 = fmaf(s_w[s], v.y, a1);
    }
    *reinterpret_cast<uint32_t*>(out + 2 * d2) = pack2<T>(a0 * inv, a1 * inv);
  }
  __syncthreads();  // s_w is free
}

// Before the wait on the previous kernel (a decode step's q projection and cache append): pull
// the keys and values of this block's first round (`tokens` from the split's start) into L2, so
// the round trip to HBM overlaps the previous kernel instead of following it. The length and
// page table are read speculatively (ld.cg: L2 only, no line is left in L1 to go stale) and feed
// nothing but prefetch addresses, always inside the pool; everything the kernel computes with is
// read again after the wait, so this is safe whoever writes those tensors.
template <class T>
__device__ __forceinline__ void prefetch_first_round(const Params& p, int tokens) {
  const int b = blockIdx.y, kvh = blockIdx.x / p.qchunks, t0 = blockIdx.z * p.chunk;
  const int kend = min(__ldcg(p.seq_lens + b), p.max_pages * p.page_size);
  const int n = min(tokens, kend - t0);
  if (n <= 0) return;
  const int lines = (p.D * (int)sizeof(T) + 127) / 128;  // 128-byte lines per key (and value)
  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  for (int i = threadIdx.x; i < n * 2 * lines; i += blockDim.x) {
    const int t = t0 + i / (2 * lines), part = i % (2 * lines);
    const int blk = p.page_shift >= 0 ? (t >> p.page_shift) : t / p.page_size;
    const int page = __ldcg(p.page_table + (int64_t)b * p.max_pages + blk);
    if (page < 0 || page >= p.pages) continue;
    const T* row = (part < lines ? kc : vc) + cache_offset(p, page, t, kvh);
    prefetch_l2(reinterpret_cast<const char*>(row) + 128 * (part % lines));
  }
}

// TPK lanes share one key (8 elements each, so D <= 8 * TPK); R query vectors per block.
template <class T, int TPK, int R>
__global__ void __launch_bounds__(kWarps * 32) decode_partial(Params p) {
  constexpr int SLOTS = 32 / TPK;       // keys a warp reads at once
  constexpr int U = R >= 8 ? 2 : 4;     // key steps in flight per thread
  constexpr int KPW = SLOTS * U;        // keys per warp iteration
  prefetch_first_round<T>(p, kWarps * KPW);
  pdl_wait();  // see pdl.cuh: before any global access that matters
  pdl_trigger();
  __shared__ float s_m[kWarps][R], s_l[kWarps][R];
  extern __shared__ float s_acc[];      // [kWarps][R][D]

  const int kvh = blockIdx.x / p.qchunks, qc = blockIdx.x % p.qchunks;
  const int b = blockIdx.y, split = blockIdx.z;
  const int g = p.Hq / p.Hkv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = lane / TPK, c = lane % TPK;
  const bool cact = c * 8 < p.D;

  const int q0 = __ldg(p.cu_q + b);
  int n = __ldg(p.cu_q + b + 1) - q0;
  const int len = max(__ldg(p.seq_lens + b), 0);
  n = max(0, min(n, p.max_q));
  const int kend = (int)min((int64_t)len, (int64_t)p.max_pages * p.page_size);

  // Query vector r of this block: vi = qc * R + r -> row j = vi / g, head kvh * g + vi % g.
  float q[R][8];
  int lim[R];  // last key position (inclusive) the vector may attend; -1 when inactive
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int vi = qc * R + r;
    const bool act = vi < g * n;
    const int j = act ? vi / g : 0, h = kvh * g + (act ? vi % g : 0);
    lim[r] = act ? len - n + j : -1;
#pragma unroll
    for (int e = 0; e < 8; ++e) q[r][e] = 0.f;
    if (act && cact) {
      const T* qp = static_cast<const T*>(p.q) + ((int64_t)(q0 + j) * p.Hq + h) * p.D + c * 8;
      unpack8<T>(*reinterpret_cast<const uint4*>(qp), q[r]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[r][e] *= p.scale_log2;
    }
  }

  const int splits = active_splits(p, kend);
  if (split >= splits) return;
  const int t0 = split * p.chunk;
  // The last split also takes anything past splits * chunk, so an understated maxSeqLen
  // costs speed, not correctness.
  const int t1 = split == p.splits - 1 ? kend : min(kend, t0 + p.chunk);

  float m[R], l[R], acc[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }

  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  for (int base = t0 + warp * KPW; base < t1; base += kWarps * KPW) {
    uint4 kr[U], vr[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = base + u * SLOTS + slot;
      int page = t < t1 ? page_of(p, b, t) : -1;
      ok[u] = page >= 0;
      kr[u] = make_uint4(0, 0, 0, 0);
      vr[u] = kr[u];
      if (ok[u] && cact) {
        const int64_t off = cache_offset(p, page, t, kvh) + c * 8;
        kr[u] = ld_stream(kc + off);
        vr[u] = ld_stream(vc + off);
      }
    }
    float s[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      unpack8<T>(kr[u], kf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(q[r][e], kf[e], d);
        s[u][r] = d;
      }
    }
    // Full dot products: sum over the TPK lanes of a key (every lane ends with the total).
#pragma unroll
    for (int off = TPK / 2; off >= 1; off >>= 1)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) s[u][r] += __shfl_xor_sync(0xffffffffu, s[u][r], off);

#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int t = base + u * SLOTS + slot;
        if (!ok[u] || t > lim[r]) s[u][r] = -INFINITY;
        mx = fmaxf(mx, s[u][r]);
      }
#pragma unroll
      for (int off = TPK; off < 32; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float mn = fmaxf(m[r], mx);
      const float ref = mn == -INFINITY ? 0.f : mn;  // all masked so far: keep zeros, no NaN
      const float alpha = exp2f(m[r] - ref);
      m[r] = mn;
      l[r] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) s[u][r] = exp2f(s[u][r] - ref);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      unpack8<T>(vr[u], vf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        l[r] += s[u][r];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(s[u][r], vf[e], acc[r][e]);
      }
    }
  }

  // Merge the key slots of the warp (m is already warp-uniform); l is duplicated across
  // the TPK lanes of a slot, so it is summed across slots only, like acc.
#pragma unroll
  for (int off = TPK; off < 32; off <<= 1)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], off);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], off);
    }
  if (lane == 0)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = l[r];
    }
  if (slot == 0 && cact)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int e = 0; e < 8; ++e) s_acc[(warp * R + r) * p.D + c * 8 + e] = acc[r][e];
  __syncthreads();

  // Merge the warps and write this split's partial for every active query vector.
  for (int i = threadIdx.x; i < R * (p.D + 1); i += blockDim.x) {
    const int r = i / (p.D + 1), d = i % (p.D + 1);  // d == D: the (max, sum) pair
    const int vi = qc * R + r;
    if (vi >= g * n) continue;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w][r]);
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = s_m[w][r] == -INFINITY ? 0.f : exp2f(s_m[w][r] - M);
      v += f * (d == p.D ? s_l[w][r] : s_acc[(w * R + r) * p.D + d]);
    }
    const int j = vi / g, h = kvh * g + vi % g;
    const int64_t qi = ((int64_t)b * p.max_q + j) * p.Hq + h;
    const int64_t pi = qi * p.splits + split;
    if (d == p.D) {
      p.ws_ml[pi * 2] = M;
      p.ws_ml[pi * 2 + 1] = v;
    } else {
      p.ws_acc[pi * p.D + d] = v;
    }
  }
  if (p.counters == nullptr) return;

  // The last split block of this group to arrive merges all splits of its query vectors.
  __shared__ int s_last;
  __shared__ float s_red[kWarps];
  __threadfence();  // this block's partials are visible before it is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    int* ctr = p.counters + (int64_t)b * gridDim.x + blockIdx.x;
    const int prev = atomicAdd(ctr, 1);
    s_last = prev == splits - 1;
    if (s_last) *ctr = 0;  // ready for the next launch
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int r = 0; r < R; ++r) {
    const int vi = qc * R + r;
    if (vi >= g * n) break;
    const int j = vi / g, h = kvh * g + vi % g;
    combine_splits<T>(p, ((int64_t)b * p.max_q + j) * p.Hq + h, q0 + j, h, splits, s_acc, s_red);
  }
}

// One block per (query head, row, sequence), when the partial kernel has no counters.
template <class T>
__global__ void __launch_bounds__(128) decode_combine(Params p) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  __shared__ float s_w[kMaxSplits];
  __shared__ float s_red[4];
  const int h = blockIdx.x, j = blockIdx.y, b = blockIdx.z;
  const int q0 = __ldg(p.cu_q + b);
  int n = __ldg(p.cu_q + b + 1) - q0;
  n = max(0, min(n, p.max_q));
  if (j >= n) return;
  const int len = max(__ldg(p.seq_lens + b), 0);
  const int kend = (int)min((int64_t)len, (int64_t)p.max_pages * p.page_size);
  combine_splits<T>(p, ((int64_t)b * p.max_q + j) * p.Hq + h, q0 + j, h, active_splits(p, kend), s_w, s_red);
}

template <class T, int TPK, int R>
void launch_partial(const Params& p, int device, cudaStream_t stream) {
  dim3 grid(p.Hkv * p.qchunks, p.B, p.splits);
  size_t smem = sizeof(float) * kWarps * R * p.D;
  launch_pdl(decode_partial<T, TPK, R>, dim3(grid), dim3(kWarps * 32), smem, stream, p);
}

template <class T, int TPK>
void dispatch_r(const Params& p, int R, int device, cudaStream_t stream) {
  switch (R) {
    case 1: launch_partial<T, TPK, 1>(p, device, stream); break;
    case 2: launch_partial<T, TPK, 2>(p, device, stream); break;
    case 4: launch_partial<T, TPK, 4>(p, device, stream); break;
    default: launch_partial<T, TPK, 8>(p, device, stream); break;
  }
}

template <class T>
void launch_t(Params& p, int R, int device, cudaStream_t stream) {
  // The in-kernel merge keeps the splits' weights in the block's partial buffer.
  if (p.counters && p.splits > kWarps * R * p.D) p.counters = nullptr;
  if (p.D <= 64) dispatch_r<T, 8>(p, R, device, stream);
  else if (p.D <= 128) dispatch_r<T, 16>(p, R, device, stream);
  else dispatch_r<T, 32>(p, R, device, stream);
  if (p.counters) return;  // the partial kernel merged the splits
  dim3 grid(p.Hq, p.max_q, p.B);
  launch_pdl(decode_combine<T>, dim3(grid), dim3(128), 0, stream, p);
}

template <int TPK>
int occupancy_r(int R, int D) {
  int n = 0;
  const size_t smem = sizeof(float) * kWarps * R * D;
  cudaError_t e = cudaErrorInvalidValue;
  switch (R) {
    case 1: e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_partial<__half, TPK, 1>, kWarps * 32, smem); break;
    case 2: e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_partial<__half, TPK, 2>, kWarps * 32, smem); break;
    case 4: e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_partial<__half, TPK, 4>, kWarps * 32, smem); break;
    default: e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_partial<__half, TPK, 8>, kWarps * 32, smem); break;
  }
  return e == cudaSuccess && n > 0 ? n : 1;
}

// Blocks of the partial kernel resident on one SM (registers bound it: ~70 per thread at
// R = 1, ~230 at R = 8). The bf16 instantiations use the same registers within a few.
int resident_blocks(int device, int D, int R) {
  static std::mutex mu;
  static int cached[64][3][4] = {};
  const int ti = D <= 64 ? 0 : D <= 128 ? 1 : 2;
  const int ri = R == 1 ? 0 : R == 2 ? 1 : R == 4 ? 2 : 3;
  std::lock_guard<std::mutex> lock(mu);
  int* slot = device >= 0 && device < 64 ? &cached[device][ti][ri] : nullptr;
  if (slot && *slot) return *slot;
  int cur = 0;
  cudaGetDevice(&cur);
  if (cur != device) cudaSetDevice(device);
  const int n = ti == 0 ? occupancy_r<8>(R, D) : ti == 1 ? occupancy_r<16>(R, D) : occupancy_r<32>(R, D);
  if (cur != device) cudaSetDevice(cur);
  if (slot) *slot = n;
  return n;
}

}  // namespace

int decode_max_r = 0;

int* decode_counters(int device, int64_t n) {
  constexpr int64_t kCapacity = 1 << 16;
  static std::mutex mu;
  static int* buf[64] = {};
  if (n > kCapacity || device < 0 || device >= 64 || std::getenv("SQUEEZELM_ATTN_COMBINE_KERNEL")) return nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (!buf[device]) {
    // Allocated and zeroed once per device (before any graph capture needs it: the first decode
    // call of a process is never captured, and a failure here just keeps the combine kernel).
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(cuda_stream(device), &st) != cudaSuccess || st != cudaStreamCaptureStatusNone) return nullptr;
    int* p = nullptr;
    if (cudaMalloc(&p, kCapacity * sizeof(int)) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    if (cudaMemset(p, 0, kCapacity * sizeof(int)) != cudaSuccess) {
      cudaGetLastError();
      cudaFree(p);
      return nullptr;
    }
    buf[device] = p;
  }
  return buf[device];
}

DecodePlan decode_plan(int device, int B, int Hq, int Hkv, int D, int max_q, int max_seq_len) {
  DecodePlan pl;
  const int g = Hq / Hkv;
  const int rtot = g * max_q;
  pl.R = rtot <= 1 ? 1 : rtot <= 2 ? 2 : rtot <= 4 ? 4 : 8;
  if (decode_max_r > 0 && pl.R > decode_max_r) pl.R = decode_max_r;
  pl.qchunks = (rtot + pl.R - 1) / pl.R;
  const int per_sm = resident_blocks(device, D, pl.R);
  const int64_t slots = (int64_t)sm_count(device) * per_sm;
  const int64_t base = std::max<int64_t>(1, (int64_t)Hkv * pl.qchunks * B);
  // One full wave of equally long blocks (no tail wave), but no split shorter than
  // 64 tokens: below that the partials cost more than they save.
  // SQUEEZELM_ATTN_MIN_CHUNK / _MAX_SPLITS override the 64-token floor and the split cap (tuning
  // runs only; read per plan, so a workspace and its launches agree). A LLaMA-2-7B decode step at
  // context 512 on an H200 (graph replay, batch 1): 4028 us as planned, 4093 / 4265 / 4626 us with
  // at most 4 / 2 / 1 splits, 4108 / 4082 us with a 32- / 128-token floor; batch 8: 5043 us as
  // planned, 5118 / 5376 us with at most 2 / 1 splits, the others within 0.2%.
  const int min_chunk = std::max(16, env_int("SQUEEZELM_ATTN_MIN_CHUNK", 64));
  const int max_splits = std::max(1, std::min(kMaxSplits, env_int("SQUEEZELM_ATTN_MAX_SPLITS", kMaxSplits)));
  int64_t splits = std::max<int64_t>(1, slots / base);
  splits = std::min<int64_t>(splits, std::max(1, (max_seq_len + min_chunk - 1) / min_chunk));
  splits = std::min<int64_t>(splits, max_splits);
  pl.splits = (int)splits;
  int chunk = (std::max(max_seq_len, 1) + pl.splits - 1) / pl.splits;
  chunk = (chunk + 15) / 16 * 16;  // whole pages of 16 for typical page sizes
  pl.chunk = chunk;
  // Splits made empty by the rounding add nothing.
  pl.splits = std::max(1, (std::max(max_seq_len, 1) + chunk - 1) / chunk);
  return pl;
}

void launch_decode(Params& p, int R, DType dt, int device, cudaStream_t stream) {
  if (dt == DType::F16) launch_t<__half>(p, R, device, stream);
  else launch_t<__nv_bfloat16>(p, R, device, stream);
}

}  // namespace sqz::cuda::attn
