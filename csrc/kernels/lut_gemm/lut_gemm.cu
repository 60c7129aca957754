// LUT GEMV / GEMM for SqueezeLLM weights (dense-and-sparse), on the packed layout of
// csrc/cpu/lut_gemm.h.
//
// Why this design (decode, M <= 64: lut_gemv_kernel)
// * The kernel must stream 3/4-bit codes at HBM speed. On an H200 (~4.3 TB/s, 132 SMs, ~1.9 GHz)
//   that is ~33 4-bit codes per clock per SM. One shared-memory lookup per code (32 lanes/clk) can
//   not keep up, so codes are looked up in PAIRS: per output row a table of 2^(2b) half2 entries
//   (256 for 4-bit, 64 for 3-bit) maps the byte/6 bits of two neighbouring codes to both weights.
// * The half2 of a pair (two consecutive k of one row n) is exactly one register of the A operand
//   of mma.m16n8k16 (A = 16 weight rows x 16 k, B = x^T: 16 k x 8 activation rows). So one
//   tensor-core kernel serves M = 1..64 with the same number of lookups (M <= 8: one mma per 4
//   lookups; each further 8 rows of x adds one mma and one x load, no lookup); the tensor cores
//   are idle anyway, and conversion and fp32 accumulation come for free.
// * The budget is instructions, not bytes: at ~33 codes/clk/SM and 4 issue slots per clock, the
//   loop may spend ~30 warp-instructions per 256 weights at 100% issue, and the essential work is
//   9 (4-bit: 4 lookups, 4 address bytes, 1 mma; 3-bit: 4 more ALU for the 6-bit fields). The
//   earlier design spent ~36 (in its loop ~21, of which one address add per lookup, copies of the
//   register-rotated code prefetch and guards on every activation load; ~7 to rebuild the tables
//   of each 16-row tile; ~6 in per-tile epilogues), at 40% of the bandwidth floor. So:
//   - Lookup addresses cost one instruction. Entry e of rows g / g+8 sits at byte
//     e*256 + 128h + 4*lane of a table whose shared address is a multiple of 64 KB (4-bit) / 16 KB
//     (3-bit), so the address is the lane's base with the code byte dropped into bits 8..15 (one
//     PRMT) or the 6 bits into 8..13 (one shift, one LOP3), issued as ld.shared on a 32-bit
//     address with no base to add. Each (row, lane quarter) has its own copy of the row's table,
//     in bank 4g+q: every lookup of a warp hits 32 different banks, whatever the codes.
//   - The alignment places the tables at shared offset 64 KB - 1 KB (sm_90 starts dynamic shared
//     memory at 1 KB; the kernel checks and traps otherwise), so a 4-bit block takes ~175 KB and
//     one block per SM: 16 warps share one set of tables (the same 16 warps per SM as two 8-warp
//     blocks before, with half the table copies per SM). The space below the tables holds the
//     reduction buffer and part of the code ring.
//   - Codes come through a shared-memory ring per warp (cp.async, S slots of one unit each; the
//     lane copies and reads back its own 16-byte pieces, so cp.async.wait_group is the only
//     synchronisation): no registers held by the prefetch and no copies, 2 (4-bit) / 6 (3-bit)
//     16-byte shared loads per unit. The ring streams the warp's units in the order it consumes
//     them, across row tiles, so the next tile's first units are in flight while this one ends.
//     S - 1 units per warp are in flight: 80 KB per SM (4-bit, S = 6) / 96 KB (3-bit, S = 3),
//     ~2.5k clocks of HBM time, which also covers the per-tile barriers.
//   - Units whose activations all lie inside K run a loop without guards; the last units of K
//     (and the unvectorised path) take a guarded copy of it. Activation rows past M read row 0 and
//     are never stored, so there is no per-row predicate either.
//   - The tables of a tile are built with one 16-byte store per entry (its 4 copies) from
//     registers: thread (row, second code, part) reads the row's 16-entry table once and writes
//     E/parts entries with one PRMT each: ~500 warp-instructions per tile instead of ~3500.
//   PTX instructions per 256 weights of the unguarded loop (M = 1): 4-bit ~13.9 (before: ~16.9,
//   ~20.8 in SASS), 3-bit ~19.6 (before: ~23.8; ~16 once ptxas fuses the AND and OR of each
//   3-bit address into one LOP3).
// * The k order inside each 32-wide chunk is permuted exactly as in the dense tensor-core GEMV
//   (gemm/gemv_tc.cuh): lane quarter q owns k = 8q..8q+7 of every chunk, so its activations are
//   one 16-byte load per chunk and its codes are contiguous. The repacked codes put the 4 (4-bit)
//   or 12 (3-bit) words a lane needs for one unit of K (128 / 512 k) in 16-byte pieces; a unit of a
//   16-row tile is one contiguous 1 KB / 3 KB run, which is one ring slot.
// * A block owns 16 output rows and all of K; its warps split K by units (unit u to warp u % NW).
//   The grid is one wave and each block walks row tiles, so there is no tail wave; a tile's
//   16-entry tables and outlier row bounds are requested during the previous tile's main loop.
//   The partial tiles of the warps are summed in shared memory in warp order: deterministic, no
//   atomics. Tables, 16-entry tables, reduction buffer and ring never alias, so a tile costs two
//   block barriers (tables built; partial sums stored, with the next tile's 16-entry tables). At M = 1 each warp keeps two accumulator chains (even / odd chunks)
//   so consecutive mma do not wait on each other.
// * Every block rereads all of x (L1 holds it for small M, otherwise it comes from L2). 17..64
//   rows of x take 8-warp blocks (255 registers for 16-32 accumulators and as many activations).
// * Outliers (CSR over output rows) are added to the accumulators by the same launch after the
//   main loop (split over warps): each lane's first entries are requested before the main loop
//   and arrive during it, and x is in L1 by then, so they add little latency.
// * x is read through L1 (it is small and every block rereads it); codes bypass L1 (cp.async.cg).
//   Activations past K are zero, so padded codes contribute nothing.
//
// Prefill (M > 64: lut_gemm_mma_kernel): 128x128 output tiles, 32 k per stage; activations and
// raw codes arrive through a cp.async pipeline, each stage's codes are dequantized once per block
// through a single-code table in shared memory (conflict-free: 32 lanes = 32 rows) into a [n][k]
// tile in the activation dtype, outliers folded in, and multiplied with mma.sync (fp32 accumulation).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "core/cuda_stream.h"
#include "core/error.h"
#include "cpu/lut_gemm.h"
#include "lut_gemm.h"

namespace sqz::cuda {
namespace {

template <class T> struct Cvt;
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half t(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 t(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ uint32_t bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <class T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return bits16(lo) | (bits16(hi) << 16);
}

// Guarded reads in this file are plain loads, never __ldg: __ldg is a non-volatile asm statement
// that the compiler treats as side-effect free and may hoist above its guard (out of a loop whose
// trip count is zero), turning "no outliers" (null vals/cols) or a column past N into an
// out-of-bounds read. Plain loads of read-only data still compile to the non-coherent path.
__device__ __forceinline__ float load_f(const void* p, bool is_f32, long long i) {
  if (is_f32) return static_cast<const float*>(p)[i];
  return __half2float(static_cast<const __half*>(p)[i]);
}

template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 8 activations x[k .. k+8) of one row as 4 packed pairs; zero past K or for an invalid row.
// VEC: row base 16-byte aligned and K % 8 == 0 (so a group is all in or all out).
template <class T, bool VEC>
__device__ __forceinline__ uint4 load_x8(const T* row, int k, int K, bool valid) {
  if (VEC) {
    if (valid && k < K) return *reinterpret_cast<const uint4*>(row + k);
    return make_uint4(0, 0, 0, 0);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const T z = Cvt<T>::t(0.f);
      const T lo = (valid && k + 2 * i < K) ? row[k + 2 * i] : z;
      const T hi = (valid && k + 2 * i + 1 < K) ? row[k + 2 * i + 1] : z;
      w[i] = pack2<T>(lo, hi);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <int BITS> struct Geo {
  static constexpr int KU = BITS == 4 ? 128 : 512;  // k per unit
  static constexpr int WU = BITS == 4 ? 4 : 12;     // words per (row, quarter, unit)
  static constexpr int NV = WU / 4;                 // 16-byte loads per (row, quarter, unit)
  static constexpr int CH = KU / 32;                // chunks per unit
  static constexpr int E = 1 << BITS;
  static constexpr int E2 = E * E;                  // pair-table entries
  static constexpr int USTRIDE = 64 * NV;           // uint4 per (tile, unit)
};

// The 8 codes (4 pairs) of chunk c of a unit from a quarter's words (4-bit: 32 bits, 3-bit: 24).
template <int BITS>
__device__ __forceinline__ uint32_t chunk_bits(const uint32_t (&w)[Geo<BITS>::WU], int c) {
  if constexpr (BITS == 4) {
    return w[c];
  } else {
    const int b = c >> 2, cc = c & 3;
    if (cc < 3) return w[3 * b + cc];
    const uint32_t t = __byte_perm(w[3 * b], w[3 * b + 1], 0x0073);
    return __byte_perm(t, w[3 * b + 2], 0x0710);
  }
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
// ---- GEMV (decode) ----
// Shared-memory accesses of the decode loop take 32-bit shared addresses built by the lookup
// itself (see GvLayout), so they are issued as PTX: a C++ access through the dynamic shared
// array would add its base to every address.
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t r;
  asm("ld.shared.b32 %0, [%1];" : "=r"(r) : "r"(addr));
  return r;
}
// Ring reads are ordered against the cp.async that refills the slot (volatile, memory).
__device__ __forceinline__ uint4 lds_ring(uint32_t addr) {
  uint4 r;
  asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr) : "memory");
  return r;
}
__device__ __forceinline__ void sts_u32x4(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.v4.b32 [%0], {%1,%1,%1,%1};" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void cp_async16_to(uint32_t dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

// Shared address at which dynamic shared memory starts (sm_90 keeps the first 1 KB of a block's
// window for the system); the kernel checks it and traps if that ever changes.
constexpr uint32_t GV_SMEM_BASE = 1024;
constexpr int GV_SMEM_MAX = 227 * 1024;

// Dynamic shared memory of the GEMV, NW warps, S ring slots per warp:
//   [0, TBL_OFF)            the next tile's 16-entry tables (lt, as T), the reduction buffer
//                           (red, when it fits), then SF of each warp's ring slots;
//   [TBL_OFF, +TBL)         the pair tables, at a shared address aligned to ALIGN;
//   [TBL_OFF + TBL, ...)    the other S - SF ring slots (then red, when it does not fit in front).
// None of them alias: a tile needs two barriers (tables built; partial sums stored).
// The alignment lets a lookup's address be the code byte/6 bits dropped into the lane's base
// address by one PRMT (4-bit: entry at bits 8..15, 64 KB of table) or one LOP3 (3-bit: bits 8..13,
// 16 KB), with no add: the table must start at a multiple of 64 KB / 16 KB.
template <int BITS, int MT, int NW, int S>
struct GvLayout {
  static constexpr int E = Geo<BITS>::E;
  static constexpr int TBL = Geo<BITS>::E2 * 256;
  static constexpr int ALIGN = BITS == 4 ? 65536 : 16384;
  static constexpr int TBL_OFF = ALIGN - (int)GV_SMEM_BASE;
  static constexpr int SLOT = Geo<BITS>::NV * 1024;  // one unit of one row tile
  static constexpr int LT = (16 * E * 2 + 127) / 128 * 128;
  static constexpr int RED = NW * 32 * MT * 4 * 4;
  static constexpr bool RED_FRONT = LT + RED <= TBL_OFF;
  static constexpr int AUX = RED_FRONT ? LT + RED : LT;
  static constexpr int SF_FIT = (TBL_OFF - AUX) / (NW * SLOT);
  static constexpr int SF = SF_FIT < S ? SF_FIT : S;
  static constexpr int RING_F = AUX;
  static constexpr int RING_B = TBL_OFF + TBL;
  static constexpr int RING_END = RING_B + (S - SF) * NW * SLOT;
  static constexpr int RED_OFF = RED_FRONT ? LT : RING_END;
  static constexpr int BYTES = RED_FRONT ? RING_END : RING_END + RED;
  static_assert(BYTES <= GV_SMEM_MAX, "GEMV shared memory");
};

// Outlier (col, val) pairs each lane holds in registers from the prologue to the epilogue, per row.
template <int BITS, int MT> constexpr int gemv_outr() { return MT == 1 ? (BITS == 4 ? 3 : 2) : MT == 2 ? 2 : 1; }

// First chunk of a unit that needs a word of 16-byte plane v (see chunk_bits).
template <int BITS> constexpr int first_chunk(int v) { return BITS == 4 ? 0 : 4 * (4 * v / 3) + 4 * v % 3; }

// Pair-table lookup address: lb = table address + this lane's byte (4*lane, +128 for rows g+8).
template <int BITS, int I>
__device__ __forceinline__ uint32_t pair_addr(uint32_t v, uint32_t lb) {
  if constexpr (BITS == 4) {
    return __byte_perm(v, lb, 0x7604u | (I << 4));  // lb.b0 | v.byte(I) << 8 | lb.b2,b3
  } else {
    const uint32_t s = I == 0 ? v << 8 : I == 1 ? v << 2 : I == 2 ? v >> 4 : v >> 10;  // 6 bits at 8..13
    return (s & 0x3f00u) | lb;
  }
}

// 16 warps per SM: one 16-warp block, or two 8-warp blocks (3-bit only: smaller tables) at
// M <= 16; 8-warp blocks with up to 255 registers above.
template <class T, int BITS, int MT, bool XVEC, int NW, int S>
__global__ void __launch_bounds__(NW * 32, MT <= 2 ? 512 / (NW * 32) : 1)
    lut_gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const uint4* __restrict__ codes,
                    const void* __restrict__ lut, bool lut_f32, const int* __restrict__ rows,
                    const int* __restrict__ cols, const void* __restrict__ vals, bool vals_f32, int M, int N,
                    int K, int U) {
  using G = Geo<BITS>;
  using L = GvLayout<BITS, MT, NW, S>;
  constexpr int E = G::E, NV = G::NV, WU = G::WU, CH = G::CH, KU = G::KU;
  constexpr int THREADS = NW * 32, OUTR = gemv_outr<BITS, MT>();
  constexpr int NACC = MT == 1 ? 2 : 1;                 // independent mma chains at M <= 8
  constexpr int XC = MT == 1 ? (BITS == 4 ? 4 : 2) : MT == 2 && BITS == 4 ? 2 : 1;  // chunks of x loaded ahead
  extern __shared__ __align__(16) unsigned char gsm[];
  T* lt = reinterpret_cast<T*>(gsm);                      // [16][E]
  float* red = reinterpret_cast<float*>(gsm + L::RED_OFF);  // [NW][32][MT*4], after the main loop

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
  const int tiles = (N + 15) / 16;
  const uint32_t sbase = smem_u32(gsm), tbl = sbase + L::TBL_OFF;
  if ((tbl & (L::ALIGN - 1)) != 0) __trap();  // the lookups below rely on this alignment
  const uint32_t lb0 = tbl + 4u * lane, lb1 = tbl + 128u + 4u * lane;

  // ---- Code ring: this warp's slot s holds one unit (NV KB, the tile's run of that unit; lane
  // copies and later reads back its own 16-byte pieces, so cp.async.wait_group is the only sync).
  // Units are streamed in the order the warp consumes them, across row tiles, so the next tile's
  // first units arrive while this one finishes.
  const uint32_t ring_f = sbase + L::RING_F + warp * L::SLOT + 16 * lane;
  const uint32_t ring_b = sbase + L::RING_B + warp * L::SLOT + 16 * lane - L::SF * NW * L::SLOT;
  auto slot_addr = [&](int s) -> uint32_t { return (s < L::SF ? ring_f : ring_b) + (uint32_t)(s * NW * L::SLOT); };
  // Next unit to request: (ptile, pu), its pieces at psrc (a valid address also when there is none
  // left: then the copies read nothing and fill zeros).
  int ptile = blockIdx.x, pu = warp;
  bool pok;
  const uint4* psrc;
  auto pseek = [&]() {
    pok = ptile < tiles && pu < U;
    psrc = codes + (pok ? ((size_t)ptile * U + pu) * G::USTRIDE : 0) + lane;
  };
  pseek();
  auto produce = [&](int s) {
    const uint32_t dst = slot_addr(s);
#pragma unroll
    for (int p = 0; p < 2 * NV; ++p) cp_async16_to(dst + 512 * p, psrc + 32 * p, pok ? 16 : 0);
    cp_async_commit();
    pu += NW;
    if (pok) psrc += (size_t)NW * G::USTRIDE;
    if (pu >= U) {
      pu = warp;
      ptile += gridDim.x;
      pseek();
    }
  };

  // ---- The next tile's 16-entry tables and outlier bounds are requested during this tile.
  constexpr int LV = (16 * E + THREADS - 1) / THREADS;
  float lv[LV];
  int ob[2], oe[2];
  auto load_meta = [&](int tile) {
    const int n0 = tile * 16;
#pragma unroll
    for (int t = 0; t < LV; ++t) {
      const int i = tid + t * THREADS, n = n0 + i / E;
      lv[t] = (i < 16 * E && n < N) ? load_f(lut, lut_f32, (long long)n * E + (i % E)) : 0.f;
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int n = n0 + g + 8 * rr;
      ob[rr] = oe[rr] = 0;
      if (rows != nullptr && n < N) { ob[rr] = rows[n] + warp; oe[rr] = rows[n + 1]; }
    }
  };

  // Activation rows of this lane (rows past M read row 0; their results are never stored), at
  // k = 8q of the first chunk.
  const T* xl[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) xl[i] = x + (size_t)(8 * i + g < M ? 8 * i + g : 0) * K + 8 * q;
  const int ufull = XVEC ? K / KU : 0;  // units whose activations are all inside K

  auto store_lt = [&]() {
#pragma unroll
    for (int t = 0; t < LV; ++t) {
      const int i = tid + t * THREADS;
      if (i < 16 * E) lt[i] = Cvt<T>::t(lv[t]);
    }
  };
  if (blockIdx.x < tiles) load_meta(blockIdx.x);
#pragma unroll
  for (int s = 0; s < S; ++s) produce(s);
  int slot = 0;
  store_lt();
  __syncthreads();

  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int n0 = tile * 16, next = tile + gridDim.x;

    // 1. Pair tables from lt (stored at the end of the previous tile). Thread (r, hi, part) writes
    //    entries e = lo + E*hi, lo in its part, of row r: one 16-byte store per entry (the 4
    //    copies), 8 lanes of a warp filling one 128-byte line.
    {
      constexpr int PARTS = THREADS / (16 * E), LPT = E / PARTS;
      static_assert(PARTS >= 1 && LPT % 2 == 0, "table build split");
      const int r = tid & 15, rest = tid >> 4, hi = rest % E, part = rest / E;
      const T* l = lt + r * E;
      const uint32_t lhi = bits16(l[hi]);
      uint32_t lo[LPT / 2];
#pragma unroll
      for (int j = 0; j < LPT / 2; ++j) lo[j] = reinterpret_cast<const uint32_t*>(l + part * LPT)[j];
      const uint32_t dst = tbl + (uint32_t)(part * LPT + E * hi) * 256 + (r >> 3) * 128 + 16 * (r & 7);
#pragma unroll
      for (int j = 0; j < LPT; ++j) sts_u32x4(dst + 256 * j, __byte_perm(lo[j / 2], lhi, j & 1 ? 0x5432 : 0x5410));
    }

    // 2. This lane's first OUTR outliers of rows n0 + g, n0 + g + 8 (warps split each list), in
    //    flight during the main loop; then the next tile's tables and bounds.
    int oc[2][OUTR], cb[2], ce[2];
    float ov[2][OUTR];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      cb[rr] = ob[rr];
      ce[rr] = oe[rr];
#pragma unroll
      for (int o = 0; o < OUTR; ++o) {
        const int j = ob[rr] + o * NW;
        const bool ok = j < oe[rr];
        oc[rr][o] = ok ? cols[j] : -1;
        ov[rr][o] = ok ? load_f(vals, vals_f32, j) : 0.f;
      }
    }
    if (next < tiles) load_meta(next);

    float acc[NACC][MT][4];
#pragma unroll
    for (int a = 0; a < NACC; ++a)
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[a][i][j] = 0.f;
    __syncthreads();  // barrier B: tables built

    // 3. Main loop: units u = warp, warp + NW, ... Lane (g, q): A = weight rows g, g+8 (pairs
    //    looked up in bank 4g+q), B = x rows 8i+g, k = 8q..8q+7 of each chunk.
    auto unit = [&](int u, auto tail) {
      [[maybe_unused]] constexpr bool TAIL = decltype(tail)::value;
      cp_async_wait<S - 1>();  // this slot's unit (the oldest group in flight) has landed
      const uint32_t sa = slot_addr(slot);
      // Each 16-byte plane of code words is read just before the first chunk that needs it
      // (3-bit: at most two of the three planes are live at a time).
      uint32_t wa[WU], wb[WU];
      auto load_plane = [&](int v) {
        const uint4 a = lds_ring(sa + 1024 * v), b = lds_ring(sa + 1024 * v + 512);
        wa[4 * v] = a.x; wa[4 * v + 1] = a.y; wa[4 * v + 2] = a.z; wa[4 * v + 3] = a.w;
        wb[4 * v] = b.x; wb[4 * v + 1] = b.y; wb[4 * v + 2] = b.z; wb[4 * v + 3] = b.w;
      };
      const int kb = u * KU;
      const T* xu[MT];
#pragma unroll
      for (int i = 0; i < MT; ++i) xu[i] = xl[i] + kb;
#pragma unroll
      for (int c4 = 0; c4 < CH; c4 += XC) {
        uint4 xv[XC][MT];
#pragma unroll
        for (int c = 0; c < XC; ++c)
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            const int k = kb + 32 * (c4 + c);  // this lane's activations: k + 8q .. k + 8q + 7
            if constexpr (!XVEC) {
              xv[c][i] = load_x8<T, false>(xl[i] - 8 * q, k + 8 * q, K, true);
            } else {
              const uint4* p = reinterpret_cast<const uint4*>(xu[i] + 32 * (c4 + c));
              xv[c][i] = !TAIL || k + 8 * q < K ? *p : make_uint4(0, 0, 0, 0);
            }
          }
#pragma unroll
        for (int c = 0; c < XC; ++c) {
#pragma unroll
          for (int v = 0; v < NV; ++v)
            if (first_chunk<BITS>(v) == c4 + c) load_plane(v);
          const uint32_t va = chunk_bits<BITS>(wa, c4 + c), vb = chunk_bits<BITS>(wb, c4 + c);
          const uint32_t a0 = lds_u32(pair_addr<BITS, 0>(va, lb0)), a1 = lds_u32(pair_addr<BITS, 0>(vb, lb1));
          const uint32_t a2 = lds_u32(pair_addr<BITS, 1>(va, lb0)), a3 = lds_u32(pair_addr<BITS, 1>(vb, lb1));
          const uint32_t a4 = lds_u32(pair_addr<BITS, 2>(va, lb0)), a5 = lds_u32(pair_addr<BITS, 2>(vb, lb1));
          const uint32_t a6 = lds_u32(pair_addr<BITS, 3>(va, lb0)), a7 = lds_u32(pair_addr<BITS, 3>(vb, lb1));
          float(&ac)[MT][4] = acc[(c4 + c) % NACC];
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            mma_16816<T>(ac[i], a0, a1, a2, a3, xv[c][i].x, xv[c][i].y);
            mma_16816<T>(ac[i], a4, a5, a6, a7, xv[c][i].z, xv[c][i].w);
          }
        }
      }
      produce(slot);  // refill the slot just read (its words were consumed above)
      slot = slot + 1 == S ? 0 : slot + 1;
    };
    int u = warp;
    for (; u < ufull; u += NW) unit(u, std::false_type{});
    for (; u < U; u += NW) unit(u, std::true_type{});

    // 4. Outliers (x rows 8i + 2q + {0, 1}), after the main loop: their lists have arrived and x is
    //    in L1. Entries past the first OUTR of this lane are read now.
#pragma unroll
    for (int a = 1; a < NACC; ++a)
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[0][i][j] += acc[a][i][j];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
      for (int o = 0; o < OUTR; ++o) {
        const int col = oc[rr][o];
        if (col >= 0) {
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
              const int m = 8 * i + 2 * q + jj;
              if (m < M) acc[0][i][2 * rr + jj] = fmaf(ov[rr][o], Cvt<T>::f(x[(size_t)m * K + col]), acc[0][i][2 * rr + jj]);
            }
        }
      }
#pragma unroll 4
      for (int j = cb[rr] + OUTR * NW; j < ce[rr]; j += NW) {
        const float v = load_f(vals, vals_f32, j);
        const int col = cols[j];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
            const int m = 8 * i + 2 * q + jj;
            if (m < M) acc[0][i][2 * rr + jj] = fmaf(v, Cvt<T>::f(x[(size_t)m * K + col]), acc[0][i][2 * rr + jj]);
          }
      }
    }

    // 5. The next tile's 16-entry tables (this tile's build is done with lt: barrier B), then a
    //    fixed-order reduction over warps: deterministic, no atomics. C fragment: acc[0][i][j] =
    //    y[m = 8i + 2q + (j&1)][n0 + g + 8(j>>1)]. After barrier C every warp is past its main
    //    loop, so the next tile's build may overwrite the pair tables; red is read before the next
    //    tile's barrier B, and written again only after it.
    if (next < tiles) store_lt();
    constexpr int PER = MT * 4;
#pragma unroll
    for (int i = 0; i < MT; ++i)
      reinterpret_cast<float4*>(red + (warp * 32 + lane) * PER)[i] =
          make_float4(acc[0][i][0], acc[0][i][1], acc[0][i][2], acc[0][i][3]);
    __syncthreads();  // barrier C
    for (int idx = tid; idx < 32 * PER; idx += THREADS) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) s += red[w * 32 * PER + idx];
      const int l = idx / PER, i = (idx / 4) % MT, j = idx & 3;
      const int m = 8 * i + 2 * (l & 3) + (j & 1), n = n0 + (l >> 2) + 8 * (j >> 1);
      if (m < M && n < N) y[(size_t)m * N + n] = Cvt<T>::t(s);
    }
  }
  cp_async_wait<0>();  // no copy into shared memory outlives the block
}

// ---- GEMM (prefill) ----
// 128x128 output tile per block, 32 k per stage, PST stages of activations and raw codes in flight
// through cp.async; each stage's codes are dequantized (plus that stage's outliers) into a
// double-buffered [n][k] tile one stage ahead of the tensor cores, so one barrier per stage.
// Outliers are folded into the dequantized weight (one rounding of lut + val): the two threads of
// a row walk its CSR list, whose cols must be increasing (checkOutlierCsr enforces it).
constexpr int PBM = 128, PBN = 128, PBK = 32, PST = 5, PLD = PBK + 8, PM_THREADS = 256;

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <int BITS>
constexpr size_t pgemm_smem_bytes() {
  return (size_t)PST * PBM * PLD * 2          // activations
         + (size_t)PST * (BITS == 4 ? 1 : 3) * 512 * 4  // raw codes
         + (size_t)2 * PBN * PLD * 2           // dequantized weights
         + (size_t)Geo<BITS>::E * PBN * 4;     // tables
}

template <class T, int BITS, bool XVEC>
__global__ void __launch_bounds__(PM_THREADS, 2)
    lut_gemm_mma_kernel(T* __restrict__ y, const T* __restrict__ x, const uint32_t* __restrict__ codes,
                        const void* __restrict__ lut, bool lut_f32, const int* __restrict__ rows,
                        const int* __restrict__ cols, const void* __restrict__ vals, bool vals_f32, int M, int N,
                        int K, int U) {
  using G = Geo<BITS>;
  constexpr int E = G::E, CW = BITS == 4 ? 1 : 3;  // raw words per code item and stage (at most)
  extern __shared__ __align__(16) unsigned char psm[];
  T* xs = reinterpret_cast<T*>(psm);                                         // [PST][PBM][PLD]
  uint32_t* cs = reinterpret_cast<uint32_t*>(xs + PST * PBM * PLD);          // [PST][CW][512]
  T* ws = reinterpret_cast<T*>(cs + PST * CW * 512);                         // [2][PBN][PLD]
  float* lut_s = reinterpret_cast<float*>(ws + 2 * PBN * PLD);               // [E][PBN]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = blockIdx.y * PBM, n0 = blockIdx.x * PBN;
  const int Np = (N + 15) / 16 * 16;
  for (int i = tid; i < E * PBN; i += PM_THREADS) {
    const int e = i / PBN, c = i % PBN;
    lut_s[i] = (n0 + c < N) ? load_f(lut, lut_f32, (long long)(n0 + c) * E + e) : 0.f;
  }

  // Code items (row r, quarter q), 2 per thread and fixed for the whole loop: row r = tid % 128,
  // quarters q0 = tid / 128 and q0 + 2. The thread walks row r's sorted outlier list once, with
  // the next 4 entries in registers (refilled as they are used, so a load is needed only ~4 uses
  // later: at 0.45% outliers about 7 stages).
  const uint32_t* cp[2];
  bool cok[2];
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int item = tid + it * PM_THREADS, r = item & (PBN - 1), q = item >> 7, n = n0 + r;
    cok[it] = n < Np;
    const int nn = cok[it] ? n : 0;
    cp[it] = codes + (size_t)(nn >> 4) * U * 64 * G::WU + ((nn & 15) * 4 + q) * 4;  // word w at + (w/4)*256 + w%4
  }
  int op = 0, oe = 0;
  {
    const int n = n0 + (tid & (PBN - 1));
    if (rows != nullptr && n < N) { op = rows[n]; oe = rows[n + 1]; }
  }
  // (scalars, not arrays: the lambdas below capture them by reference)
  int oc0 = INT_MAX, oc1 = INT_MAX, oc2 = INT_MAX, oc3 = INT_MAX;
  float ov0 = 0.f, ov1 = 0.f, ov2 = 0.f, ov3 = 0.f;
  if (op < oe) { oc0 = cols[op]; ov0 = load_f(vals, vals_f32, op); }
  if (op + 1 < oe) { oc1 = cols[op + 1]; ov1 = load_f(vals, vals_f32, op + 1); }
  if (op + 2 < oe) { oc2 = cols[op + 2]; ov2 = load_f(vals, vals_f32, op + 2); }
  if (op + 3 < oe) { oc3 = cols[op + 3]; ov3 = load_f(vals, vals_f32, op + 3); }

  const int steps = (K + PBK - 1) / PBK;
  auto issue = [&](int s) {
    const int buf = s % PST;
    // activations: 128 rows x 32 k, 2 x 16 bytes per thread
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int item = tid + it * PM_THREADS, xm = item >> 2, xk = (item & 3) * 8;
      const int m = m0 + xm, k = s * PBK + xk;
      T* dst = xs + ((size_t)buf * PBM + xm) * PLD + xk;
      if (XVEC) {
        const bool ok = m < M && k < K;
        cp_async16(dst, ok ? x + (size_t)m * K + k : x, ok);
      } else {
        *reinterpret_cast<uint4*>(dst) = load_x8<T, false>(x + (size_t)(m < M ? m : 0) * K, k, K, m < M);
      }
    }
    // raw codes of the stage's chunk
    const int u = s / G::CH, c = s % G::CH;
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const int item = tid + it * PM_THREADS;
      const uint32_t* w = cp[it] + (size_t)u * 64 * G::WU;
      auto wp = [&](int i) { return cok[it] ? w + (i >> 2) * 256 + (i & 3) : codes; };
      uint32_t* d = cs + (size_t)buf * CW * 512 + item;
      if constexpr (BITS == 4) {
        cp_async4(d, wp(c), cok[it]);
      } else {
        const int b = c >> 2, cc = c & 3;
        if (cc < 3) {
          cp_async4(d, wp(3 * b + cc), cok[it]);
        } else {
#pragma unroll
          for (int j = 0; j < 3; ++j) cp_async4(d + j * 512, wp(3 * b + j), cok[it]);
        }
      }
    }
  };
  auto dequant = [&](int s) {
    const int buf = s % PST, wb = s & 1, c = s % G::CH;
    const int r = tid & (PBN - 1), q0 = tid >> 7;
    float w[2][8];
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      const uint32_t* src = cs + (size_t)buf * CW * 512 + tid + it * PM_THREADS;
      uint32_t v;
      if constexpr (BITS == 4) v = src[0];
      else v = (c & 3) < 3 ? src[0] : __byte_perm(__byte_perm(src[0], src[512], 0x0073), src[1024], 0x0710);
#pragma unroll
      for (int j = 0; j < 8; ++j) w[it][j] = lut_s[((v >> (BITS * j)) & (E - 1)) * PBN + r];
    }
    // This stage's outliers of row r (cols sorted): those of quarters q0 and q0 + 2 are ours.
    const int base = s * PBK;
    while (oc0 < base + PBK) {
      const int d = oc0 - base, dq = d >> 3;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        w[0][j] += (dq == q0 && (d & 7) == j) ? ov0 : 0.f;
        w[1][j] += (dq == q0 + 2 && (d & 7) == j) ? ov0 : 0.f;
      }
      ++op;
      oc0 = oc1; ov0 = ov1;
      oc1 = oc2; ov1 = ov2;
      oc2 = oc3; ov2 = ov3;
      oc3 = op + 3 < oe ? cols[op + 3] : INT_MAX;
      ov3 = op + 3 < oe ? load_f(vals, vals_f32, op + 3) : 0.f;
    }
#pragma unroll
    for (int it = 0; it < 2; ++it) {
      uint4 o;
      o.x = pack2<T>(Cvt<T>::t(w[it][0]), Cvt<T>::t(w[it][1]));
      o.y = pack2<T>(Cvt<T>::t(w[it][2]), Cvt<T>::t(w[it][3]));
      o.z = pack2<T>(Cvt<T>::t(w[it][4]), Cvt<T>::t(w[it][5]));
      o.w = pack2<T>(Cvt<T>::t(w[it][6]), Cvt<T>::t(w[it][7]));
      *reinterpret_cast<uint4*>(ws + ((size_t)wb * PBN + r) * PLD + 8 * (q0 + 2 * it)) = o;
    }
  };

  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32, g = lane >> 2, qq = lane & 3;
  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < PST - 1; ++s) {
    if (s < steps) issue(s);
    cp_async_commit();
  }
  cp_async_wait<PST - 2>();
  __syncthreads();  // stage 0 and the tables are visible
  if (steps > 0) dequant(0);
  for (int s = 0; s < steps; ++s) {
    cp_async_wait<PST - 3>();
    __syncthreads();  // stage s+1 landed; everyone is done with stage s-1 and its buffers
    if (s + PST - 1 < steps) issue(s + PST - 1);
    cp_async_commit();
    if (s + 1 < steps) dequant(s + 1);
    const T* xb = xs + (size_t)(s % PST) * PBM * PLD;
    const T* wbp = ws + (size_t)(s & 1) * PBN * PLD;
#pragma unroll
    for (int kk = 0; kk < PBK; kk += 16) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) ldmatrix_x4(a[i], xb + (wm + 16 * i + (lane & 15)) * PLD + kk + (lane >> 4) * 8);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        uint32_t r4[4];
        ldmatrix_x4(r4, wbp + (wn + 16 * jj + (lane & 7) + ((lane >> 4) << 3)) * PLD + kk + ((lane >> 3) & 1) * 8);
        b[2 * jj][0] = r4[0]; b[2 * jj][1] = r4[1]; b[2 * jj + 1][0] = r4[2]; b[2 * jj + 1][1] = r4[3];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16816<T>(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b[j][0], b[j][1]);
    }
  }
  cp_async_wait<0>();

  // C fragment (i, j): e = 0,1 at (m0+wm+16i+g, n0+wn+8j+2qq+e), e = 2,3 at row +8.
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + wm + 16 * i + g + 8 * (e >> 1), n = n0 + wn + 8 * j + 2 * qq + (e & 1);
        if (m < M && n < N) y[(size_t)m * N + n] = Cvt<T>::t(acc[i][j][e]);
      }
}

// ---- repack ----
template <int BITS>
__global__ void lut_repack_kernel(uint32_t* __restrict__ dst, const uint32_t* __restrict__ q, int N, int groups,
                                  int U, int quarters) {
  using G = Geo<BITS>;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // quarter: ((tile*U + u)*16 + r)*4 + qq
  if (idx >= quarters) return;
  const int qq = idx & 3, r = (idx >> 2) & 15, tu = idx >> 6, u = tu % U, tile = tu / U;
  const int n = tile * 16 + r;
  uint32_t out[G::WU];
#pragma unroll
  for (int w = 0; w < G::WU; ++w) out[w] = 0;
#pragma unroll
  for (int c = 0; c < G::CH; ++c) {
    const int grp = u * G::CH + c;
    uint32_t v = 0;  // the 8 codes k = 8qq..8qq+7 of group grp, 'BITS' bits each
    if (n < N && grp < groups) {
      if constexpr (BITS == 4) {
        v = q[((size_t)grp * 4 + qq) * N + n];
      } else {
        const uint32_t w0 = q[((size_t)grp * 3) * N + n], w1 = q[((size_t)grp * 3 + 1) * N + n],
                       w2 = q[((size_t)grp * 3 + 2) * N + n];
        // 96-bit group, code i at bit 3i: codes 8qq.. start at bit 24qq.
        const int bit = 24 * qq;
        const uint32_t lo = bit < 32 ? w0 : bit < 64 ? w1 : w2;
        const uint32_t hi = bit < 32 ? w1 : bit < 64 ? w2 : 0u;
        v = __funnelshift_r(lo, hi, bit & 31) & 0xffffffu;
      }
    }
    if constexpr (BITS == 4) {
      out[c] = v;
    } else {
      const int b = c >> 2, cc = c & 3;
      if (cc < 3) {
        out[3 * b + cc] |= v;
      } else {
        out[3 * b] |= (v & 0xffu) << 24;
        out[3 * b + 1] |= ((v >> 8) & 0xffu) << 24;
        out[3 * b + 2] |= ((v >> 16) & 0xffu) << 24;
      }
    }
  }
  uint32_t* d = dst + (size_t)tu * 64 * G::WU + (r * 4 + qq) * 4;
#pragma unroll
  for (int w = 0; w < G::WU; ++w) d[(w >> 2) * 256 + (w & 3)] = out[w];
}

// NW warps per block share one set of pair tables; S ring slots of codes per warp.
template <class T, int BITS, int MT, bool XVEC, int NW, int S>
void launch_gemv(T* yp, const T* xp, const uint4* cp, const void* lp, bool lf, const int* rp, const int* colp,
                 const void* vp, bool vf, int M, int N, int K, int U, cudaStream_t st) {
  constexpr int smem = GvLayout<BITS, MT, NW, S>::BYTES;
  auto kern = lut_gemv_kernel<T, BITS, MT, XVEC, NW, S>;
  // Tables above 48 KiB need the opt-in, once per device for each instantiation.
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "lutMatmul: cudaGetDevice");
  const uint64_t bit = 1ull << (dev & 63);
  if (!(configured.load() & bit)) {
    cuda_check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "lutMatmul: cudaFuncSetAttribute");
    configured.fetch_or(bit);
  }
  // One wave of blocks (they walk the row tiles): no tail wave, and each block's prologue latency
  // is paid once.
  static int wave[64] = {0};
  if (wave[dev & 63] == 0) {
    int per_sm = 0, sms = 0;
    cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, NW * 32, smem), "lutMatmul: occupancy");
    cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "lutMatmul: SM count");
    wave[dev & 63] = per_sm * sms > 0 ? per_sm * sms : 1;
  }
  const int tiles = (N + 15) / 16;
  const int blocks = tiles < wave[dev & 63] ? tiles : wave[dev & 63];
  kern<<<dim3(blocks), dim3(NW * 32), smem, st>>>(yp, xp, cp, lp, lf, rp, colp, vp, vf, M, N, K, U);
}

template <class T, int BITS>
void launch(const Tensor& y, const Tensor& x, const Tensor& codes, const Tensor& lut, const Tensor* rows,
            const Tensor* cols, const Tensor* vals, cudaStream_t st) {
  const int M = (int)x.dim(0), K = (int)x.dim(1), N = (int)y.dim(1);
  if (M == 0 || N == 0) return;
  const cpu::LutPacked d(BITS, N, K);
  T* yp = y.ptr<T>();
  const T* xp = x.ptr<T>();
  const bool lf = lut.dtype == DType::F32;
  const int* rp = rows ? rows->ptr<int>() : nullptr;
  const int* cp = cols ? cols->ptr<int>() : nullptr;
  const void* vp = vals ? vals->data() : nullptr;
  const bool vf = vals && vals->dtype == DType::F32;
  const bool vec = (K % 8 == 0) && (reinterpret_cast<uintptr_t>(xp) % 16 == 0);
  const int U = (int)d.U;
  // The unvectorised activation path (K % 8 != 0 or x unaligned) takes the GEMV only up to 16 rows.
  if (M <= 16 || (vec && M <= 64)) {
    const uint4* q4 = codes.ptr<uint4>();
    const void* lp = lut.data();
    // Ring slots per warp (units of codes in flight: S - 1 per warp, 16 warps per SM): 80 KB (4-bit)
    // / 96 KB (3-bit) per SM by default, with the rest of the 256 KB left to L1 for x.
    constexpr int SD = BITS == 4 ? 6 : 3;
#define SQZ_GEMV(MT, XV, NW, S) \
  launch_gemv<T, BITS, MT, XV, NW, S>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, st)
    // Tuning (f16, vectorised, M <= 8): SQUEEZELM_LUT_GEMV=1 / 2 takes a shallower / deeper code
    // ring (4-bit 4 / 8 slots, 3-bit 2 / 4); 3 (3-bit) two 8-warp blocks per SM instead of one
    // 16-warp block (each block's barriers then overlap the other's work). Read per call so a
    // benchmark can sweep it.
    const char* tune = std::is_same<T, __half>::value && vec && M <= 8 ? std::getenv("SQUEEZELM_LUT_GEMV") : nullptr;
    const int variant = tune ? std::atoi(tune) : 0;
    if constexpr (BITS == 3) {
      if (variant == 3) {
        SQZ_GEMV(1, true, 8, 3);
        return;
      }
    }
    if (variant == 1) SQZ_GEMV(1, true, 16, (BITS == 4 ? 4 : 2));
    else if (variant == 2) SQZ_GEMV(1, true, 16, (BITS == 4 ? 8 : 4));
    else if (M <= 8 && vec) SQZ_GEMV(1, true, 16, SD);
    else if (M <= 8) SQZ_GEMV(1, false, 16, SD);
    else if (!vec) SQZ_GEMV(2, false, 16, SD);
    else if (M <= 16) SQZ_GEMV(2, true, 16, SD);
    // 17..64 rows: 8 warps (up to 255 registers: 16 / 32 accumulators and as many activation
    // registers a lane), with deeper rings for the same bytes in flight (56 / 72 KB per SM).
    else if (M <= 32) SQZ_GEMV(4, true, 8, (BITS == 4 ? 8 : 4));
    else SQZ_GEMV(8, true, 8, (BITS == 4 ? 8 : 4));
#undef SQZ_GEMV
  } else {
    constexpr size_t smem = pgemm_smem_bytes<BITS>();
    auto kern = vec ? lut_gemm_mma_kernel<T, BITS, true> : lut_gemm_mma_kernel<T, BITS, false>;
    static std::atomic<uint64_t> configured{0};
    int dev = 0;
    cuda_check(cudaGetDevice(&dev), "lutMatmul: cudaGetDevice");
    const uint64_t bit = 1ull << (dev & 63);
    if (!(configured.load() & bit)) {
      cuda_check(cudaFuncSetAttribute(lut_gemm_mma_kernel<T, BITS, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 "lutMatmul: cudaFuncSetAttribute");
      cuda_check(cudaFuncSetAttribute(lut_gemm_mma_kernel<T, BITS, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 "lutMatmul: cudaFuncSetAttribute");
      configured.fetch_or(bit);
    }
    dim3 grid((N + PBN - 1) / PBN, (M + PBM - 1) / PBM), block(PM_THREADS);
    kern<<<grid, block, smem, st>>>(yp, xp, codes.ptr<uint32_t>(), lut.data(), lf, rp, cp, vp, vf, M, N, K, U);
  }
}

}  // namespace

void lut_repack(const Tensor& dst, const Tensor& qweight, int bits, cudaStream_t stream) {
  const int N = (int)qweight.dim(1), groups = (int)(qweight.dim(0) / bits);
  const cpu::LutPacked d(bits, N, groups * 32);
  const int quarters = (int)(d.Np / 16 * d.U * 64);
  if (quarters == 0) return;
  const int threads = 128, blocks = (quarters + threads - 1) / threads;
  const uint32_t* q = qweight.ptr<uint32_t>();
  uint32_t* o = dst.ptr<uint32_t>();
  if (bits == 4) lut_repack_kernel<4><<<blocks, threads, 0, stream>>>(o, q, N, groups, (int)d.U, quarters);
  else if (bits == 3) lut_repack_kernel<3><<<blocks, threads, 0, stream>>>(o, q, N, groups, (int)d.U, quarters);
  else fail("ERR_UNSUPPORTED", "lutRepack: bits must be 3 or 4");
}

void lut_matmul_packed(const Tensor& y, const Tensor& x, const Tensor& codes, const Tensor& lut,
                       const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, cudaStream_t stream) {
  const bool bf = x.dtype == DType::BF16;
  if (bits == 4) {
    if (bf) launch<__nv_bfloat16, 4>(y, x, codes, lut, rows, cols, vals, stream);
    else launch<__half, 4>(y, x, codes, lut, rows, cols, vals, stream);
  } else if (bits == 3) {
    if (bf) launch<__nv_bfloat16, 3>(y, x, codes, lut, rows, cols, vals, stream);
    else launch<__half, 3>(y, x, codes, lut, rows, cols, vals, stream);
  } else {
    fail("ERR_UNSUPPORTED", "lutMatmul: bits must be 3 or 4");
  }
}

}  // namespace sqz::cuda
