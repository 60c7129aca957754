// Tensor-core GEMV for few rows (M <= 16) on Hopper, fed by 2-D tensor copies (TMA):
// y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias).
//
// Why another streaming GEMV. The register-load kernel (gemv_tc.cuh) holds its bytes in flight in
// registers and walks whole tiles with a persistent grid (a ragged last round where tiles do not
// divide evenly); the bulk-copy kernel (gemv_bulk.cuh) fixed both but issues one copy per weight
// row, 2 KB each, and measured bound by the copy requests, not by DRAM. A tensor-map copy moves a
// whole box of R rows x 64 k (R = 128: 16 KB) in one request, swizzled so that the fragment
// loads that follow are free of bank conflicts, and fills rows past N and k past K with zeros
// (no clamping, no tail path). The activations come the same way: a 16-row x 64-k box
// per stage, rows past M zero-filled, so every warp reads its x fragments from shared memory.
//
// * Work: units of (tile of R weight rows, 64 k), tile-major; block b takes the contiguous range
//   [I·b/B, I·(b+1)/B) of the I units (stream-K): every SM streams the same bytes within one unit,
//   whatever N and K are. One block per SM, with a 4-stage ring (72 KB at R = 128: the next
//   kernel's block fits beside it). Measured on the H200 and not kept: deeper rings (5-12
//   stages), two blocks per SM, 256-row tiles, and 512-byte (256-k) box rows without the swizzle
//   were all slower, 0.5-6 us per GEMV; requesting the first boxes after the wait instead of
//   before it made no difference.
// * One producer lane issues, per unit, the weight box and the activation box into ring slot
//   j % S, counted in bytes on the slot's "full" mbarrier, and refills a slot once the 8 consumer
//   warps have arrived on its "empty" barrier. Weights need nothing from the previous kernel, so
//   the first S weight boxes are requested before griddepcontrol.wait; their activation boxes
//   after it.
// * Consumer warp c owns rows 8·TPW·c .. 8·TPW·(c+1) - 1 of the tile (TPW = R / 64 8-row tiles)
//   over the whole 64 k of a unit, so no partial sums cross warps. Lane (g, t) takes 16-byte
//   piece 2t + h (h = 0, 1) of weight row g and of activation rows g, g + 8: the k permutation of
//   gemv_tc.cuh (activations permuted alike), with pieces 2t + h rather than 4h + t so that the 8
//   lanes of a load phase (rows g, g + 1) hit the 8 different 16-byte positions of the 128-byte
//   swizzle (position = piece XOR row % 8).
// * At the end of a tile (or of the block's range) a tile the block covered whole is written by
//   each warp straight from its fragments; a split tile goes to the block's fp32 partial slot and
//   the last contributor to arrive (per-tile counter, reset to 0 by it) sums the contributors'
//   slots in block order and writes y: deterministic, no float atomics (gemv_bulk.cuh's scheme).
// * K % 8 == 0 and 16-byte aligned x, w (the tensor maps' stride and base rules).
#pragma once
#include <cuda.h>  // CUtensorMap (the type only: the encoder comes from the driver at run time)

#include <cstdint>

#include "../common/bulk_copy.cuh"
#include "../common/pdl.cuh"
#include "../common/ptx.cuh"
#include "common.cuh"

namespace sqz::cuda::gemm_detail {

constexpr int kTmaConsumerWarps = 8;
constexpr int kTmaThreads = (kTmaConsumerWarps + 1) * 32;
constexpr int kTmaXRows = 16;  // activation box rows (rows past M arrive as zeros)

constexpr int kTmaBoxK = 64;   // k per box row: 128 bytes, the span of the 128-byte swizzle

// A stage: the weight box (R rows of 128 bytes) then the activation box; both start on 1024-byte
// boundaries (the swizzle pattern repeats every 8 rows of 128 bytes).
template <int R> constexpr uint32_t tma_stage_bytes() { return (R + kTmaXRows) * 128; }
// 1024 bytes of barriers (full at 0, empty at 256, 8 bytes per slot, up to 32 slots) and the
// flag, then the ring; 1024 more so the window can be aligned up to 1024.
template <int R> constexpr size_t tma_smem_bytes(int S) { return 2048 + (size_t)S * tma_stage_bytes<R>(); }

// Byte offset of lane (g, t)'s 16-byte piece for 32-k chunk h (0, 1) of box row r (r % 8 == g):
// piece 2t + h sits at position (2t + h) XOR g of the row, so the 8 lanes of a load phase (rows
// g, g + 1) hit the 8 different positions.
__device__ __forceinline__ uint32_t tma_piece(int r, int g, int t, int h) {
  return (uint32_t)r * 128 + ((uint32_t)((2 * t + h) ^ g) << 4);
}

template <class T, int R>
__global__ void __launch_bounds__(kTmaThreads, 1)
    gemv_tma_kernel(const __grid_constant__ CUtensorMap wmap, const __grid_constant__ CUtensorMap xmap,
                    T* __restrict__ y, const T* __restrict__ bias, int M, int N, int K, int S,
                    int* __restrict__ counters, float* __restrict__ partials) {
#ifdef SQZ_BULK_COPY
  constexpr int TPW = R / 8 / kTmaConsumerWarps;  // 8-row tiles per consumer warp
  static_assert(TPW >= 1 && R % (8 * kTmaConsumerWarps) == 0 && R <= 256, "TMA GEMV tile");
  constexpr uint32_t kStage = tma_stage_bytes<R>(), kXBox = (uint32_t)R * 128;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t full0 = base, empty0 = base + 256;
  volatile int* flag = reinterpret_cast<volatile int*>(smem_raw + (base - raw) + 512);
  const uint32_t ring = base + 1024;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int tiles = (N + R - 1) / R, KB = (K + kTmaBoxK - 1) / kTmaBoxK;
  const long long I = (long long)tiles * KB, B = gridDim.x;
  const int first = (int)(I * blockIdx.x / B), last = (int)(I * (blockIdx.x + 1) / B);

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, kTmaConsumerWarps);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (warp == kTmaConsumerWarps) {
    // Producer: one lane issues every copy.
    if (lane == 0) {
      const uint64_t evict_first = l2_evict_first_policy();
      const int n = last - first, pre = min(n, S);
      for (int j = 0; j < pre; ++j) {
        const int u = first + j, tile = u / KB, kb = u - tile * KB;
        mbar_arrive_expect_tx(full0 + 8 * j, kStage);
        tma_load_2d(ring + j * kStage, &wmap, kb * kTmaBoxK, tile * R, full0 + 8 * j, evict_first);
      }
      pdl_wait();  // the activations may be the previous kernel's output
      for (int j = 0; j < pre; ++j) {
        const int u = first + j, kb = u - (u / KB) * KB;
        tma_load_2d(ring + j * kStage + kXBox, &xmap, kb * kTmaBoxK, 0, full0 + 8 * j);
      }
      int slot = pre == S ? 0 : pre;
      uint32_t phase = pre == S ? 1 : 0;  // round j / S of the ring, mod 2
      for (int j = pre; j < n; ++j) {
        mbar_wait(empty0 + 8 * slot, phase ^ 1);  // the consumers released the previous round's unit
        const int u = first + j, tile = u / KB, kb = u - tile * KB;
        const uint32_t st = ring + slot * kStage;
        mbar_arrive_expect_tx(full0 + 8 * slot, kStage);
        tma_load_2d(st, &wmap, kb * kTmaBoxK, tile * R, full0 + 8 * slot, evict_first);
        tma_load_2d(st + kXBox, &xmap, kb * kTmaBoxK, 0, full0 + 8 * slot);
        if (++slot == S) slot = 0, phase ^= 1;
      }
    } else {
      pdl_wait();  // (the contract: every thread waits)
    }
    return;
  }

  // Consumer warps.
  pdl_wait();  // y and the partial slots may still be read by the previous kernel
  const int g = lane >> 2, t = lane & 3;
  // Rows this lane reads: weight rows 8(TPW·warp + j) + g, activation rows g and g + 8 (each
  // % 8 == g, as tma_piece needs).
  const int wrow = warp * TPW * 8 + g;
  float acc[TPW][4];
#pragma unroll
  for (int j = 0; j < TPW; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  const int first_tile = first / KB;
  int tile = first_tile, kb = first - first_tile * KB;
  int slot = 0;
  uint32_t phase = 0;
  for (int u = first; u < last; ++u) {
    mbar_wait(full0 + 8 * slot, phase);
    const uint32_t st = ring + slot * kStage;
    const uint4 xa0 = ld_ring_v4(st + kXBox + tma_piece(g, g, t, 0));
    const uint4 xb0 = ld_ring_v4(st + kXBox + tma_piece(g + 8, g, t, 0));
    const uint4 xa1 = ld_ring_v4(st + kXBox + tma_piece(g, g, t, 1));
    const uint4 xb1 = ld_ring_v4(st + kXBox + tma_piece(g + 8, g, t, 1));
    uint4 w0[TPW], w1[TPW];
#pragma unroll
    for (int j = 0; j < TPW; ++j) {
      w0[j] = ld_ring_v4(st + tma_piece(wrow + 8 * j, g, t, 0));
      w1[j] = ld_ring_v4(st + tma_piece(wrow + 8 * j, g, t, 1));
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty0 + 8 * slot);  // the slot's data is in registers
    if (++slot == S) slot = 0, phase ^= 1;
#pragma unroll
    for (int j = 0; j < TPW; ++j) {
      mma_chunk32<T>(acc[j], xa0, xb0, w0[j]);
      mma_chunk32<T>(acc[j], xa1, xb1, w1[j]);
    }
    if (++kb < KB && u + 1 < last) continue;

    // End of a tile or of the range. C fragment e of 8-row tile j: row m = g + 8(e / 2) of y,
    // column n = tile·R + 8(TPW·warp + j) + 2t + e % 2.
    const int t0 = tile * KB;
    const bool whole = first <= t0 && t0 + KB <= last;
    bool write = whole;
    if (!whole) {
      float* mine = partials + (size_t)(2 * blockIdx.x + (tile == first_tile ? 0 : 1)) * (16 * R);
#pragma unroll
      for (int j = 0; j < TPW; ++j)
        *reinterpret_cast<float4*>(mine + ((warp * TPW + j) * 32 + lane) * 4) =
            make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
      __threadfence();
      named_barrier(1, kTmaConsumerWarps * 32);
      const int bf = split_block_of(t0, I, B), bl = split_block_of(t0 + KB - 1, I, B);
      if (tid == 0) {
        const int prev = atomicAdd(counters + tile, 1);
        const int is_last = prev == bl - bf;
        if (is_last) atomicExch(counters + tile, 0);  // every contributor has arrived: ready for the next launch
        *flag = is_last;
      }
      named_barrier(1, kTmaConsumerWarps * 32);
      write = *flag != 0;
      if (write) {
        __threadfence();
#pragma unroll
        for (int j = 0; j < TPW; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
        for (int c = bf; c <= bl; ++c) {
          const int ctile = (int)((I * c / B) / KB);
          const float* p = partials + (size_t)(2 * c + (tile == ctile ? 0 : 1)) * (16 * R);
#pragma unroll
          for (int j = 0; j < TPW; ++j) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(p + ((warp * TPW + j) * 32 + lane) * 4));
            acc[j][0] += v.x, acc[j][1] += v.y, acc[j][2] += v.z, acc[j][3] += v.w;
          }
        }
      }
    }
    if (write) {
#pragma unroll
      for (int j = 0; j < TPW; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = g + 8 * (e >> 1), n = tile * R + 8 * (TPW * warp + j) + 2 * t + (e & 1);
          if (m < M && n < N) {
            float o = acc[j][e];
            if (bias) o += to_f<T>(bias[n]);
            y[(size_t)m * N + n] = from_f<T>(o);
          }
        }
    }
    if (!whole) named_barrier(1, kTmaConsumerWarps * 32);  // the flag is free again
#pragma unroll
    for (int j = 0; j < TPW; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    if (kb == KB) kb = 0, ++tile;
  }
#endif
}

}  // namespace sqz::cuda::gemm_detail
