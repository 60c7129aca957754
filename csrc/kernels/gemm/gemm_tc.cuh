// Tensor-core GEMM for M > 16: y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias), f16/bf16 in, fp32 accumulate.
//
// Both operands are K-contiguous, which is exactly what mma.sync.m16n8k16.row.col wants
// (A row-major, B "column-major" = w's rows), so both are fed by non-transposing ldmatrix.
// A block computes a 128x128 tile with 8 warps (2 along M x 4 along N, 64x32 each); K advances
// 32 at a time through a 4-stage cp.async ring in shared memory. Rows of a stage are 64 bytes
// (four 16-byte chunks); chunk c of row r is stored at c ^ ((r >> 1) & 3), which spreads the
// eight rows one ldmatrix reads over all 32 banks (no conflicts, for cp.async stores too).
// 123 registers and 64 KiB of shared memory per block: two blocks share an SM.
// Tails: loads past M, N or K are zero-filled (cp.async src-size 0), stores are guarded.
// cp.async needs 16-byte aligned sources: when K % 8 != 0 or a base is unaligned the tile is
// gathered element by element instead (ALIGNED = false), with the same pipeline structure.
#pragma once
#include <type_traits>

#include "common.cuh"

namespace sqz::cuda::gemm_detail {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kThreads = 256;
constexpr int kTileBytes = kBM * kBK * 2;                 // one operand, one stage (A and B equal)
constexpr int kSmemBytes = kStages * 2 * kTileBytes;      // 64 KiB

// Byte offset of 16-byte chunk c (0..3) of row r inside a stage tile.
__device__ __forceinline__ uint32_t swz(int r, int c) { return (uint32_t)(r * 64 + ((c ^ ((r >> 1) & 3)) << 4)); }


// Loads a kBM x kBK tile of a [rows, K] K-contiguous matrix, starting at (row0, k0), into one
// stage. 512 chunks of 16 bytes, two per thread.
template <class T, bool ALIGNED>
__device__ __forceinline__ void load_tile(uint8_t* stage, const T* __restrict__ g, int rows, int K, int row0, int k0) {
#pragma unroll
  for (int i = 0; i < (kBM * kBK / 8) / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx >> 2, c = idx & 3;
    const int gr = row0 + r, gk = k0 + c * 8;
    if constexpr (ALIGNED) {
      // K % 8 == 0, so a chunk is either wholly inside K or wholly outside.
      const bool ok = gr < rows && gk < K;
      const T* src = ok ? g + (size_t)gr * K + gk : g;  // a valid address even when predicated off
      cp_async16(smem_u32(stage + swz(r, c)), src, ok);
    } else {
      uint16_t v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const bool ok = gr < rows && gk + j < K;
        v[j] = ok ? reinterpret_cast<const uint16_t*>(g)[(size_t)gr * K + gk + j] : (uint16_t)0;
      }
      uint4 u;
      u.x = v[0] | ((uint32_t)v[1] << 16);
      u.y = v[2] | ((uint32_t)v[3] << 16);
      u.z = v[4] | ((uint32_t)v[5] << 16);
      u.w = v[6] | ((uint32_t)v[7] << 16);
      *reinterpret_cast<uint4*>(stage + swz(r, c)) = u;
    }
  }
}

template <class T, bool ALIGNED>
__global__ void __launch_bounds__(kThreads, 2)
    gemm_tc_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                   int M, int N, int K) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sA = smem;                             // kStages tiles of x
  uint8_t* sB = smem + kStages * kTileBytes;      // kStages tiles of w

  // Grouped rasterisation: consecutive blocks share w tiles across a band of 8 M tiles, so
  // the band's x and w stay in L2.
  const int tilesM = (M + kBM - 1) / kBM, tilesN = (N + kBN - 1) / kBN;
  const int bid = blockIdx.x;
  constexpr int kGroup = 8;
  const int group = bid / (kGroup * tilesN);
  const int firstM = group * kGroup;
  const int groupM = min(tilesM - firstM, kGroup);
  const int tm = firstM + (bid % (kGroup * tilesN)) % groupM;
  const int tn = (bid % (kGroup * tilesN)) / groupM;
  const int m0 = tm * kBM, n0 = tn * kBN;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp >> 2) * 64;  // warp's rows inside the block tile
  const int wn = (warp & 3) * 32;   // warp's columns

  float acc[4][4][4];  // [m16 tile][n8 tile][fragment]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int f = 0; f < 4; ++f) acc[i][j][f] = 0.f;

  const int KT = (K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) {
      load_tile<T, ALIGNED>(sA + s * kTileBytes, x, M, K, m0, s * kBK);
      load_tile<T, ALIGNED>(sB + s * kTileBytes, w, N, K, n0, s * kBK);
    }
    cp_async_commit();
  }

  // ldmatrix lane roles. A (x4 = one m16 x k16 fragment): matrices are (rows 0-7, k 0-7),
  // (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0..a3.
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_chunk = lane >> 4;
  // B (x4 = two n8 tiles x k16): (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
  // = b0,b1 of the first n8 tile, then b0,b1 of the second.
  const int b_row = (lane & 7) + (lane >> 4) * 8, b_chunk = (lane >> 3) & 1;

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (this thread's copies)
    __syncthreads();               // ... everyone's; and everyone is done with tile kt-1's stage
    {
      const int nk = kt + kStages - 1;
      if (nk < KT) {
        const int s = nk % kStages;
        load_tile<T, ALIGNED>(sA + s * kTileBytes, x, M, K, m0, nk * kBK);
        load_tile<T, ALIGNED>(sB + s * kTileBytes, w, N, K, n0, nk * kBK);
      }
      cp_async_commit();  // always commit, so the group count stays in step with kt
    }
    const uint8_t* a = sA + (kt % kStages) * kTileBytes;
    const uint8_t* b = sB + (kt % kStages) * kTileBytes;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        ldmatrix_x4(smem_u32(a + swz(wm + i * 16 + a_row, ks * 2 + a_chunk)), af[i][0], af[i][1], af[i][2], af[i][3]);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        ldmatrix_x4(smem_u32(b + swz(wn + j * 16 + b_row, ks * 2 + b_chunk)), bf[2 * j][0], bf[2 * j][1],
                    bf[2 * j + 1][0], bf[2 * j + 1][1]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16816<T>(acc[i][j], af[i][0], af[i][1], af[i][2], af[i][3], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();  // no copy may be left in flight when the block exits

  // Epilogue. Fragment f of tile (i, j): row g (+8 for f >= 2), columns 2t, 2t+1.
  const int g = lane >> 2, t = lane & 3;
  // Paired stores when every (row, even col) is 4-byte aligned.
  const bool pair_ok = (N % 2) == 0 && (reinterpret_cast<uintptr_t>(y) & 3) == 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm + i * 16 + g + h * 8;
        const int n = n0 + wn + j * 8 + 2 * t;
        if (m >= M) continue;
        float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if (bias) {
          if (n < N) v0 += to_f<T>(bias[n]);
          if (n + 1 < N) v1 += to_f<T>(bias[n + 1]);
        }
        T* dst = y + (size_t)m * N + n;
        if (pair_ok && n + 1 < N) {
          typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type p;
          p.x = from_f<T>(v0);
          p.y = from_f<T>(v1);
          *reinterpret_cast<decltype(p)*>(dst) = p;
        } else {
          if (n < N) dst[0] = from_f<T>(v0);
          if (n + 1 < N) dst[1] = from_f<T>(v1);
        }
      }
}

}  // namespace sqz::cuda::gemm_detail
