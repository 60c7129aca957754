// Split-KV flash-decoding on the tensor cores (head_dim a multiple of 16, up to 128).
//
// Why a second decode kernel. The CUDA-core kernel (decode.cu) spends ~10 instructions per
// cache element once several query vectors share a kv head (GQA, or a few query rows per
// sequence): dot products, shuffles to sum them, and p·v, all per query vector. Here a block
// owns up to 16 query vectors of one kv head (the g query heads of GQA times the query rows of
// the step) as the M side of mma.sync m16n8k16, so a 16-token tile costs 2·D/16 products for
// the scores and D/8 for p·v whatever the number of query vectors, and the kernel is left
// with nothing to do but stream the cache. decode_plan sends it the groups of 3 or more query
// vectors per kv head; with one (MHA decode) 15 of 16 rows would be padding and the CUDA-core
// kernel, with more warps in flight per SM, streams as fast or faster (H200 numbers in
// decode.cu's decode_plan and bench/results/attention-h200.md).
//
// Streaming. Each warp walks its own tiles of the split (tile w, w + 8, ... of 16 tokens) and
// keeps a private ring of kStages shared-memory stages: while it multiplies one tile, the next
// kStages - 1 are in flight. Warps never wait on each other until the end of the split, so a slow
// page costs one warp, not the block. Keys and values are gathered through the page table: where a
// page holds whole tiles, one lookup per tile, fetched 32 tiles at a time ahead of use; otherwise one
// per token, shared by shuffle. At head_dim 64 and 128 with pages of whole tiles (on Hopper) a tile
// arrives as TMA boxes of 16 tokens x 64 channels, 128-byte swizzled, issued by one lane and counted
// on the stage's mbarrier: no load instruction per 16 bytes, no address arithmetic per lane. H100,
// 32q/8kv x128, batch 1, graph replay, same process, TMA / cp.async, us: 8K 14.16 / 16.43, 32K 53.54
// / 55.15, 128K 184.5 / 191.5, batch 8 at 4K 53.0 / 54.4. The boxes carry whole tiles, so the rows
// past the end of a sequence hold whatever the page holds: their values are zeroed before p.v (a
// NaN there times p = 0 would still poison the sums) and their scores masked. Elsewhere (cp.async)
// tokens outside the split, the page table or the pool are zero-filled and masked.
//
// The end of a split (warps merged, partial written, last block merging all splits) is shared
// with the CUDA-core kernel (decode_split.cuh), so both write the same workspace.
#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/dynamic_smem.cuh"
#include "kernels/common/hopper.h"
#include "kernels/common/launch_config.h"
#include "kernels/common/pdl.cuh"
#include "kernels/common/tensor_map.h"
#include "common.cuh"
#include "core/cuda_stream.h"
#include "core/env.h"
#include "core/error.h"
#include "decode_split.cuh"
#include "launch.h"

namespace sqz::cuda::attn {

namespace {

using namespace split_kv;

constexpr int kTile = 16;   // tokens per warp tile
// Warps per block, each with its own ring. Eight, where the CUDA-core kernel has four: the
// planner gives this kernel one block per SM (decode_plan), so the block's warps are all the
// SM streams with. H200, 32q/8kv x128, graph replay, same process, 4 / 8 warps (a probe whose
// merge loaded its inputs in another order, which measured no different): batch 1 at 8K
// 15.95 / 15.17 us, 32K 43.3-43.5 / 43.6, 128K 147.1 / 144.0; batch 8 at 4K 42.96 / 42.62. The
// attention bench, 4 warps (2abebae) / 8 (75939d7): 512 tokens 11.15 / 10.13 us, 8K 16.85 /
// 15.78, 32K 43.42 / 43.06, 128K 147.89 / 144.20, batch 8 at 4K 43.14 / 43.24.
// (More splits than one wave, so that the block scheduler balances the SMs, cost more than
// they balance: 32K with 2 / 4 / 8 times the splits 46.4 / 55.0 / 72.3 us at 4 warps, 51.6 /
// 65.2 at 8: every block pays its start and its end, ~7 us when they do not overlap.)
constexpr int kMmaWarps = 8;
constexpr int kRows = 16;   // query vectors per block (the m16 side of the product)
// The per-warp ring: one tile in use, two in flight (a 2-stage ring was slower on an H200: 58
// vs 55 us for GQA 32q/8kv at 32K tokens).
constexpr int kStages = 3;
// Short splits (head_dim 128): 4 warps with 6-stage rings (the same shared memory, five tiles in
// flight per warp instead of two), so a split of a few tiles has all of them requested at once
// and every warp has one. decode_plan picks it where a split holds at most kDeepRingTiles tiles
// and at most 4 query vectors share a kv head (with more, the last block's merge has fewer warps
// than vectors: 64q/8kv at 1K tokens took 11.8 us against 10.8 with 8 warps). H100, 32q/8kv x128,
// batch 1, graph replay, same process, 8 warps x 3 stages / 4 x 6, us: 512 tokens (8 splits of 4
// tiles) 9.70, 9.71 / 9.03, 8.95; 1K (16 splits of 4 tiles) 10.41, 10.34 / 9.69, 9.61; 2K (8
// tiles) 11.26, 11.25 / 10.37-10.74; 4K (16 tiles) 12.80, 12.75 / 12.95, 12.78; 8K 16.30, 16.31 /
// 17.38, 17.62; 32K 55.36, 55.26 / 55.55, 55.86; 128K 191.9, 192.1 / 196.6, 196.8; batch 4 at 1K
// 12.84 / 13.12-13.38. (6 x 4 and 5 x 5 lost at 8K and above too: 32K 56.9 / 58.4-58.8.) A
// LLaMA-3-8B-shaped decode step did not change with it (context 512: 5762.0 / 5762.3 us planned
// against 5762.3 / 5762.5 with 8 x 3 forced; 2048: 5864.7-5868.1 / 5864.8-5870.4).
constexpr int kDeepWarps = 4, kDeepStages = 6, kDeepRingTiles = 8;

// TMA: the tiles arrive as 2-D tensor boxes of 16 tokens x 64 channels (head_dim 64 or 128, pages of
// whole tiles), 128-byte swizzled and unpadded, one mbarrier per stage; otherwise by cp.async into
// rows padded by 16 bytes.
template <int D, int W = kMmaWarps, int ST = kStages, bool TMA = false>
struct MmaShape {
  static constexpr int SD = TMA ? D : D + 8;  // row pitch: cp.async +16 bytes for conflict-free ldmatrix (TMA: the swizzle)
  static constexpr int CH = D / 8;                        // 16-byte chunks per row
  static constexpr int STAGE = 2 * kTile * SD;            // elements of one stage (keys, then values)
  static constexpr size_t ring = (size_t)W * ST * STAGE * 2 + (TMA ? 1024 : 0);  // (+ the 1 KB alignment)
  static constexpr size_t merge = (size_t)W * kRows * D * sizeof(float);
  static constexpr size_t smem = ring > merge ? ring : merge;
};
// Byte offset of element (row, col) of a stage's key (or value) tile in the TMA layout: box col / 64,
// 128-byte lines, chunk (col % 64) / 8 swizzled by the row.
__device__ __forceinline__ uint32_t tma_tile_offset(int row, int col) {
  return (uint32_t)((col >> 6) * 2048 + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) + (col & 7) * 2);
}

// W warps per block, each with a ring of ST stages (kMmaWarps x kStages, or kDeepWarps x kDeepStages).
template <class T, int D, int W = kMmaWarps, int ST = kStages, bool TMA = false>
__global__ void __launch_bounds__(W * 32)
    decode_mma(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap kmap, const __grid_constant__ CUtensorMap vmap) {
  static_assert(D % 16 == 0 && D <= 128, "decode_mma: head_dim");
  static_assert(!TMA || D % 64 == 0, "decode_mma: TMA boxes of 64 channels");
  using S = MmaShape<D, W, ST, TMA>;
  constexpr int SD = S::SD, CH = S::CH, KS = D / 16, ND = D / 8;
  [[maybe_unused]] constexpr int kBoxes = D / 64;  // TMA boxes per tile of keys (and of values)
  pdl_wait();  // see pdl.cuh: before any global access that matters
  // No early trigger: the next kernel launches as this grid ends (its launch latency is still
  // hidden). Launched early, its blocks took this kernel's SMs while it ran: a GQA 8B-shaped
  // decode step on an H200 (context 512, graph replay) took 5219 us with the early trigger,
  // 4844 us without, 4853 us with no programmatic launches at all. (An L2 prefetch of each
  // block's first keys before the wait cost ~30 us per step in both kernels and was dropped.)
  SQZ_DYNAMIC_SMEM(smem);
  __shared__ float s_m[W * kRows], s_l[W * kRows];
  __shared__ unsigned s_ok[W * ST];  // per stage: bit i = token i of the tile is readable
  __shared__ __align__(8) uint64_t s_full[TMA ? W * ST : 1];  // TMA: per stage, its copies' bytes

  const int kvh = blockIdx.x / p.qchunks, qc = blockIdx.x % p.qchunks;
  const int b = blockIdx.y, split = blockIdx.z;
  const int g = p.Hq / p.Hkv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  const int q0 = __ldg(p.cu_q + b);
  int n = __ldg(p.cu_q + b + 1) - q0;
  const int len = max(__ldg(p.seq_lens + b), 0);
  n = max(0, min(n, p.max_q));
  const int kend = (int)min((int64_t)len, (int64_t)p.max_pages * p.page_size);
  const int splits = active_splits(p, kend);
  if (split >= splits) return;
  const int t0 = split * split_tokens(p, kend);
  const int t1 = min(kend, t0 + split_tokens(p, kend));

  // This thread's two rows of the m16 tile: query vector vi = qc * 16 + row -> query row
  // vi / g, head kvh * g + vi % g. Their A fragments stay in registers for the whole split.
  uint32_t qa[KS][4];
  int lim[2];  // last key position a row may attend (-1: padding row)
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int vi = qc * kRows + (lane >> 2) + rr * 8;
    const bool act = vi < g * n;
    const int j = act ? vi / g : 0, h = kvh * g + (act ? vi % g : 0);  // query_vec(vi); a padding row: 0, kvh * g
    lim[rr] = act ? len - n + j : -1;
    const T* qp = static_cast<const T*>(p.q) + ((int64_t)(q0 + j) * p.Hq + h) * D + (lane & 3) * 2;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      qa[ks][rr] = act ? __ldg(reinterpret_cast<const unsigned*>(qp + ks * 16)) : 0u;
      qa[ks][rr + 2] = act ? __ldg(reinterpret_cast<const unsigned*>(qp + ks * 16 + 8)) : 0u;
    }
  }

  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  // (TMA: the 128-byte swizzle repeats every 1 KB, so the ring starts at a multiple of 1 KB)
  T* ring = reinterpret_cast<T*>(TMA ? smem + ((1024 - (smem_u32(smem) & 1023)) & 1023) : smem) + warp * ST * S::STAGE;
  const uint32_t ring_s = smem_u32(ring);
  const uint32_t full0 = TMA ? smem_u32(&s_full[warp * ST]) : 0u;
  if constexpr (TMA) {
    if (lane == 0)
      for (int st = 0; st < ST; ++st) mbar_init(full0 + 8 * st, 1);
    mbar_fence_init();
    __syncwarp();
  }
  const int ntiles = (t1 - t0 + kTile - 1) / kTile;
  const int mine = ntiles > warp ? (ntiles - warp + W - 1) / W : 0;

  // Issues the copies of this warp's i-th tile into stage st. Tiles start at multiples of 16
  // tokens, so where pages hold a multiple of 16 tokens a tile lies in one page: one lookup (the
  // same address in every lane) and rows at a fixed stride. Otherwise each of the first 16 lanes
  // looks up one token's page and the copies take theirs by shuffle.
  const int64_t row_stride = (int64_t)p.Hkv * D;  // elements from one token's row to the next in a page
  const bool tile_in_page = p.page_size % kTile == 0;
  // Pages of this warp's tiles 32 * batch .. 32 * batch + 31, one per lane (-1: none).
  auto tile_pages = [&](int batch) {
    const int ti = batch * 32 + lane;
    return ti < mine ? page_of(p, b, t0 + (warp + ti * W) * kTile) : -1;
  };
  int pages_cur = tile_in_page ? tile_pages(0) : -1;
  int pages_next = tile_in_page ? tile_pages(1) : -1;
  auto load = [&](int i, int st) {
    const int tb = t0 + (warp + i * W) * kTile;
    T* sk = ring + st * S::STAGE;
    T* sv = sk + kTile * SD;
    if (tile_in_page) {
      // Tile i's page: lane i % 32 of the batch of 32 tiles looked up together (the lookup of
      // the next batch is in flight meanwhile: a page-table read per tile was a dependent
      // round trip in front of every tile's copies, the kernel's largest stall).
      if ((i & 31) == 0 && i > 0) {
        pages_cur = pages_next;
        pages_next = tile_pages(i / 32 + 1);
      }
      const int page = __shfl_sync(0xffffffffu, pages_cur, i & 31);
      const int valid = page < 0 ? 0 : min(kTile, t1 - tb);
      if (lane == 0) s_ok[warp * ST + st] = valid >= kTile ? 0xffffu : (1u << valid) - 1u;
      if constexpr (TMA) {
        // one lane: the stage's boxes (keys, then values) at the tile's rows of the [pages * P, Hkv * D]
        // view; the warp read this stage last before its __syncwarp, ordered before the copies here
        if (lane == 0) {
          const uint32_t bar = full0 + 8 * st, dst = ring_s + st * S::STAGE * 2;
          if (valid > 0) {
            fence_proxy_async_shared();
            mbar_arrive_expect_tx(bar, S::STAGE * 2);
            // evict-first: the cache is read once per step, so the small tables every call reads
            // first (lengths, page table, query) and the partials it merges last stay in L2
            const uint64_t pol = l2_evict_first_policy();
            const int row = page * p.page_size + (p.page_shift >= 0 ? (tb & (p.page_size - 1)) : tb % p.page_size);
#pragma unroll
            for (int bx = 0; bx < kBoxes; ++bx) {
              tma_load_2d(dst + bx * 2048, &kmap, kvh * D + 64 * bx, row, bar, pol);
              tma_load_2d(dst + (kBoxes + bx) * 2048, &vmap, kvh * D + 64 * bx, row, bar, pol);
            }
          } else {
            mbar_arrive(bar);  // nothing to read: the phase completes at once (the tile is masked)
          }
        }
        return;
      }
      const int64_t base = page < 0 ? 0 : cache_offset(p, page, tb, kvh);
#pragma unroll
      for (int c = 0; c < CH / 2; ++c) {  // kTile * CH chunks over 32 lanes
        const int idx = lane + 32 * c, r = idx / CH, cc = idx % CH;
        const bool rok = r < valid;
        const int64_t off = rok ? base + r * row_stride + cc * 8 : 0;
        cp_async16(sk + r * SD + cc * 8, kc + off, rok);
        cp_async16(sv + r * SD + cc * 8, vc + off, rok);
      }
    } else {
      const int t = tb + (lane & (kTile - 1));
      const int page = t < t1 ? page_of(p, b, t) : -1;
      const unsigned ok = __ballot_sync(0xffffffffu, page >= 0) & 0xffffu;
      if (lane == 0) s_ok[warp * ST + st] = ok;
#pragma unroll
      for (int c = 0; c < CH / 2; ++c) {
        const int idx = lane + 32 * c, r = idx / CH, cc = idx % CH;
        const int pg = __shfl_sync(0xffffffffu, page, r);
        const bool rok = pg >= 0;
        const int64_t off = rok ? cache_offset(p, pg, tb + r, kvh) + cc * 8 : 0;
        cp_async16(sk + r * SD + cc * 8, kc + off, rok);
        cp_async16(sv + r * SD + cc * 8, vc + off, rok);
      }
    }
  };

  float o[ND][4];
#pragma unroll
  for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

#pragma unroll
  for (int i = 0; i < ST - 1; ++i) {
    if (i < mine) load(i, i);
    cp_async_commit();
  }
  for (int i = 0; i < mine; ++i) {
    const int st = i % ST;
    if (i + ST - 1 < mine) load(i + ST - 1, (i + ST - 1) % ST);
    const T* sk = ring + st * S::STAGE;
    const T* sv = sk + kTile * SD;
    const uint32_t sk_s = ring_s + st * S::STAGE * 2, sv_s = sk_s + kTile * SD * 2;
    unsigned ok;
    if constexpr (TMA) {
      mbar_wait(full0 + 8 * st, (i / ST) & 1);
      __syncwarp();  // (lane 0 wrote the stage's mask when it issued the copies)
      ok = s_ok[warp * ST + st];
      // Rows past the tile's keys hold whatever the page holds (the copy reads whole boxes): their
      // values are zeroed, since p = 0 times a NaN would still poison p.v. (Their scores are masked.)
      if (ok != 0xffffu) {
        for (int c = lane; c < kTile * kBoxes * 8; c += 32) {  // 16-byte pieces: row, box, piece
          const int r = c / (kBoxes * 8), rest = c % (kBoxes * 8);
          if (!((ok >> r) & 1u)) st_shared_v4(sv_s + (rest >> 3) * 2048 + r * 128 + (rest & 7) * 16, 0u, 0u, 0u, 0u);
        }
        __syncwarp();
      }
    } else {
      cp_async_commit();
      cp_async_wait<ST - 1>();
      __syncwarp();
      ok = s_ok[warp * ST + st];
    }
    const int tb = t0 + (warp + i * W) * kTile;

    // Scores: even and odd k-steps into separate accumulators (four independent mma chains
    // instead of two; the chains' latency, not the tensor cores, bounds this loop).
    float s[2][4], s2[2][4];
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] = s2[nb][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t bb[4];
      const int kr = (lane & 7) + (lane >> 4) * 8, kcol = ks * 16 + ((lane >> 3) & 1) * 8;
      if constexpr (TMA) ldmatrix_x4(sk_s + tma_tile_offset(kr, kcol), bb[0], bb[1], bb[2], bb[3]);
      else ldmatrix_x4(bb, sk + kr * SD + kcol);
      Mma<T>::run((ks & 1) ? s2[0] : s[0], qa[ks], bb[0], bb[1]);
      Mma<T>::run((ks & 1) ? s2[1] : s[1], qa[ks], bb[2], bb[3]);
    }
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] += s2[nb][e];

    // Mask (unreadable keys, causal limit per row), then the online softmax per row (base 2).
#pragma unroll
    for (int nb = 0; nb < 2; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = nb * 8 + (lane & 3) * 2 + (e & 1), rr = e >> 1;
        float v = s[nb][e] * p.scale_log2;
        if (!((ok >> key) & 1u) || tb + key > lim[rr]) v = -INFINITY;
        s[nb][e] = v;
      }
    online_softmax_tile(s, m, l, o);

    // O += P V: P (16 rows x 16 tokens) is the score accumulator re-packed as an A fragment.
    const uint32_t a[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                           pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int nd2 = 0; nd2 < D / 16; ++nd2) {
      uint32_t bb[4];
      const int vr = (lane & 7) + ((lane >> 3) & 1) * 8, vcol = nd2 * 16 + (lane >> 4) * 8;
      if constexpr (TMA) ldmatrix_x4_trans(sv_s + tma_tile_offset(vr, vcol), bb[0], bb[1], bb[2], bb[3]);
      else ldmatrix_x4_trans(bb, sv + vr * SD + vcol);
      Mma<T>::run(o[2 * nd2], a, bb[0], bb[1]);
      Mma<T>::run(o[2 * nd2 + 1], a, bb[2], bb[3]);
    }
    __syncwarp();  // this stage is refilled ST - 1 tiles from now
  }
  if constexpr (!TMA) cp_async_wait<0>();  // (TMA: every issued stage was waited for above)

  // Rows' sums over the quad (m is already quad-uniform), then the warp's state to shared
  // memory (over the ring, once every warp is done with it) for the block merge.
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 1);
    l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 2);
  }
  __syncthreads();
  float* s_acc = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = warp * kRows + (lane >> 2) + rr * 8;
    if ((lane & 3) == 0) {
      s_m[row] = m[rr];
      s_l[row] = l[rr];
    }
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
      *reinterpret_cast<float2*>(s_acc + row * D + nd * 8 + (lane & 3) * 2) = make_float2(o[nd][rr * 2], o[nd][rr * 2 + 1]);
  }
  __syncthreads();
  finish_split<T, kRows, W, 16>(p, kvh, qc, b, split, splits, g, n, q0, s_m, s_l, s_acc);
}

// The tensor maps of the key and value caches as [pages * page_size, Hkv * D] (boxes of one kv
// head's 64 channels of 16 tokens), where the TMA kernels can take the call: head_dim 64 or 128, pages
// of whole tiles, Hopper kernels built, the driver's encoder present. SQUEEZELM_ATTN_TMA=0 keeps the
// cp.async kernels (A/B runs).
template <class T>
bool tma_maps(const Params& p, CUtensorMap& km, CUtensorMap& vm) {
  if ((p.D != 64 && p.D != 128) || p.page_size % kTile != 0 || !hopper_kernels_available()) return false;
  if (env_int("SQUEEZELM_ATTN_TMA", 1) == 0) return false;
  const long long rows = (long long)p.pages * p.page_size, cols = (long long)p.Hkv * p.D;
  if (rows <= 0 || rows > INT32_MAX || cols > INT32_MAX) return false;
  return encode_rows_map<T>(&km, static_cast<const T*>(p.kc), rows, cols, cols, kTile) &&
         encode_rows_map<T>(&vm, static_cast<const T*>(p.vc), rows, cols, cols, kTile);
}

template <class T, int D, int W = kMmaWarps, int ST = kStages, bool TMA = false>
void launch_ring(const Params& p, const CUtensorMap& km, const CUtensorMap& vm, cudaStream_t stream) {
  constexpr size_t smem = MmaShape<D, W, ST, TMA>::smem;
  allow_dynamic_smem<decode_mma<T, D, W, ST, TMA>>(smem, "attention (decode)");
  dim3 grid(p.Hkv * p.qchunks, p.B, p.splits);
  launch_pdl(decode_mma<T, D, W, ST, TMA>, grid, dim3(W * 32), smem, stream, p, km, vm);
}

// TMA where tma_maps allows it, except for the deep-ring shape (short splits), whose copies stay cp.async:
// with TMA it measured slower at 512 tokens on the H100 (32q/8kv x128, same process, 9.35 / 9.05 against
// 8.87 / 8.82 us) and within 1% elsewhere. Other TMA shapes measured and not kept (docs/ops.md): two blocks
// of 4 warps x 3 stages per SM, 6 warps x 4 stages, and 3-D maps with one box per tile.
template <class T, int D>
void launch_d(const Params& p, bool deep_ring, cudaStream_t stream) {
  CUtensorMap km{}, vm{};
  if constexpr (D == 64 || D == 128) {
    if (!deep_ring && tma_maps<T>(p, km, vm)) return launch_ring<T, D, kMmaWarps, kStages, true>(p, km, vm, stream);
  }
  if constexpr (D == 128) {
    if (deep_ring) return launch_ring<T, D, kDeepWarps, kDeepStages>(p, km, vm, stream);
  }
  launch_ring<T, D>(p, km, vm, stream);
}

template <class T>
void launch_t(const Params& p, bool deep_ring, cudaStream_t stream) {
  switch (p.D) {
    case 16: launch_d<T, 16>(p, deep_ring, stream); break;
    case 32: launch_d<T, 32>(p, deep_ring, stream); break;
    case 48: launch_d<T, 48>(p, deep_ring, stream); break;
    case 64: launch_d<T, 64>(p, deep_ring, stream); break;
    case 80: launch_d<T, 80>(p, deep_ring, stream); break;
    case 96: launch_d<T, 96>(p, deep_ring, stream); break;
    case 112: launch_d<T, 112>(p, deep_ring, stream); break;
    case 128: launch_d<T, 128>(p, deep_ring, stream); break;
    default: fail("ERR_INTERNAL", "attention: no tensor-core decode kernel for head_dim " + std::to_string(p.D));
  }
}

template <int D>
int occupancy_d() {
  constexpr size_t smem = MmaShape<D>::smem;
  allow_dynamic_smem<decode_mma<__half, D>>(smem, "attention (decode)");
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_mma<__half, D>, kMmaWarps * 32, smem) != cudaSuccess) {
    cudaGetLastError();
    return 1;
  }
  return n > 0 ? n : 1;
}

}  // namespace

bool decode_mma_deep_ring(int D, int tiles_per_split, int vectors) {
  return D == 128 && tiles_per_split <= kDeepRingTiles && vectors <= kDeepWarps;
}

bool decode_mma_supported(int D) { return D % 16 == 0 && D >= 16 && D <= 128; }

int decode_mma_resident_blocks(int device, int D) {
  return cached_per_device(device, D / 16, [&] {  // D <= 128 (decode_mma_supported)
    switch (D) {
      case 16: return occupancy_d<16>();
      case 32: return occupancy_d<32>();
      case 48: return occupancy_d<48>();
      case 64: return occupancy_d<64>();
      case 80: return occupancy_d<80>();
      case 96: return occupancy_d<96>();
      case 112: return occupancy_d<112>();
      case 128: return occupancy_d<128>();
      default: return 1;
    }
  });
}

void launch_decode_mma(const Params& p, bool deep_ring, DType dt, cudaStream_t stream) {
  if (dt == DType::F16) launch_t<__half>(p, deep_ring, stream);
  else launch_t<__nv_bfloat16>(p, deep_ring, stream);
}

}  // namespace sqz::cuda::attn
