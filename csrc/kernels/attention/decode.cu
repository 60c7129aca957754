// Split-KV flash-decoding over the paged cache on the CUDA cores, and the split planning of
// both decode kernels. The tensor-core kernel (decode_mma.cu) takes the groups of 3 or more
// query vectors per kv head (GQA, several query rows) where it has an instantiation (head_dim
// a multiple of 16 up to 128); this one takes the rest (MHA decode, head_dim 256 or not a
// multiple of 16) and serves as the A/B reference (SQUEEZELM_ATTN_SIMT=1).
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

#include "kernels/common/dynamic_smem.cuh"
#include "kernels/common/launch_config.h"
#include "kernels/common/pdl.cuh"
#include "kernels/common/process_buffer.h"
#include "common.cuh"
#include "decode_split.cuh"
#include "core/cuda_stream.h"
#include "core/env.h"
#include "core/error.h"
#include "launch.h"

namespace sqz::cuda::attn {

namespace {

using namespace split_kv;

// TPK lanes share one key (8 elements each, so D <= 8 * TPK); R query vectors per block; U key
// steps in flight per thread (0: the default, 2 from R = 8 on, else 4).
template <class T, int TPK, int R, int U_ = 0>
__global__ void __launch_bounds__(kWarps * 32) decode_partial(Params p) {
  constexpr int SLOTS = 32 / TPK;       // keys a warp reads at once
  constexpr int U = U_ > 0 ? U_ : (R >= 8 ? 2 : 4);
  constexpr int KPW = SLOTS * U;        // keys per warp iteration
  pdl_wait();  // see pdl.cuh: before any global access that matters
  pdl_trigger();
  __shared__ float s_m[kWarps][R], s_l[kWarps][R];
  SQZ_DYNAMIC_SMEM(s_acc_bytes);
  float* const s_acc = reinterpret_cast<float*>(s_acc_bytes);  // [kWarps][R][D]

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
    const int j = act ? vi / g : 0, h = kvh * g + (act ? vi % g : 0);  // query_vec(vi); a padding row: 0, kvh * g
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
  const int t0 = split * split_tokens(p, kend);
  const int t1 = min(kend, t0 + split_tokens(p, kend));

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

  finish_split<T, R>(p, kvh, qc, b, split, splits, g, n, q0, &s_m[0][0], &s_l[0][0], s_acc);
}

// One warp per (query head, row, sequence), when the partial kernel has no counters.
template <class T>
__global__ void __launch_bounds__(32) decode_combine(Params p) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  __shared__ float s_w[kMaxSplits];
  const int h = blockIdx.x, j = blockIdx.y, b = blockIdx.z;
  const int q0 = __ldg(p.cu_q + b);
  int n = __ldg(p.cu_q + b + 1) - q0;
  n = max(0, min(n, p.max_q));
  if (j >= n) return;
  const int len = max(__ldg(p.seq_lens + b), 0);
  const int kend = (int)min((int64_t)len, (int64_t)p.max_pages * p.page_size);
  combine_splits_warp<T>(p, ws_row(p, b, {j, h}), q0 + j, h, active_splits(p, kend), s_w);
}

// One query vector per block (MHA decode) streams 8 key steps per thread instead of 4: a 64-token
// split is one round of loads. H200, 32 heads x 128: 7.60 vs 7.94 us at 512 tokens, 40.96 vs
// 42.06 us at 8K, 134.6 vs 142.8 us at batch 8 x 4K, the same at 32K and 128K; a 7B decode step
// at context 512 4010 vs 4062 us. SQUEEZELM_ATTN_U=4 keeps 4 (A/B runs; read per launch and plan).
inline bool wide_steps(int R) { return R == 1 && env_int("SQUEEZELM_ATTN_U", 8) == 8; }

template <class T, int TPK, int R>
void launch_partial(const Params& p, int device, cudaStream_t stream) {
  dim3 grid(p.Hkv * p.qchunks, p.B, p.splits);
  size_t smem = sizeof(float) * kWarps * R * p.D;
  if constexpr (R == 1) {
    if (wide_steps(R)) return launch_pdl(decode_partial<T, TPK, R, 8>, dim3(grid), dim3(kWarps * 32), smem, stream, p);
  }
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

// The CUDA-core partial kernel for T (the in-kernel merge keeps each warp's splits' weights in
// the block's partial buffer: more splits than that fall back to the combine kernel).
template <class T>
void launch_partial_t(Params& p, int R, int device, cudaStream_t stream) {
  if (p.counters && p.splits > R * p.D) p.counters = nullptr;
  if (p.D <= 64) dispatch_r<T, 8>(p, R, device, stream);
  else if (p.D <= 128) dispatch_r<T, 16>(p, R, device, stream);
  else dispatch_r<T, 32>(p, R, device, stream);
}

template <int TPK>
int occupancy_r(int R, int D) {
  int n = 0;
  const size_t smem = sizeof(float) * kWarps * R * D;
  cudaError_t e = cudaErrorInvalidValue;
  switch (R) {
    case 1:
      e = wide_steps(R) ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_partial<__half, TPK, 1, 8>, kWarps * 32, smem)
                        : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_partial<__half, TPK, 1>, kWarps * 32, smem);
      break;
    case 2: e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_partial<__half, TPK, 2>, kWarps * 32, smem); break;
    case 4: e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_partial<__half, TPK, 4>, kWarps * 32, smem); break;
    default: e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_partial<__half, TPK, 8>, kWarps * 32, smem); break;
  }
  return e == cudaSuccess && n > 0 ? n : 1;
}

// Blocks of the partial kernel resident on one SM (registers bound it: ~70 per thread at
// R = 1, ~230 at R = 8). The bf16 instantiations use the same registers within a few.
int resident_blocks(int device, int D, int R) {
  const int ti = D <= 64 ? 0 : D <= 128 ? 1 : 2;
  return cached_per_device(device, ti * 16 + R + (wide_steps(R) ? 8 : 0), [&] {
    return ti == 0 ? occupancy_r<8>(R, D) : ti == 1 ? occupancy_r<16>(R, D) : occupancy_r<32>(R, D);
  });
}

}  // namespace

int* decode_counters(int device, int64_t n) {
  // Allocated and zeroed once per device (common/process_buffer.h); without it, the combine kernel.
  constexpr int64_t kCapacity = 1 << 16;
  if (n > kCapacity || std::getenv("SQUEEZELM_ATTN_COMBINE_KERNEL")) return nullptr;
  return static_cast<int*>(zeroed_process_buffer(device, ProcessBuffer::kDecodeCounters, kCapacity * sizeof(int)));
}

DecodePlan decode_plan(int device, int B, int Hq, int Hkv, int D, int max_q, int max_seq_len) {
  DecodePlan pl;
  const int g = Hq / Hkv;
  const int rtot = g * max_q;
  // The tensor-core kernel where at least 3 query vectors share a kv head and it has an
  // instantiation for head_dim. With one or two, the CUDA-core kernel does little redundant work
  // and keeps more warps in flight (H200, one query per kv head, 32 heads x 128: 134 vs 149 us at
  // 32K tokens, 509 vs 696 us at 128K); from GQA 4 on the tensor-core one wins (32q/8kv: 56 vs
  // 77 us at 32K, 157 vs 236 us at 128K). SQUEEZELM_ATTN_SIMT=1 keeps the CUDA-core kernel
  // everywhere (A/B runs; read per plan, so a workspace and its launches agree).
  pl.mma = rtot >= 3 && decode_mma_supported(D) && env_int("SQUEEZELM_ATTN_SIMT", 0) == 0;
  if (pl.mma) {
    pl.R = 16;
  } else {
    pl.R = rtot <= 1 ? 1 : rtot <= 2 ? 2 : rtot <= 4 ? 4 : 8;
  }
  pl.qchunks = (rtot + pl.R - 1) / pl.R;
  // The tensor-core kernel's splits are planned for one block per SM: fewer, longer splits pay
  // the start of a split and the final merge (the end of every decode step waits on both) fewer
  // times than a second block's extra bytes in flight buy back. (Its blocks are 8 warps now; at
  // head_dim 128 a second one no longer fits.) H200, 32q/8kv x128, graph replay, one / two
  // blocks of 4 warps per SM: batch 1 at 8K 15.9 / 16.5 us, 16K 26.5 /
  // 28.0, 32K 43.0-43.6 / 45.4-46.5, 64K 76.8 / 77.6, 128K 145.0 / 143.6; batch 2 at 8K 26.6 / 27.5;
  // batch 8 at 4K 43.2 / 44.5; batch 4 at 2K 16.0 / 15.3. SQUEEZELM_ATTN_MMA_PER_SM (tuning, read
  // per plan) sets another count, 0 = as many as fit.
  int per_sm = pl.mma ? decode_mma_resident_blocks(device, D) : resident_blocks(device, D, pl.R);
  if (const int cap = env_int("SQUEEZELM_ATTN_MMA_PER_SM", 1); pl.mma && cap > 0) per_sm = std::min(per_sm, cap);
  const int64_t slots = (int64_t)sm_count(device) * per_sm;
  const int64_t base = std::max<int64_t>(1, (int64_t)Hkv * pl.qchunks * B);
  // One full wave of blocks at the planned context, but no split shorter than 64 tokens (the
  // kernels spread the keys of the moment over the splits: split_tokens in decode_split.cuh).
  // SQUEEZELM_ATTN_MIN_CHUNK / _MAX_SPLITS override the 64-token floor and the split cap (tuning
  // runs only; read per plan, so a workspace and its launches agree). With the CUDA-core kernel,
  // a LLaMA-2-7B decode step at context 512 on an H200 (graph replay, batch 1) took 4028 us as
  // planned, 4093 / 4265 / 4626 us with at most 4 / 2 / 1 splits, 4108 / 4082 us with a 32- /
  // 128-token floor; batch 8: 5043 us as planned, 5118 / 5376 us with at most 2 / 1 splits.
  const int min_chunk = (std::max(16, env_int("SQUEEZELM_ATTN_MIN_CHUNK", 64)) + 15) / 16 * 16;
  const int max_splits = std::max(1, std::min(kMaxSplits, env_int("SQUEEZELM_ATTN_MAX_SPLITS", kMaxSplits)));
  int64_t splits = std::max<int64_t>(1, slots / base);
  splits = std::min<int64_t>(splits, std::max(1, (max_seq_len + min_chunk - 1) / min_chunk));
  splits = std::min<int64_t>(splits, max_splits);
  pl.splits = (int)splits;
  pl.chunk = min_chunk;
  if (pl.mma) {
    // the split length at the planned context, as the kernel computes it; SQUEEZELM_ATTN_MMA_DEEP=0 / 1
    // forces the shape at head_dim 128 (A/B runs; read per plan)
    const int tiles = split_length(max_seq_len, pl.splits, min_chunk) / 16;
    const int force = env_int("SQUEEZELM_ATTN_MMA_DEEP", -1);
    pl.deep_ring = force >= 0 ? (force > 0 && D == 128) : decode_mma_deep_ring(D, tiles, rtot);
  }
  return pl;
}

void launch_decode(Params& p, const DecodePlan& plan, DType dt, int device, cudaStream_t stream) {
  const bool f16 = dt == DType::F16;
  if (plan.mma) launch_decode_mma(p, plan.deep_ring, dt, stream);
  else if (f16) launch_partial_t<__half>(p, plan.R, device, stream);
  else launch_partial_t<__nv_bfloat16>(p, plan.R, device, stream);
  if (p.counters) return;  // the partial kernel merged the splits
  dim3 grid(p.Hq, p.max_q, p.B);
  if (f16) launch_pdl(decode_combine<__half>, grid, dim3(32), 0, stream, p);
  else launch_pdl(decode_combine<__nv_bfloat16>, grid, dim3(32), 0, stream, p);
}

}  // namespace sqz::cuda::attn
