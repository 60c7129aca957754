// Tensor-core GEMV for few rows (M <= 16) on Hopper: y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias), the
// weights streamed into a shared-memory ring by bulk copies, the work split evenly over the SMs.
//
// Why not the register-load GEMV (gemv_tc.cuh) here. ncu of it at M = 16, 11008x4096 (H200): 83%
// of the stall samples wait on the weight loads, 37% occupancy, DRAM 51% busy, while cuBLAS
// streams the same bytes with bulk copies into ~200 KB of shared memory per SM and keeps DRAM 71%
// busy. Two things cost: (1) the bytes in flight per SM are bounded by registers (a lane holds 16
// bytes per load), and (2) balance: a persistent grid that walks whole 16-row tiles gives
// ceil(688 / 528) = 2 tiles to some blocks and 1 to others at N = 11008, so the last third of the
// run has a third of the warps streaming.
//
// This kernel:
// * The work is split in units of (tile of R = 8·NT weight rows, 256 k), tile-major; a block takes a
//   contiguous range of units/blocks of them (stream-K), so every SM streams the same number of
//   bytes, within 512 bytes per row, whatever N and K are. One block per SM. It walks its range in
//   items of up to KS k that do not cross a KS boundary of a tile: only its first and last item can
//   be shorter. (Splitting in whole KS items left a whole item of imbalance: at N = 11008, K = 4096
//   and KS = 1024, 1376 items on 132 SMs gave 11 to some and 10 to others.)
// * One producer warp issues, per item, one bulk copy per weight row (KS·2 bytes: 2 KB at KS =
//   1024) into ring slot j % S, counted on that slot's "full" mbarrier, and refills a slot once the
//   8 consumer warps have arrived on its "empty" barrier. Weights need nothing from the previous
//   kernel, so the first S items are requested before griddepcontrol.wait (shared memory cannot be
//   evicted, unlike an L2 prefetch). Copies are large on purpose: the copy engine takes on the
//   order of 100 cycles per request, and 512-byte row pieces (KS = 256, tried first) capped the
//   kernel at 26% of copy bandwidth.
// * Consumer warp c reads chunks c, c + 8, ... (32 k each) of an item: lane (g, t) takes k = 8t..8t+7
//   of weight rows 8j+g as one 16-byte shared load per row tile (the k permutation of gemv_tc.cuh:
//   activations permuted alike, so the sum is the plain dot product), activation rows g and g+8
//   from L1/L2 one item ahead, then two mma.m16n8k16 per 8-row tile. Staged rows are KS·2 + 64
//   bytes apart: the 8 lanes of a load phase read rows g, g+1 in different bank halves.
// * When a block reaches the end of a tile (or of its range), its 8 warps' partial tiles are summed
//   in shared memory in warp order. A tile the block covered whole is written; a split tile is
//   written to the block's fp32 partial slot, and the last contributor to arrive (a per-tile
//   counter that it resets to 0 for the next launch) sums the contributors' slots in block order
//   and writes y: deterministic, no fp32 atomics on y.
// * K % 8 == 0 and 16-byte aligned x, w (bulk copies move 16-byte multiples); rows past N are
//   clamped for the copy and never stored; k past K is zeroed in the fragments.
#pragma once
#include <cstdint>

#include "../common/bulk_copy.cuh"
#include "../common/pdl.cuh"
#include "../common/ptx.cuh"
#include "common.cuh"

namespace sqz::cuda::gemm_detail {

constexpr int kBulkConsumerWarps = 8;
constexpr int kBulkThreads = (kBulkConsumerWarps + 1) * 32;
constexpr int kBulkSlotsPerBlock = 2;  // partial slots per block: its first and last tile

// Bytes per staged weight row of KS k: padded by 64 so that rows g and g+1 (the two rows of a
// 16-byte load phase) fall in different bank halves.
template <int KS> constexpr uint32_t bulk_row_bytes() { return KS * 2 + 64; }
template <int NT, int KS> constexpr uint32_t bulk_stage_bytes() { return 8 * NT * bulk_row_bytes<KS>(); }
template <int NT> constexpr uint32_t bulk_red_bytes() { return kBulkConsumerWarps * NT * 32 * 4 * 4; }
// Barriers (2 per slot, 8 bytes each, up to 32 slots), the reduction tile and a flag, then the ring.
template <int NT> constexpr uint32_t bulk_ring_offset() { return 512 + bulk_red_bytes<NT>() + 128; }
template <int NT, int KS> constexpr size_t bulk_smem_bytes(int S) {
  return bulk_ring_offset<NT>() + (size_t)S * bulk_stage_bytes<NT, KS>();
}

// A block's walk over its unit range [first, last) (units of uk k), in items that stop at KS
// boundaries of a tile and at the range's end. Incremental: one 64-bit division per block, not per
// item (per item it cost as many instructions as a 1024-k item's products).
struct BulkWalk {
  long long left;   // units of the range not yet walked
  int tile, ku;     // position: tile, unit within the tile
  int KU, per, uk, K;
  int k0 = 0, kn = 0, cur = 0;  // the current item: tile, first k, k count
  __device__ __forceinline__ BulkWalk(long long first, long long last, int KU_, int KS, int uk_, int K_)
      : left(last - first), KU(KU_), per(KS / uk_), uk(uk_), K(K_) {
    tile = (int)(first / KU_);
    ku = (int)(first - (long long)tile * KU_);
  }
  __device__ __forceinline__ bool more() const { return left > 0; }
  // Takes the next item (more() must hold).
  __device__ __forceinline__ void next() {
    int n = min(per - (ku & (per - 1)), KU - ku);  // per is a power of two
    if ((long long)n > left) n = (int)left;
    cur = tile;
    k0 = ku * uk;
    kn = min((ku + n) * uk, K) - k0;
    left -= n;
    ku += n;
    if (ku == KU) ku = 0, ++tile;
  }
  __device__ __forceinline__ bool ends_tile() const { return k0 + kn >= K; }
};

template <class T, int NT, int KS>
__global__ void __launch_bounds__(kBulkThreads, 1)
    gemv_bulk_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                     int M, int N, int K, int S, int uk, int* __restrict__ counters, float* __restrict__ partials) {
#ifdef SQZ_BULK_COPY
  constexpr int R = 8 * NT;
  constexpr int CPW = KS / 32 / kBulkConsumerWarps;  // 32-k chunks per consumer warp and item
  static_assert(CPW >= 1 && KS % (32 * kBulkConsumerWarps) == 0, "bulk GEMV stage");
  constexpr uint32_t kRow = bulk_row_bytes<KS>(), kStage = bulk_stage_bytes<NT, KS>();
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t base = smem_u32(smem);
  const uint32_t full0 = base, empty0 = base + 256;  // 8 bytes per slot
  float* red = reinterpret_cast<float*>(smem + 512);  // [warp][NT][lane][4]
  volatile int* flag = reinterpret_cast<volatile int*>(smem + 512 + bulk_red_bytes<NT>());
  const uint32_t ring = base + bulk_ring_offset<NT>();

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int tiles = (N + R - 1) / R, KU = (K + uk - 1) / uk;
  const long long I = (long long)tiles * KU, B = gridDim.x;
  const long long first = I * blockIdx.x / B, last = I * (blockIdx.x + 1) / B;

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, kBulkConsumerWarps);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (warp == kBulkConsumerWarps) {
    // Producer warp: lane r copies weight row r of each item (weights need nothing from the
    // previous kernel, so the first S items are requested before the wait).
    const uint64_t evict_first = l2_evict_first_policy();
    int slot = 0;
    uint32_t phase = 0;  // round j / S of the ring, mod 2
    BulkWalk it(first, last, KU, KS, uk, K);
    for (int j = 0; it.more(); ++j) {
      // From the second round on, wait for the consumers' release of the previous round's item.
      if (j >= S) mbar_wait(empty0 + 8 * slot, phase ^ 1);
      it.next();
      const uint32_t bytes = (uint32_t)(it.kn * 2);
      if (lane == 0) mbar_arrive_expect_tx(full0 + 8 * slot, (uint32_t)R * bytes);
      __syncwarp();
      if (lane < R) {
        const int n = min(it.cur * R + lane, N - 1);
        bulk_g2s(ring + slot * kStage + lane * kRow, w + (size_t)n * K + it.k0, bytes, full0 + 8 * slot, evict_first);
      }
      if (++slot == S) slot = 0, phase ^= 1;
    }
    pdl_wait();  // (the contract: every thread waits)
    return;
  }

  // Consumer warps.
  pdl_wait();
  const int g = lane >> 2, t = lane & 3;
  const bool v0 = g < M, v1 = g + 8 < M;
  const T* x0 = x + (size_t)min(g, M - 1) * K + 8 * t;
  const T* x1 = x + (size_t)min(g + 8, M - 1) * K + 8 * t;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const int first_tile = (int)(first / KU);

  // Activations of an item's chunks (from L1/L2), loaded one item ahead.
  uint4 xa[CPW], xb[CPW];
  auto load_x = [&](const BulkWalk& now, uint4 (&a)[CPW], uint4 (&b)[CPW]) {
    BulkWalk nx = now;  // the item after `now`
    const bool any = nx.more();
    if (any) nx.next();
#pragma unroll
    for (int c = 0; c < CPW; ++c) {
      const int kk = 32 * (warp + c * kBulkConsumerWarps), k = nx.k0 + kk;
      const bool in = any && kk + 8 * t < nx.kn;
      a[c] = in && v0 ? ld_act(x0 + k) : zero;
      b[c] = in && v1 ? ld_act(x1 + k) : zero;
    }
  };
  BulkWalk it(first, last, KU, KS, uk, K);
  load_x(it, xa, xb);

  int slot = 0;
  uint32_t phase = 0;
  while (it.more()) {
    it.next();
    const int tile = it.cur;
    uint4 wv[CPW][NT];
    mbar_wait(full0 + 8 * slot, phase);
    const uint32_t st = ring + slot * kStage + (uint32_t)(8 * t) * 2;
#pragma unroll
    for (int c = 0; c < CPW; ++c) {
      const bool in = 32 * (warp + c * kBulkConsumerWarps) + 8 * t < it.kn;
#pragma unroll
      for (int jn = 0; jn < NT; ++jn)
        wv[c][jn] = in ? ld_ring_v4(st + (8 * jn + g) * kRow + 64 * (warp + c * kBulkConsumerWarps)) : zero;
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty0 + 8 * slot);  // the slot's data is in registers
    if (++slot == S) slot = 0, phase ^= 1;
    uint4 xn[CPW], xm[CPW];
    load_x(it, xn, xm);
#pragma unroll
    for (int c = 0; c < CPW; ++c)
#pragma unroll
      for (int jn = 0; jn < NT; ++jn) mma_chunk32<T>(acc[jn], xa[c], xb[c], wv[c][jn]);
#pragma unroll
    for (int c = 0; c < CPW; ++c) xa[c] = xn[c], xb[c] = xm[c];
    if (!it.ends_tile() && it.more()) continue;
    // End of a tile (or of this block's range): sum the 8 warps' partials in warp order.
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        red[((warp * NT + jn) * 32 + lane) * 4 + e] = acc[jn][e];
        acc[jn][e] = 0.f;
      }
    named_barrier(1, kBulkConsumerWarps * 32);
    constexpr int PER = NT * 128 / (kBulkConsumerWarps * 32);  // outputs per consumer thread
    float v[PER];
#pragma unroll
    for (int r = 0; r < PER; ++r) {
      const int i = tid + r * kBulkConsumerWarps * 32;
      float a = 0.f;
#pragma unroll
      for (int k = 0; k < kBulkConsumerWarps; ++k) a += red[k * NT * 128 + i];
      v[r] = a;
    }
    const long long t0 = (long long)tile * KU;
    const bool whole = first <= t0 && t0 + KU <= last;
    bool write = whole;
    if (!whole) {
      float* mine = partials + (size_t)(2 * blockIdx.x + (tile == first_tile ? 0 : 1)) * (16 * R);
#pragma unroll
      for (int r = 0; r < PER; ++r) mine[tid + r * kBulkConsumerWarps * 32] = v[r];
      __threadfence();
      named_barrier(1, kBulkConsumerWarps * 32);
      const int bf = split_block_of(t0, I, B), bl = split_block_of(t0 + KU - 1, I, B);
      if (tid == 0) {
        const int prev = atomicAdd(counters + tile, 1);
        const int is_last = prev == bl - bf;
        if (is_last) atomicExch(counters + tile, 0);  // every contributor has arrived: ready for the next launch
        *flag = is_last;
      }
      named_barrier(1, kBulkConsumerWarps * 32);
      write = *flag != 0;
      if (write) {
        __threadfence();
#pragma unroll
        for (int r = 0; r < PER; ++r) v[r] = 0.f;
        for (int c = bf; c <= bl; ++c) {
          const int ctile = (int)((I * c / B) / KU);
          const float* p = partials + (size_t)(2 * c + (tile == ctile ? 0 : 1)) * (16 * R);
#pragma unroll
          for (int r = 0; r < PER; ++r) v[r] += __ldcg(p + tid + r * kBulkConsumerWarps * 32);
        }
      }
    }
    if (write) {
#pragma unroll
      for (int r = 0; r < PER; ++r) {
        // Output i = (jn, lane', e): C fragment e of lane' in 8-row tile jn.
        const int i = tid + r * kBulkConsumerWarps * 32, jn = i >> 7, ln = (i >> 2) & 31, e = i & 3;
        const int m = (ln >> 2) + 8 * (e >> 1), n = tile * R + 8 * jn + 2 * (ln & 3) + (e & 1);
        if (m < M && n < N) {
          float o = v[r];
          if (bias) o += to_f<T>(bias[n]);
          y[(size_t)m * N + n] = from_f<T>(o);
        }
      }
    }
    named_barrier(1, kBulkConsumerWarps * 32);  // red and flag are free again
  }
#endif
}

}  // namespace sqz::cuda::gemm_detail
