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
// * Bank conflicts decide the lookup rate: in an A fragment, lane (g = lane/4, q = lane%4) needs
//   rows g and g+8, and the 4 lanes of a row look up different random entries. Each (row, q) gets
//   its own copy of the row's pair table, all in one bank (bank 4g+q): every lookup of a warp hits
//   32 different banks, whatever the codes. Cost: 4 copies x 16 rows x 1 KB = 64 KB per block for
//   4-bit (16 KB for 3-bit), built once per block from the 16-entry tables with 16-byte stores
//   (one store writes the 4 copies of an entry). Entry e of rows g / g+8 sits at byte
//   e*256 + 128h + 4*lane, so a lookup's offset is one byte permute of the code word with the
//   lane's byte: 2 instructions per two weights. (The 3-bit layout keeps each pair's 6 bits in the low
//   bits of a byte, the fourth chunk of every three words spread over the bytes' top two bits, so the
//   same permute serves it after one mask per word; with pairs at bits 6i of a 24-bit run it took a
//   shift and a LOP3 per pair.)
// * The k order inside each 32-wide chunk is permuted exactly as in the dense tensor-core GEMV
//   (gemm/gemv_tc.cuh): lane quarter q owns k = 8q..8q+7 of every chunk, so its activations are
//   one 16-byte load per chunk and its codes are contiguous. The repacked codes put the 4 (4-bit)
//   or 12 (3-bit) words a lane needs for one unit of K (128 / 512 k) in 16-byte pieces: one
//   (4-bit) or three (3-bit) 16-byte streaming loads per row and unit, each warp-wide load one
//   contiguous 512-byte run (the 3-bit pieces lie in planes, so no sector is fetched twice).
// * A block owns 16 output rows (RT = 2 row tiles for M > 8, see below) and all of K; its 8 warps
//   (16 for 4-bit at M = 9-16: launch_gemv_m16; 4 for 3-bit at M <= 2 over many row groups:
//   decode_w4) split K by units (unit u to warp u mod warps), each with P
//   register buffers of codes: a unit is decoded straight from its buffer, which is then refilled P
//   units ahead (P - 1 in flight during a decode;
//   refilling before the decode would cost a register copy of every word). Measured slower on
//   the H200 (4-bit D+S 8192x8192, M = 1, against 15.1 us) and removed: 3 or 4 buffers, 15.7 /
//   16.0 us; a cp.async ring in shared memory instead of registers, 17.0-17.3 us; two row tiles per
//   block, 19.5 us; an L2 prefetch of a group's codes one group ahead, 16.1 us. The SASS puts every
//   code load on one scoreboard, so the first use of a buffer also waits for the refills requested
//   after it: with P = 2 about one memory latency per two units. What is kept instead (4-bit,
//   M <= 8): each refill also prefetches into L2 the unit two rounds (32 units) ahead, so that
//   unit's register load later waits for L2, not DRAM; a prefetch holds no register and no
//   scoreboard (measurements at launch_gemv). (Two sets of buffers, each waited
//   for before the other is refilled, measured 2-4% faster for 4-bit D+S at M = 1 on the large
//   shapes but 4-12% slower at 4096x4096, at M = 4-8 and for 3-bit: the second set spills.)
//   The one-row-tile kernels may instead take each warp's units through a ring of RING
//   shared-memory slots filled by bulk copies (template RING, UPS units per slot; the choice is in
//   launch()): units in flight with no register or scoreboard held, and the stream runs on through
//   each group's table build and reduction. At 4 bits two slots of two units (one 2 KB copy each)
//   are faster than the register buffers at every K measured; one-unit slots (1 KB copies) were
//   not, beyond K = 4096: the copy engine takes about as long per request whatever its size.
//   The grid is one wave (2 blocks per SM fit with 64 KB tables each) and each block walks
//   row-tile groups, so there is no tail wave; a group's 16-entry tables and outlier row bounds
//   are requested during the previous group's main loop, and each code buffer takes the next
//   group's unit as soon as it has been decoded for the last time in this group (a warp's stream
//   of units runs on across groups), so only the table build sits between two groups (for 3-bit,
//   and 4-bit at M = 1: see launch_gemv for the measurements). The pair-table build is one 16-byte
//   load of a row's table, then one byte permute and one 16-byte store per entry (it was an
//   address computation and two 2-byte loads per entry, as costly as a third of the main loop at
//   K = 8192). The 8 partial tiles are summed in shared memory in warp order: deterministic, no
//   atomics.
// * Programmatic dependent launch: the prologue (tables, outlier lists, first codes, the first
//   table build) reads weights only and runs before griddepcontrol.wait, under the previous kernel.
// * Lookups take 32-bit shared addresses (ld.shared): the table base is then a constant folded into
//   the load, where a generic pointer cost one add per lookup.
// * Every block rereads all of x (L1 holds it for small M, otherwise it comes from L2: M*K*2 bytes
//   per block against 8*K bytes of 4-bit codes). For M > 8 a block takes 2 row tiles sharing
//   each activation load, which halves that traffic.
// * Outliers (CSR over output rows) are added to the accumulators by the same launch after the
//   main loop (split over warps; the decode kernels add each lane's first entries during it:
//   EARLY_X): each lane's first entries are requested before the main loop (volatile loads: the
//   compiler otherwise sinks them to their use) and arrive during it, and x is in L1 by then.
//   Values stay raw bits until used: converting at the load would wait for it.
//   From M = 3 (3-bit) or 6 (4-bit) on the outlier step reads the activations transposed (xT,
//   written by the launch's own blocks, a slice each, behind a grid barrier): one 16-byte load per
//   outlier and 8 activation rows instead of one scattered load per row; see the XT notes.
// * x is read through L1 (it is small and every block rereads it); codes with L1::no_allocate.
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
#include "core/env.h"
#include "core/error.h"
#include "cpu/lut_gemm.h"
#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/dynamic_smem.cuh"
#include "kernels/common/hopper.h"
#include "kernels/common/launch_config.h"
#include "kernels/common/process_buffer.h"
#include "kernels/common/rope_append.cuh"
#include "kernels/common/silu.cuh"
#include "kernels/common/pdl.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/gemm/gemm.h"
#include "lut_gemm.h"

namespace sqz::cuda {
namespace {

using cpu::lut_pair_row;

// What the GEMV does around its product. Results: stored rows paired at `half` (cpu/lut_gemm.h; 0:
// not paired); mode kStoreRows writes both rows of a pair, kStoreSilu the SiLU-and-multiply of a row
// and its partner, kStoreRope does ropeAppend's work on a rotation pair (q into q_out, k and v into
// the paged caches), kStoreResidual adds each result, rounded as a store leaves it, to y (the
// residual stream). In front: with gamma set, the product is of rmsnorm(x) * gamma (the XS kernels,
// M <= 2: see rms_norm_to_smem).
constexpr int kStoreRows = 0, kStoreSilu = 1, kStoreRope = 2, kStoreResidual = 3;
// A GEMV kernel's epilogue code (template EPI): kEpiAny carries every mode and picks one at run time;
// kStoreSilu / kStoreRope / kStoreResidual carry that one only, kEpiPlain the plain store of unpaired
// rows only (launch_gemv_decode).
constexpr int kEpiAny = -1, kEpiPlain = 4;
struct LutStore {
  int half;
  int mode;
  RopeAppendParams rope;  // kStoreRope
  void* q_out;
  void* kc;
  void* vc;
  const void* gamma;  // RMSNorm weight [K] in the activation dtype, or null
  float eps;
};
// The packed codes of the weight whose launch follows (kernels with NEXT; null: none): its row groups of
// 16 rows are group_bytes apart and end at end; from row group `from` on (the last round, set by
// launch_gemv) each warp of a block requests warp_bytes of them into L2 at its end (the kernel, step
// 5b). A kernel parameter of its own: grown by these fields, LutStore changed how the compiler built
// every GEMV kernel (ptxas allocated 140 of 186 differently; 3-bit decode GEMVs lost 3-7%).
struct NextCodes {
  const unsigned char* codes;
  const unsigned char* end;
  long long group_bytes;
  int block_bytes, warp_bytes, from;
};
// What the host side of a GEMV launch carries: the kernel's LutStore and the next launch's codes.
struct LutLaunch : LutStore {
  NextCodes next;
  long long nnz;  // outlier entries of the weight (0: dense-only), for launch rules that depend on row lengths
};


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
// The value of 16 raw bits of T (one element; unpack2f converts a pair: for bf16 this is one shift
// where that is a pair conversion).
template <class T> __device__ __forceinline__ float bits_f(uint32_t b);
template <> __device__ __forceinline__ float bits_f<__half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
template <> __device__ __forceinline__ float bits_f<__nv_bfloat16>(uint32_t b) { return __uint_as_float(b << 16); }
template <class T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return bits16(lo) | (bits16(hi) << 16);
}

// kStoreRope: output rows o (< half into its head) and o + half of row m of q|k|v, each value rounded
// to T as the unfused projection stores it; then what rope_append_piece (common/fused.cu) does with
// them, with the same rotation (common/rope_append.cuh), so both give the same bits.
template <class T>
__device__ __forceinline__ void lut_rope_store(const LutStore& so, int m, int o, float z1, float z2) {
  const RopeAppendParams& p = so.rope;
  const int half = p.half, D = 2 * half, h = o / D, i = o - h * D;
  const float x1 = Cvt<T>::f(Cvt<T>::t(z1)), x2 = Cvt<T>::f(Cvt<T>::t(z2));
  T* out;
  float y1 = x1, y2 = x2;
  if (h < p.Hq) {
    out = static_cast<T*>(so.q_out) + ((int64_t)m * p.Hq + h) * D;
  } else {
    const long long dst = rope_slot_offset(p, m);
    if (dst < 0) return;
    out = h < p.Hq + p.Hkv ? static_cast<T*>(so.kc) + dst + (int64_t)(h - p.Hq) * D
                           : static_cast<T*>(so.vc) + dst + (int64_t)(h - p.Hq - p.Hkv) * D;
  }
  if (h < p.Hq + p.Hkv) rope_rotate(p, m, i, x1, x2, &y1, &y2);
  out[i] = Cvt<T>::t(y1);
  out[i + half] = Cvt<T>::t(y2);
}

// Guarded reads in this file are plain loads, never __ldg: __ldg is a non-volatile asm statement
// that the compiler treats as side-effect free and may hoist above its guard (out of a loop whose
// trip count is zero), turning "no outliers" (null vals/cols) or a column past N into an
// out-of-bounds read. Plain loads of read-only data still compile to the non-coherent path.
__device__ __forceinline__ float load_f(const void* p, bool is_f32, long long i) {
  if (is_f32) return static_cast<const float*>(p)[i];
  return __half2float(static_cast<const __half*>(p)[i]);
}
// The same value as raw bits (f32 bits, or f16 bits in the low half), converted only where it is
// used: a conversion right after a load would stall the warp until the load lands, and these loads
// are meant to stay in flight under the main loop.
__device__ __forceinline__ uint32_t load_raw(const void* p, bool is_f32, long long i) {
  if (is_f32) return static_cast<const uint32_t*>(p)[i];
  return static_cast<const unsigned short*>(p)[i];
}
// Outlier lists loaded under the main loop (ptx.cuh ld_pinned_*: plain loads would be sunk to their
// use in the epilogue), as raw bits.
__device__ __forceinline__ uint32_t ld_early_raw(const void* p, bool is_f32, long long i) {
  return is_f32 ? ld_pinned_u32(static_cast<const uint32_t*>(p) + i) : ld_pinned_u16(static_cast<const unsigned short*>(p) + i);
}
__device__ __forceinline__ float raw_f(uint32_t r, bool is_f32) {
  return is_f32 ? __uint_as_float(r) : __half2float(__ushort_as_half(static_cast<unsigned short>(r)));
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

// The pair bytes of chunk c of a unit from a quarter's words (pair i = codes 2i, 2i+1 in byte i, the
// byte's other bits zero; code j at bit cpu::lut_code_shift(BITS, j)): cpu::lut_chunk_pairs, the CPU
// op's own reader.
template <int BITS>
__device__ __forceinline__ uint32_t chunk_pairs(const uint32_t (&w)[Geo<BITS>::WU], int c) {
  return cpu::lut_chunk_pairs(w, BITS, c);
}

constexpr int GV_WARPS = 8;

template <int BITS, int MT, int RT, int W = GV_WARPS>
constexpr size_t gemv_table_bytes() {
  constexpr size_t table = (size_t)RT * Geo<BITS>::E2 * 256;
  constexpr size_t red = (size_t)W * 32 * RT * MT * 4 * 4;
  return table > red ? table : red;
}
// The 16-entry tables follow the pair tables; with XT, the block's outlier sums [16 RT rows][8 MT
// activation rows] (fp32) follow those.
template <int BITS, int MT, int RT, bool XT = false, int W = GV_WARPS>
constexpr size_t gemv_smem_bytes() {
  return gemv_table_bytes<BITS, MT, RT, W>() + 16 * RT * Geo<BITS>::E * 2 + (XT ? (size_t)16 * RT * 8 * MT * 4 : 0);
}
// With a code ring (RING slots per warp, the one-row-tile kernels): the slots (UPS units of a warp
// each; a unit is 1 KB at 4 bits, 3 KB at 3) and their mbarriers follow the above (a multiple of 128
// bytes).
template <int BITS, int MT, int RT, bool XT, int W, int RING, int UPS = 1>
constexpr size_t gemv_smem_bytes_ring() {
  return gemv_smem_bytes<BITS, MT, RT, XT, W>() + (size_t)W * RING * (UPS * Geo<BITS>::USTRIDE * 16 + 8);
}

// Outliers from M = 3 (3-bit) or 6 (4-bit) on read the activations transposed, xT[k][8 MT] (zero
// past M): an outlier then needs one 16-byte load per 8 activation rows (one sector at M <= 16),
// where x[m][k] took one scattered load per row (16 sectors at M = 16, 16 KB apart). The GEMV
// writes xT itself: right after griddepcontrol.wait each block transposes its slice of k, then
// arrives on a grid barrier, and waits on it only before its first outlier step, a whole main loop
// later. (A separate transpose kernel before the GEMV cost ~2 us at M = 16: 27.4 against 25.4 us,
// 4-bit D+S 8192x8192, H200.) The grid is one wave by construction (launch_gemv): every block is
// resident before any waits, so the barrier cannot deadlock.
template <class T, int MT>
__device__ __forceinline__ void xt_write_slice(uint4* __restrict__ xT, const T* __restrict__ x, int M, int K) {
  const int kper = (K + gridDim.x - 1) / gridDim.x, k0 = blockIdx.x * kper;
  const int kn = min(kper, K - k0);
  for (int i = threadIdx.x; i < kn * MT; i += blockDim.x) {
    const int k = k0 + i / MT, mg = i % MT;  // neighbours share k: one 16 * MT-byte run of xT
    T v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int m = 8 * mg + e;
      v[e] = m < M ? x[(size_t)m * K + k] : Cvt<T>::t(0.f);
    }
    xT[(size_t)k * MT + mg] =
        make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  }
}
// The grid barrier (sense by the top bit, as cooperative groups' grid sync): every block adds 1
// except block 0, which adds 2^31 - (blocks - 1), so the top bit flips once all have arrived and the
// low bits return to 0 for the next launch. One word per device; launches that use it are serialised
// on the device's stream, as the xT buffer itself.
__device__ unsigned int g_lut_xt_barrier = 0;
__device__ __forceinline__ unsigned int grid_arrive() {  // thread 0, after the block's writes
  __threadfence();
  const unsigned int add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
  return atomicAdd(&g_lut_xt_barrier, add);
}
__device__ __forceinline__ void grid_wait(unsigned int old) {  // thread 0
  unsigned int cur;
  do {
    cur = ld_acquire_gpu_u32(&g_lut_xt_barrier);
  } while (((cur ^ old) & 0x80000000u) == 0);
}

template <class T> __device__ __forceinline__ float2 unpack2f(uint32_t w);
template <> __device__ __forceinline__ float2 unpack2f<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
template <> __device__ __forceinline__ float2 unpack2f<__nv_bfloat16>(uint32_t w) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
}
// The RMSNorm of the decoder fused in front of the GEMV (XS kernels, M <= 2, K % 8 == 0, x 16-byte
// aligned): right after griddepcontrol.wait every block reads x (M * K * 2 bytes, from L2) into its own
// shared memory, sums its squares in fp32, and overwrites it with x * rsqrt(mean(x^2) + eps) * gamma
// rounded once to T, as the rmsNorm kernel computes it (cpu/elementwise.cc norm_row). The main loop and
// the outlier step then read the activations from there. Each block repeats the norm (a few hundred
// cycles); what it saves is the norm kernel and the kernel boundary in front of the GEMV. `red` holds
// 2 * W floats.
template <class T, int W>
__device__ __forceinline__ void rms_norm_to_smem(T* xs, float* red, const T* __restrict__ x, const T* __restrict__ gamma,
                                                 float eps, int M, int K) {
  // Each thread's pieces of 8 (i = tid, tid + NT, ...) are loaded B at a time before any is used, and
  // gamma in 16-byte pieces: one piece of x per loop turn, and gamma as 8 scalar loads per piece, waited
  // an L2 round trip per turn on the critical path of every block. The sums run in the same order as
  // before, so the results are the same bits. H100, a 6-layer LLaMA-2-7B-shaped step, same process,
  // before / after, us: 4-bit 551 / 545, 3-bit 541 / 536 (about 1 us a layer, two fused norms).
  constexpr int NT = W * 32, B = 4;
  const int per_row = K / 8, pieces = M * per_row, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint4* xs4 = reinterpret_cast<uint4*>(xs);
  float ss0 = 0.f, ss1 = 0.f;
  for (int i0 = threadIdx.x; i0 < pieces; i0 += B * NT) {
    uint4 v[B];
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const int i = i0 + j * NT;
      v[j] = i < pieces ? reinterpret_cast<const uint4*>(x)[i] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const int i = i0 + j * NT;
      if (i >= pieces) break;
      xs4[i] = v[j];
      const uint32_t w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = unpack2f<T>(w[e]);
        s = fmaf(f.x, f.x, s);
        s = fmaf(f.y, f.y, s);
      }
      if (i < per_row) ss0 += s;
      else ss1 += s;
    }
  }
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) {
    ss0 += __shfl_xor_sync(0xffffffffu, ss0, off);
    ss1 += __shfl_xor_sync(0xffffffffu, ss1, off);
  }
  if (lane == 0) {
    red[2 * warp] = ss0;
    red[2 * warp + 1] = ss1;
  }
  __syncthreads();
  float t0 = 0.f, t1 = 0.f;  // warps in a fixed order: every block gets the same bits
#pragma unroll
  for (int w = 0; w < W; ++w) {
    t0 += red[2 * w];
    t1 += red[2 * w + 1];
  }
  const float inv0 = 1.0f / sqrtf(t0 / (float)K + eps), inv1 = 1.0f / sqrtf(t1 / (float)K + eps);
  // gamma in 16-byte pieces where it is 16-byte aligned (K is a multiple of 8), else gathered
  const bool gvec = (reinterpret_cast<uintptr_t>(gamma) & 15u) == 0;
  for (int i0 = threadIdx.x; i0 < pieces; i0 += B * NT) {
    uint4 gv[B];
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const int i = i0 + j * NT;
      const int k = 8 * (i >= per_row ? i - per_row : i);
      if (i >= pieces) {
        gv[j] = make_uint4(0u, 0u, 0u, 0u);
      } else if (gvec) {
        gv[j] = *reinterpret_cast<const uint4*>(gamma + k);
      } else {
        gv[j] = make_uint4(pack2<T>(gamma[k], gamma[k + 1]), pack2<T>(gamma[k + 2], gamma[k + 3]),
                           pack2<T>(gamma[k + 4], gamma[k + 5]), pack2<T>(gamma[k + 6], gamma[k + 7]));
      }
    }
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const int i = i0 + j * NT;
      if (i >= pieces) break;
      const float inv = i >= per_row ? inv1 : inv0;
      const uint4 v = xs4[i];
      uint32_t w[4] = {v.x, v.y, v.z, v.w};
      const uint32_t gw[4] = {gv[j].x, gv[j].y, gv[j].z, gv[j].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = unpack2f<T>(w[e]), g = unpack2f<T>(gw[e]);
        w[e] = pack2<T>(Cvt<T>::t(f.x * inv * g.x), Cvt<T>::t(f.y * inv * g.y));
      }
      xs4[i] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  __syncthreads();
}

// s[e] += v * (8 packed activations)[e]
template <class T>
__device__ __forceinline__ void fma8(float (&s)[8], float v, uint4 xq) {
  const uint32_t w[4] = {xq.x, xq.y, xq.z, xq.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 f = unpack2f<T>(w[e]);
    s[2 * e] = fmaf(v, f.x, s[2 * e]);
    s[2 * e + 1] = fmaf(v, f.y, s[2 * e + 1]);
  }
}

// Outlier (col, val) pairs each lane holds in registers from the prologue to the epilogue, per row.
template <int MT, int RT> constexpr int gemv_outr() { return MT * RT == 1 ? 6 : MT * RT == 2 ? 3 : 2; }
// The same with the outlier split (OSPLIT: a row's entries over its 4 lanes in every warp): XPO, or 2.
template <int XPO> constexpr int split_outr() { return XPO > 0 ? XPO : 2; }

// Pair tables, for row tile rt: entry e of row 16rt + 8h + g, copy q, at byte
// rt*E2*256 + e*256 + h*128 + 4*(4g + q). A lane's lookup offset is then one byte permute of the
// chunk's pair bytes (chunk_pairs): the pair's byte next to the lane's byte 4*lane + 128h.
__device__ __forceinline__ uint32_t pair_off(uint32_t v, uint32_t lb, int i) {
  return __byte_perm(v, lb, 0x5504u | ((uint32_t)i << 4));
}
// A lookup: table base (a constant of the launch) + permuted offset, by shared-window address.
__device__ __forceinline__ uint32_t lds_at(uint32_t base, uint32_t off) { return ld_shared_u32(base + off); }

// RT row tiles (16 rows each) per block share every activation load (x is reread from L2 by
// every block: RT = 2 halves that traffic for larger M, at 1 block per SM for 4-bit).
// One unit of K for one warp: wa/wb = the lane's code words of rows g / g+8 of each row tile.
// TWO_CHAINS (the kernel's LEAN_TILE, kernels of one activation tile and one row tile, M <= 8): the two
// products of a chunk go to two accumulator sets (acc and acc2, summed after the group's main loop). Each
// set is a dependent chain of mma; with one set every product of a group waited for the one before it.
template <class T, int BITS, int MT, bool XVEC, int RT, bool TWO_CHAINS>
__device__ __forceinline__ void gemv_unit(float (&acc)[RT][MT][4], float (&acc2)[4], const uint32_t (&wa)[RT][Geo<BITS>::WU],
                                          const uint32_t (&wb)[RT][Geo<BITS>::WU], uint32_t tbl,
                                          const T* const (&xr)[MT], const bool (&mv)[MT], int kb, int K,
                                          uint32_t lb0, uint32_t lb1) {
  using G = Geo<BITS>;
  constexpr int E2 = G::E2, CH = G::CH;
  // Activations of XC chunks at a time, loaded before their lookups.
  constexpr int XC = MT * RT <= 2 ? 4 : 1;
#pragma unroll
  for (int c4 = 0; c4 < CH; c4 += XC) {
    uint4 xv[XC][MT];
#pragma unroll
    for (int c = 0; c < XC; ++c)
#pragma unroll
      for (int i = 0; i < MT; ++i) xv[c][i] = load_x8<T, XVEC>(xr[i], kb + 32 * (c4 + c), K, mv[i]);
#pragma unroll
    for (int c = 0; c < XC; ++c)
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const uint32_t tr = tbl + (uint32_t)(rt * E2 * 256);
        const uint32_t va = chunk_pairs<BITS>(wa[rt], c4 + c), vb = chunk_pairs<BITS>(wb[rt], c4 + c);
        const uint32_t a0 = lds_at(tr, pair_off(va, lb0, 0)), a1 = lds_at(tr, pair_off(vb, lb1, 0));
        const uint32_t a2 = lds_at(tr, pair_off(va, lb0, 1)), a3 = lds_at(tr, pair_off(vb, lb1, 1));
        const uint32_t a4 = lds_at(tr, pair_off(va, lb0, 2)), a5 = lds_at(tr, pair_off(vb, lb1, 2));
        const uint32_t a6 = lds_at(tr, pair_off(va, lb0, 3)), a7 = lds_at(tr, pair_off(vb, lb1, 3));
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          mma_16816<T>(acc[rt][i], a0, a1, a2, a3, xv[c][i].x, xv[c][i].y);
          if constexpr (TWO_CHAINS) mma_16816<T>(acc2, a4, a5, a6, a7, xv[c][i].z, xv[c][i].w);
          else mma_16816<T>(acc[rt][i], a4, a5, a6, a7, xv[c][i].z, xv[c][i].w);
        }
      }
  }
}

template <class T, int BITS, int MT, int P, bool XVEC, int MINB, int RT, int OSPLIT, bool XT, int W, int XPO, int RING,
          int UPS, bool XS, int EPI, bool NEXT>
__global__ void __launch_bounds__(W * 32, MINB)
    lut_gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const uint4* __restrict__ codes,
                    const void* __restrict__ lut, bool lut_f32, const int* __restrict__ rows,
                    const int* __restrict__ cols, const void* __restrict__ vals, bool vals_f32, int M, int N,
                    int K, int U, uint4* xT, int flags, LutStore so, NextCodes nx) {
  using G = Geo<BITS>;
  constexpr int NT = W * 32;  // threads per block
  // A row's outlier list is dealt to the warps; with OSPLIT (D+S launches of one activation tile) also
  // to the 4 lanes of the row, each of which sums its entries for every activation row (MO of them)
  // and passes the sums to the lanes that hold those rows (lane quarter q holds activation rows 2q,
  // 2q+1): without it the step runs on the lane quarters that hold real rows only, each walking the
  // whole share (a quarter of the lanes at M <= 2, half at M = 3-4). OSPLIT = 1: activation rows 0-1
  // (M <= 2); 4: rows 0-3 (M = 3-4, the 4-bit ring kernel; see launch).
  static_assert(OSPLIT == 0 || OSPLIT == 1 || OSPLIT == 4, "outlier split: 2 or 4 activation rows");
  static_assert(!OSPLIT || (MT == 1 && RT == 1), "outlier split: launches of one activation tile");
  static_assert(!(OSPLIT && XT), "one outlier scheme per launch");
  static_assert(!XS || (MT == 1 && RT == 1 && !XT && OSPLIT <= 1), "the fused RMSNorm: M <= 2 launches");
  constexpr int MO = OSPLIT == 4 ? 4 : 2;  // OSPLIT: the activation rows a lane's sums cover
  // XT (D+S launches from M = 3 or 6 on, see launch): thread tid owns (row xrow of the group,
  // activation rows 8 xmg .. 8 xmg + 7) and every XSUB-th outlier of that row from xs on; the XSUB
  // lanes of a (row, xmg) pair are neighbours and sum by butterfly; lane xs = 0 leaves the sums in
  // osum, which the reduction over warps adds. A thread's first XP entries are requested before
  // the main loop, enough for a row of ~50 outliers (0.45% of K = 11008) where registers allow:
  // every entry past them costs a dependent pair of loads (col, then xT) after the main loop, with
  // all warps of the block waiting there (12 against 2: 27.4 against 28.0 us at M = 16, 4-bit D+S
  // 8192x8192, H200). XSUB >= 16 is the one-row-tile kernel of M <= 8 (16 threads per row, 128
  // registers). (Feeding the entries through the main loop as a two-stage pipeline, one step per
  // unit, measured no faster at M = 16-64 and slower at M = 4-8, H200.)
  constexpr int XUNITS = 16 * RT * MT, XSUB = NT / XUNITS;
  // (XPO > 0: a shallower depth the launch picks from the matrix's outliers per row: shallow_outliers.)
  constexpr int XP = XPO > 0 ? XPO : XSUB >= 16 ? 4 : XSUB >= 8 ? 6 : XSUB >= 4 ? 12 : XSUB >= 2 ? 8 : 2;
  static_assert(!XT || (NT % XUNITS == 0 && XSUB >= 1 && XSUB <= 32), "outlier work split");
  // (OSPLIT: XPO > 0 sets the entries per lane and row requested before the main loop, default 2.)
  constexpr int E = G::E, E2 = G::E2, NV = G::NV, OUTR = OSPLIT ? split_outr<XPO>() : XT ? 1 : gemv_outr<MT, RT>();
  constexpr int OSTRIDE = OSPLIT ? 4 * W : W;
  // LEAN_TILE: the two accumulator chains (gemv_unit) and the outlier entries after the main loop read four at a
  // time (sum_rest_outliers), where they were measured faster: the one-tile kernels without the fused
  // RMSNorm or the 4-row outlier split, and without the xT step at 3 bits. H100, M = 1-2, D+S 0.45%, in one
  // process, without / with, us: 3-bit 8192x28672 38.01 / 37.04, 12288x4096 12.91 / 12.24, 22016x4096 19.94
  // / 19.28, 28672x8192 43.17 / 42.69, 4096x4096 4.92 / 4.82, 8192x8192 14.51 / 14.48, 4096x11008 11.38 /
  // 11.46; 4-bit 8192x8192 14.70 / 14.47, 22016x4096 24.59 / 23.99, 8192x28672 44.06 / 43.57, 12288x4096
  // 13.69 / 13.44, M = 2 8192x8192 15.11 / 14.78. The other one-tile kernels, the same A/B (H100, medians
  // of four): the 4-bit xT kernels gain, M = 6 8192x8192 19.91 / 19.29, M = 8 20.70 / 20.14, M = 8
  // 4096x11008 15.41 / 14.87; the 3-bit xT kernels lose, M = 4 17.65 / 17.99, M = 8 19.64 / 20.10, M = 4
  // 22016x4096 29.15 / 29.52 (M = 3 equal); the 4-row split loses at 8192x8192, M = 3 16.76 / 17.19, M = 4
  // 17.70 / 18.26 (M = 4 22016x4096 29.72 / 29.24); with the fused norm a 6-layer LLaMA-2-7B-shaped step
  // took 538.8 / 541.1 us at 4 bits and 476.2 / 476.6 at 3 (docs/log/squeezellm-kernels.md).
  constexpr bool LEAN_TILE = MT * RT == 1 && (!XT || BITS == 4) && OSPLIT != 4 && !XS;
  // OPF (3-bit plain decode products with outliers; on where the launch's blocks take one row group each,
  // flags bit 19, launch_gemv): the lines of each row's outlier entries past the lanes' first OUTR, which
  // the lanes read after the main loop (sum_rest_outliers), are requested into L2 before it, one bulk
  // prefetch of their columns and one of their values per row. The 3-bit 4-warp kernel deals a row to 16
  // lanes, so rows of more than 32 entries have such a rest (37 at 0.45% of K = 8192, 129 at K = 28672), and
  // with one group per block its reads come at the very end of the launch, a DRAM round trip each.
  constexpr bool OPF = BITS == 3 && OSPLIT == 1 && EPI == kEpiPlain && !NEXT;
  SQZ_DYNAMIC_SMEM(smem);
  unsigned char* tbl = smem;  // [RT][E2][2][32] words
  T* lt = reinterpret_cast<T*>(tbl + gemv_table_bytes<BITS, MT, RT, W>());  // [16*RT][E]
  float* osum = reinterpret_cast<float*>(tbl + gemv_table_bytes<BITS, MT, RT, W>() + 16 * RT * E * 2);  // XT
  float* red = reinterpret_cast<float*>(smem);  // [warps][32][RT*MT*4], after the main loop

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
  const bool xgroup = flags & 1;
  const int l2pf = (flags >> 2) & 3;  // SQUEEZELM_LUT_L2PF (launch_gemv)
  const bool l2xg = flags & 16;       // the L2 prefetch runs on into the next group (launch_gemv)
  const bool late_pf = flags & (1 << 17);  // without xgroup: the next group's codes after the outliers
  const bool early_om = flags & (1 << 18);  // EARLY_X: the outlier step in the main loop
  const bool opf = flags & (1 << 19);       // OPF: the outlier rests requested into L2 (launch_gemv)
  const int tiles = (N + 15) / 16, groups = (tiles + RT - 1) / RT;
  const int xs = tid % XSUB, xrow = tid / XSUB / MT, xmg = tid / XSUB % MT;
  int xob = 0, xoe = 0;  // XT: the bounds of this thread's row in the next group

  // The block walks groups of RT row tiles blockIdx.x, + gridDim.x, ... (the grid is one wave; groups
  // claimed at run time from a counter instead were slower on an H100: docs/log/squeezellm-kernels.md).
  // What a group's prologue waits for is requested early: its 16-entry tables and outlier row
  // bounds during the previous group's main loop, its first P units of codes right after it.
  constexpr int LV = (16 * RT * E + NT - 1) / NT;
  uint32_t lv[LV];  // raw table entries of the next group (converted when stored)
  int ob[RT][2], oe[RT][2];
  auto load_meta = [&](int grp) {
    const int n0 = grp * 16 * RT;
#pragma unroll
    for (int t = 0; t < LV; ++t) {
      const int i = tid + t * NT, n = n0 + i / E;
      lv[t] = (i < 16 * RT * E && n < N) ? load_raw(lut, lut_f32, (long long)n * E + (i % E)) : 0u;
    }
    if constexpr (XT) {
      const int n = n0 + xrow;
      xob = xoe = 0;
      if (rows != nullptr && n < N) {
        xob = rows[n];  // raw: an add here would wait for the load (the lane's offset xs comes at use)
        xoe = rows[n + 1];
      }
    } else {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int n = n0 + 16 * rt + g + 8 * rr;
          ob[rt][rr] = oe[rt][rr] = 0;
          if (rows != nullptr && n < N) {
            ob[rt][rr] = rows[n];  // raw, as xob
            oe[rt][rr] = rows[n + 1];
          }
        }
    }
  };

  const uint4* ca[RT];
  bool tok[RT];
  // from a row tile's codes to those of the same tile in the block's next group (grp + gridDim.x)
  const size_t next_step = (size_t)gridDim.x * RT * U * G::USTRIDE;
  auto set_group = [&](int grp) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      const int tile = grp * RT + rt;
      tok[rt] = tile < tiles;
      // row g's plane-0 piece; plane v at +64v, row g+8 at +32 (16-byte units)
      ca[rt] = codes + (size_t)(tok[rt] ? tile : 0) * U * G::USTRIDE + (g * 4 + q);
    }
  };
  uint4 qa[P][RT][NV], qb[P][RT][NV];
  auto prefetch = [&]() {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int u = warp + p * W;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          const bool ok = u < U && tok[rt];
          qa[p][rt][v] = ok ? ld_stream(ca[rt] + (size_t)u * G::USTRIDE + 64 * v) : make_uint4(0, 0, 0, 0);
          qb[p][rt][v] = ok ? ld_stream(ca[rt] + (size_t)u * G::USTRIDE + 64 * v + 32) : make_uint4(0, 0, 0, 0);
        }
    }
  };

  // XS: the activations are rmsnorm(x) * gamma in shared memory ([M][K] after everything above, then
  // 2 W floats for the norm's sums), written by the block right after griddepcontrol.wait.
  T* const xsm = reinterpret_cast<T*>(tbl + gemv_smem_bytes_ring<BITS, MT, RT, XT, W, RING, UPS>());
  const T* const xin = XS ? xsm : x;  // what the main loop and the outlier step read
  const T* xr[MT];
  bool mv[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int m = 8 * i + g;
    mv[i] = m < M;
    xr[i] = xin + (size_t)(mv[i] ? m : 0) * K;
  }
  const uint32_t lb0 = 4u * lane, lb1 = 128u + 4u * lane;
  const uint32_t tbl_s = smem_u32(tbl);

  // RING > 0: the warp's code units come through a ring of RING shared-memory slots, each filled by
  // one bulk copy (lane 0) and counted on its own mbarrier, instead of P register buffers. A warp
  // consumes its units in the order it requested them (its units of group blockIdx.x, then of the
  // block's next group, ...), and refills a slot with the unit RING items ahead as soon as its
  // lanes have copied the slot's words into registers. The bytes in flight are then bounded by the
  // slots, not by registers and one load scoreboard (launch() says where it runs). No other warp
  // touches a warp's slots, so no barrier couples the warps.
  // UPS > 1: a slot holds UPS consecutive units (one bulk copy of UPS KB at 4 bits) and a warp takes
  // runs of UPS units (run r = units UPS r .. UPS r + UPS - 1 to warp r mod W): fewer, larger copies
  // for the same bytes in flight (each copy request costs the copy engine about the same time).
  static_assert(RING == 0 || (MT == 1 && RT == 1), "code ring: one-row-tile kernels");
  static_assert(UPS >= 1 && (RING > 0 || UPS == 1), "units per ring slot");
  constexpr uint32_t USZ = G::USTRIDE * 16;  // bytes per unit and warp
  constexpr uint32_t SLOT = UPS * USZ;
  const int RUNS = (U + UPS - 1) / UPS;  // runs of UPS units per row group (the last may be short)
  const uint32_t ring_s = tbl_s + (uint32_t)gemv_smem_bytes<BITS, MT, RT, XT, W>() + (uint32_t)(warp * RING) * SLOT;
  const uint32_t bar_s =
      tbl_s + (uint32_t)gemv_smem_bytes<BITS, MT, RT, XT, W>() + (uint32_t)(W * RING) * SLOT + (uint32_t)(warp * RING) * 8u;
  int r_slot = 0;          // next slot to consume
  uint32_t r_par = 0;      // its phase parity
  int i_slot = 0, i_grp = blockIdx.x, i_u = warp;  // next unit to request: slot, group, unit
  uint64_t r_pol = 0;
  auto ring_issue = [&](bool refill) {  // i_u: the next run of UPS units
    if (i_grp < groups && i_u < RUNS) {
      if (lane == 0) {
        // the warp's reads of this slot (ordered before this by the caller's __syncwarp) come
        // before the copy that overwrites it; a slot's first fill follows no read
        if (refill) fence_proxy_async_shared();
        const uint32_t bar = bar_s + 8u * (uint32_t)i_slot;
        const int u0 = UPS * i_u, nu = U - u0 < UPS ? U - u0 : UPS;
        const uint32_t bytes = (uint32_t)nu * USZ;
        mbar_arrive_expect_tx(bar, bytes);
        bulk_g2s(ring_s + (uint32_t)i_slot * SLOT, codes + ((size_t)i_grp * U + u0) * G::USTRIDE, bytes, bar, r_pol);
      }
      i_u += W;
      if (i_u >= RUNS) {
        i_u = warp;
        i_grp += gridDim.x;
      }
      if (++i_slot == RING) i_slot = 0;
    }
  };
  if constexpr (RING > 0) {
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < RING; ++i) mbar_init(bar_s + 8u * i, 1);
      mbar_fence_init();
    }
    __syncwarp();
    r_pol = l2_evict_first_policy();
  }

  // Everything before the first pdl_wait reads weights only (tables, outlier lists, codes), so under
  // programmatic dependent launch it overlaps the previous kernel; x is read and y written after it.
  int grp = blockIdx.x;
  if (grp < groups) {
    load_meta(grp);
    set_group(grp);
    if constexpr (RING > 0) {
#pragma unroll
      for (int i = 0; i < RING; ++i) ring_issue(false);
    } else {
      prefetch();
    }
  } else {
    pdl_wait();
  }
  bool waited = false;
  unsigned int xt_old = 0;  // XT: thread 0's barrier word before its arrival
  bool xt_ready = false;    // XT: every block's slice of xT is written
  for (; grp < groups; grp += gridDim.x) {
    const int n0 = grp * 16 * RT, next = grp + gridDim.x;

    // 3. Pair tables (one 16-byte store writes the 4 copies of an entry). A work item is one
    //    (row, second code hi) and a run of LS first codes lo: the row's whole 16-entry table comes
    //    in one or two 16-byte loads, and each entry then costs one byte permute and one store at
    //    an immediate offset. Lanes 8j..8j+7 store one 128-byte run (row pairs g = 0..7): no
    //    bank conflicts.
#pragma unroll
    for (int t = 0; t < LV; ++t) {
      const int i = tid + t * NT;
      if (i < 16 * RT * E) lt[i] = Cvt<T>::t(raw_f(lv[t], lut_f32));
    }
    __syncthreads();
    {
      constexpr int ROWS = 16 * RT, LB = ROWS * E >= NT ? 1 : NT / (ROWS * E), LS = E / LB;
      constexpr int ITEMS = ROWS * E * LB;
      static_assert(ITEMS % NT == 0 && LS % 2 == 0, "pair-table work split");
#pragma unroll
      for (int it = 0; it < ITEMS / NT; ++it) {
        const int i = tid + it * NT;
        const int gg = i & 7, h = (i >> 3) & 1, lb = (i >> 4) % LB, hi = (i / (16 * LB)) % E, rt = i / (16 * LB * E);
        const T* l = lt + (16 * rt + 8 * h + gg) * E;
        // Entries lo = lb*LS .. lb*LS+LS-1 of the row, as LS/2 packed words (16- or 8-byte loads).
        uint32_t lw[LS / 2];
        const T* lsrc = l + lb * LS;
        if constexpr (LS % 8 == 0) {
#pragma unroll
          for (int v = 0; v < LS / 2; v += 4) {
            const uint4 q4 = *reinterpret_cast<const uint4*>(lsrc + 2 * v);
            lw[v] = q4.x; lw[v + 1] = q4.y; lw[v + 2] = q4.z; lw[v + 3] = q4.w;
          }
        } else {
#pragma unroll
          for (int v = 0; v < LS / 2; v += 2) {
            const uint2 q2 = *reinterpret_cast<const uint2*>(lsrc + 2 * v);
            lw[v] = q2.x; lw[v + 1] = q2.y;
          }
        }
        const uint32_t hv = bits16(l[hi]);
        unsigned char* dst = tbl + (size_t)(rt * E2 + hi * E + lb * LS) * 256 + h * 128 + 16 * gg;
#pragma unroll
        for (int j = 0; j < LS; ++j) {
          const uint32_t v = __byte_perm(lw[j >> 1], hv, (j & 1) ? 0x5432u : 0x5410u);
          *reinterpret_cast<uint4*>(dst + j * 256) = make_uint4(v, v, v, v);
        }
      }
    }

    // 4. This lane's first OUTR outliers of each row (rows 16rt + g + 8rr; warps split each list),
    //    in flight during the main loop; then the next group's tables and bounds. (Requested before
    //    the pair-table build instead: slower at M = 1-16, 4-bit, H200, e.g. 22016x4096 D+S 27.4 ->
    //    29.0 us: the build's wait for the table loads then also waits for these. Requested during the
    //    block's previous row group, so that they wait in registers, the M <= 2 ring kernels with the
    //    outlier split were slower at every shape, H100: 4-bit 1.6-4.3%, 3-bit 2.8-4.9%, the 4-bit decode
    //    step 2.5-4.3%: docs/log/squeezellm-kernels.md.)
    int oc[RT][2][OUTR], cb[RT][2], ce[RT][2];
    uint32_t ov[RT][2][OUTR];  // raw values, converted in the epilogue
    if constexpr (!XT) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          cb[rt][rr] = ob[rt][rr] + warp + (OSPLIT ? W * q : 0);
          ce[rt][rr] = oe[rt][rr];
#pragma unroll
          for (int o = 0; o < OUTR; ++o) {
            const int j = cb[rt][rr] + o * OSTRIDE;
            const bool ok = j < oe[rt][rr];
            oc[rt][rr][o] = -1;
            ov[rt][rr][o] = 0u;
            if (ok) {
              oc[rt][rr][o] = ld_pinned_s32(cols + j);
              ov[rt][rr][o] = ld_early_raw(vals, vals_f32, j);
            }
          }
        }
      if constexpr (OPF) {
        if (opf && rows != nullptr && warp == 0 && q == 0) {
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const int j0 = ob[0][rr] + OUTR * OSTRIDE, j1 = oe[0][rr];
            if (j0 < j1) {  // (16-byte rounding stays inside the arrays' own 128-byte lines)
              const uintptr_t c0 = reinterpret_cast<uintptr_t>(cols + j0) & ~(uintptr_t)15;
              const uintptr_t c1 = (reinterpret_cast<uintptr_t>(cols + j1) + 15) & ~(uintptr_t)15;
              bulk_prefetch_l2(reinterpret_cast<const void*>(c0), (uint32_t)(c1 - c0));
              const size_t es = vals_f32 ? 4 : 2;
              const uintptr_t vb = reinterpret_cast<uintptr_t>(vals);
              const uintptr_t v0 = (vb + (size_t)j0 * es) & ~(uintptr_t)15, v1 = (vb + (size_t)j1 * es + 15) & ~(uintptr_t)15;
              bulk_prefetch_l2(reinterpret_cast<const void*>(v0), (uint32_t)(v1 - v0));
            }
          }
        }
      }
    }
    // XT: this thread's first XP entries (col, raw value), requested now, used in the epilogue.
    // (flags >> 8 & 255: fewer prefetched entries than XP, a tuning knob; 0 = XP.)
    int xa_c[XP], xj = xob + xs;
    uint32_t xa_v[XP];
    const int xe = xoe;
    if constexpr (XT) {
      const int xpf = (flags >> 8) & 255, xpn = xpf > 0 && xpf < XP ? xpf : XP;
#pragma unroll
      for (int o = 0; o < XP; ++o) {
        const int j = xob + xs + o * XSUB;
        xa_c[o] = -1;
        xa_v[o] = 0u;
        if (rows != nullptr && j < xe && o < xpn) {
          xa_c[o] = ld_pinned_s32(cols + j);
          xa_v[o] = ld_early_raw(vals, vals_f32, j);
        }
      }
      xj += xpn * XSUB;
    }
    if (next < groups) load_meta(next);

    float acc[RT][MT][4], acc2[4] = {0.f, 0.f, 0.f, 0.f};  // acc2: gemv_unit's second chain (LEAN_TILE)
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[rt][i][j] = 0.f;
    __syncthreads();

    if (!waited) {
      pdl_wait();
      pdl_trigger();
      waited = true;
      if constexpr (XS)
        rms_norm_to_smem<T, W>(xsm, reinterpret_cast<float*>(xsm + (size_t)M * K), x, static_cast<const T*>(so.gamma), so.eps, M, K);
      if constexpr (XT) {
        xt_write_slice<T, MT>(xT, x, M, K);
        __syncthreads();
        if (tid == 0) xt_old = grid_arrive();
      }
    }

    // 5. Main loop. Lane (g, q): A = weight rows g, g+8 of each row tile (pairs looked up in bank
    //    4g+q), B = x rows 8i+g, k = 8q..8q+7 of each chunk.

    // EARLY_X (the outlier split on the ring; at 3 bits the 8-warp kernels, where each block takes one
    // row group and a warp has two runs or more: launch_gemv): the outlier step moves into the main
    // loop. Each lane gathers the activations of its first entries at the start of the warp's second
    // run of the group (or of its only one), when the column indices requested before the loop have
    // long arrived, and adds the entries' sums (and the 4 lanes' shuffles) before its wait for the last
    // run's codes, in the shadow of that copy. After the loop, every warp of the
    // block spent the gather's latency and the sums between its last product and the group's
    // reduction. With the RMSNorm fused in front (XS) the gather reads the normalised activations in
    // shared memory.
    // H100, M = 1, 0.45% outliers, us (dense-only within 1% between the runs):
    // - the gather, two runs, after the loop / in it: 8192x8192 15.28 / 14.60 (dense 14.38), 28672x8192
    //   48.0 / 47.5, 4096x4096 5.75 / 5.62, 22016x4096 24.6 / 24.6;
    // - then the sums, same process, after the loop / before the last wait: 8192x8192 14.65 / 14.54,
    //   28672x8192 48.2 / 47.75, 22016x4096 24.88 / 24.30, 8192x28672 44.38 / 44.15, 12288x4096 13.96 /
    //   13.90, 4096x4096 and 4096x11008 equal; M = 2 8192x8192 15.20 / 15.02.
    // The 3-bit kernels lost with the step in the loop where a block walks several row groups (4 warps,
    // the gather alone: 28672x8192 43.9 / 46.7, 22016x4096 19.95 / 20.5 us; gather and sums: see
    // launch_gemv), so the 4-warp kernels keep it after the loop. (Reading the outlier lists with
    // L1::no_allocate was much slower, 8192x8192 4-bit 14.5 -> 16.1 us: the 8 warps read neighbouring
    // entries of a row, so they share lines in L1.) SQUEEZELM_LUT_OEARLY=0 puts the whole step after
    // the loop again, =1 in it where the kernel has it (tuning, tests).
    constexpr bool EARLY_X = OSPLIT && RING > 0 && (BITS == 4 || W == GV_WARPS);
    // (pinned loads: plain ones would sink to their use after the loop)
    uint32_t xo[2][OUTR][MO];  // [row g / g+8][entry][activation row], raw bits
    bool xo_ready = false;
    auto gather_outlier_x = [&]() {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
#pragma unroll
        for (int o = 0; o < OUTR; ++o) {
          const int col = oc[0][rr][o];
          const int cc = col >= 0 ? col : 0;
          // (rows written out, not looped over: a loop here changes how the M <= 2 kernels compile)
          xo[rr][o][1] = 0u;
          if constexpr (XS) {
            xo[rr][o][0] = bits16(xsm[cc]);
            if (M > 1) xo[rr][o][1] = bits16(xsm[(size_t)K + cc]);
          } else {
            xo[rr][o][0] = ld_pinned_u16(x + cc);
            if (M > 1) xo[rr][o][1] = ld_pinned_u16(x + (size_t)K + cc);
            if constexpr (MO == 4) {
              xo[rr][o][2] = M > 2 ? ld_pinned_u16(x + (size_t)2 * K + cc) : 0u;
              xo[rr][o][3] = M > 3 ? ld_pinned_u16(x + (size_t)3 * K + cc) : 0u;
            }
          }
        }
      xo_ready = true;
    };
    // OSPLIT: a lane's sums for row g + 8 rr (activation rows 0 .. MO - 1) go, summed over the row's 4
    // lanes, into the accumulators of the lanes that hold those rows (2q, 2q + 1): at MO = 2 lane
    // quarter 0 takes both; at MO = 4 a first round halves the sums (reduce-scatter: a lane keeps rows
    // 0-1 or 2-3 by its lane bit 0 and adds its partner's copy of them), a second adds the other
    // pair's, and quarters 0 and 1 take rows 0-1 and 2-3: four shuffles per row either way.
    auto add_quad = [&](float (&part)[MO], int rr) {
      if constexpr (MO == 2) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          part[jj] += __shfl_xor_sync(0xffffffffu, part[jj], 1);
          part[jj] += __shfl_xor_sync(0xffffffffu, part[jj], 2);
          if (q == 0) acc[0][0][2 * rr + jj] += part[jj];
        }
      } else {
        const bool up = (q & 1) != 0;
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const float send = up ? part[jj] : part[2 + jj], keep = up ? part[2 + jj] : part[jj];
          float s = keep + __shfl_xor_sync(0xffffffffu, send, 1);
          s += __shfl_xor_sync(0xffffffffu, s, 2);
          if (q < 2) acc[0][0][2 * rr + jj] += s;
        }
      }
    };
    // OSPLIT: the lane's entries of row g + 8 rr past its first OUTR (rows longer than 4 W OUTR), read now.
    // LEAN_TILE kernels read them RB at a time: the columns and values of RB entries are requested together, then
    // their activations, so a lane waits about two load latencies per RB entries instead of per entry (a row
    // of the 3-bit 4-warp kernel at K = 28672 leaves a lane 6 entries here); the others one by one.
    auto sum_rest_outliers = [&](float (&part)[MO], int rr) {
      if constexpr (OSPLIT && !LEAN_TILE) {
        for (int j = cb[0][rr] + OUTR * OSTRIDE; j < ce[0][rr]; j += OSTRIDE) {
          const float v = load_f(vals, vals_f32, j);
          const int col = cols[j];
          part[0] = fmaf(v, Cvt<T>::f(xin[col]), part[0]);
          if (M > 1) part[1] = fmaf(v, Cvt<T>::f(xin[(size_t)K + col]), part[1]);
          if constexpr (MO == 4) {
            if (M > 2) part[2] = fmaf(v, Cvt<T>::f(xin[(size_t)2 * K + col]), part[2]);
            if (M > 3) part[3] = fmaf(v, Cvt<T>::f(xin[(size_t)3 * K + col]), part[3]);
          }
        }
      } else if constexpr (OSPLIT) {  // (cb, ce are set in the kernels that take this step only)
        constexpr int RB = 4;
        for (int j = cb[0][rr] + OUTR * OSTRIDE; j < ce[0][rr]; j += RB * OSTRIDE) {
          float v[RB];
          int col[RB];
#pragma unroll
          for (int t = 0; t < RB; ++t) {
            const int jj = j + t * OSTRIDE;
            const bool ok = jj < ce[0][rr];
            v[t] = ok ? load_f(vals, vals_f32, jj) : 0.f;
            col[t] = ok ? cols[jj] : -1;
          }
#pragma unroll
          for (int t = 0; t < RB; ++t) {
            if (col[t] < 0) continue;
            part[0] = fmaf(v[t], Cvt<T>::f(xin[col[t]]), part[0]);
            if (M > 1) part[1] = fmaf(v[t], Cvt<T>::f(xin[(size_t)K + col[t]]), part[1]);
            if constexpr (MO == 4) {
              if (M > 2) part[2] = fmaf(v[t], Cvt<T>::f(xin[(size_t)2 * K + col[t]]), part[2]);
              if (M > 3) part[3] = fmaf(v[t], Cvt<T>::f(xin[(size_t)3 * K + col[t]]), part[3]);
            }
          }
        }
      }
    };
    // EARLY_X: the sums of this lane's first OUTR entries of rows g, g+8 from the gathered activations.
    bool xo_done = false;
    auto add_first_outliers = [&]() {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float part[MO] = {};
#pragma unroll
        for (int o = 0; o < OUTR; ++o) {
          const float v = oc[0][rr][o] >= 0 ? raw_f(ov[0][rr][o], vals_f32) : 0.f;
#pragma unroll
          for (int m = 0; m < MO; ++m) part[m] = fmaf(v, bits_f<T>(xo[rr][o][m]), part[m]);
        }
        add_quad(part, rr);
      }
      xo_done = true;
    };

    if constexpr (RING > 0) {
      for (int run = warp; run < RUNS; run += W) {
        if constexpr (EARLY_X) {
          // The warp's last run of the group (not its first): the outlier sums now, while its codes
          // are still on their way, instead of between the loop and the group's reduction.
          if (early_om && rows != nullptr && run != warp && run + W >= RUNS) {
            if (!xo_ready) gather_outlier_x();
            add_first_outliers();
          }
        }
        mbar_wait(bar_s + 8u * (uint32_t)r_slot, r_par);
        uint32_t wa[UPS][RT][G::WU], wb[UPS][RT][G::WU];
        const uint32_t sa = ring_s + (uint32_t)r_slot * SLOT + 16u * (uint32_t)lane;  // row g; g+8 at +512
        const int u0 = UPS * run;
#pragma unroll
        for (int s = 0; s < UPS; ++s)
#pragma unroll
          for (int v = 0; v < NV; ++v) {
            // (a short last run leaves words of an earlier copy here: they are loaded, never decoded)
            const uint4 a = ld_ring_v4(sa + USZ * s + 1024u * v), b = ld_ring_v4(sa + USZ * s + 1024u * v + 512u);
            wa[s][0][4 * v] = a.x; wa[s][0][4 * v + 1] = a.y; wa[s][0][4 * v + 2] = a.z; wa[s][0][4 * v + 3] = a.w;
            wb[s][0][4 * v] = b.x; wb[s][0][4 * v + 1] = b.y; wb[s][0][4 * v + 2] = b.z; wb[s][0][4 * v + 3] = b.w;
          }
        // The slot goes to its next copy once every lane's reads of it are done: __syncwarp orders
        // them before lane 0's proxy fence in ring_issue (bulk_copy.cuh says what went wrong without).
        __syncwarp();
        ring_issue(true);
        if (++r_slot == RING) {
          r_slot = 0;
          r_par ^= 1u;
        }
        if constexpr (EARLY_X) {
          if (early_om && rows != nullptr && !xo_ready && (run != warp || run + W >= RUNS)) gather_outlier_x();
        }
#pragma unroll
        for (int s = 0; s < UPS; ++s)
          if (s == 0 || u0 + s < U)
            gemv_unit<T, BITS, MT, XVEC, RT, LEAN_TILE>(acc, acc2, wa[s], wb[s], tbl_s, xr, mv, (u0 + s) * G::KU + 8 * q, K, lb0, lb1);
      }
    } else
    // P register buffers: unit u is decoded straight from its buffer, which is then refilled with
    // unit u + W*P (reloading before the decode would force a copy of the words still in use), so
    // P - 1 units per warp are in flight while one is decoded.
    for (int u0 = warp; u0 < U; u0 += W * P) {
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int u = u0 + p * W;
        if (u >= U) break;
        uint32_t wa[RT][G::WU], wb[RT][G::WU];
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int v = 0; v < NV; ++v) {
            wa[rt][4 * v] = qa[p][rt][v].x; wa[rt][4 * v + 1] = qa[p][rt][v].y;
            wa[rt][4 * v + 2] = qa[p][rt][v].z; wa[rt][4 * v + 3] = qa[p][rt][v].w;
            wb[rt][4 * v] = qb[p][rt][v].x; wb[rt][4 * v + 1] = qb[p][rt][v].y;
            wb[rt][4 * v + 2] = qb[p][rt][v].z; wb[rt][4 * v + 3] = qb[p][rt][v].w;
          }
        gemv_unit<T, BITS, MT, XVEC, RT, LEAN_TILE>(acc, acc2, wa, wb, tbl_s, xr, mv, u * G::KU + 8 * q, K, lb0, lb1);
        const int un = u + W * P;
        if (un < U) {
#pragma unroll
          for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int v = 0; v < NV; ++v) {
              if (tok[rt]) {
                qa[p][rt][v] = ld_stream(ca[rt] + (size_t)un * G::USTRIDE + 64 * v);
                qb[p][rt][v] = ld_stream(ca[rt] + (size_t)un * G::USTRIDE + 64 * v + 32);
              }
            }
        } else if (xgroup && next < groups) {
          // Buffer p's last unit of this group: it takes the next group's unit warp + 8p now (every
          // group has U units, so that unit exists), a decode earlier than after the loop.
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
            const bool okn = next * RT + rt < tiles;
            const uint4* cn = ca[rt] + next_step + (size_t)(warp + p * W) * G::USTRIDE;
#pragma unroll
            for (int v = 0; v < NV; ++v) {
              qa[p][rt][v] = okn ? ld_stream(cn + 64 * v) : make_uint4(0, 0, 0, 0);
              qb[p][rt][v] = okn ? ld_stream(cn + 64 * v + 32) : make_uint4(0, 0, 0, 0);
            }
          }
        }
        if constexpr (MT == 1 && BITS == 4) {  // (3-bit: the M <= 8 kernel then spills)
          // unit u + l2pf * 8P requested into L2 as well, so its register load later waits for L2
          // instead of DRAM; a prefetch holds no register and no scoreboard (the register buffers
          // per warp are what bounds the bytes in flight, docs/log/squeezellm-kernels.md). With l2xg the
          // distance runs on into the block's next group (unit u2 - U there), so the stream of
          // prefetches does not stop at each group's end. (The same prefetch at M = 16, and each
          // warp's next activations requested into L1 at M = 4-16, measured slower: see launch_gemv.)
          int u2 = u + W * P * l2pf;
          const bool in_next = u2 >= U;
          if (in_next) u2 -= U;
          if (l2pf > 0 && u2 < U && (!in_next || (l2xg && next < groups))) {
#pragma unroll
            for (int rt = 0; rt < RT; ++rt) {
              const bool ok2 = in_next ? next * RT + rt < tiles : tok[rt];
              const uint4* c2 = ca[rt] + (in_next ? next_step : 0) + (size_t)u2 * G::USTRIDE;
              if (ok2) {
#pragma unroll
                for (int v = 0; v < NV; ++v) {
                  prefetch_l2(c2 + 64 * v);
                  prefetch_l2(c2 + 64 * v + 32);
                }
              }
            }
          }
        }
      }
    }

    // The next group's first units are in flight (xgroup: each buffer took its unit when it was
    // freed) or go now, under this group's epilogue and the next group's table build.
    if (next < groups) {
      set_group(next);
      if (RING == 0 && !xgroup && !late_pf) prefetch();
    }
    // 5b. NEXT: the next launch's first codes into L2 (nx.codes: the weight the caller names as the
    //     one that runs next, the decode step's next projection). Its block b starts with row group b,
    //     so each warp of this block requests its share of that group's first block_bytes, once
    //     the block's own last group is streamed: DRAM would otherwise idle through this launch's tail
    //     and the next one's start (its blocks are placed only as this launch's exit, and the codes
    //     they request first then come from L2). Only blocks of the last round (row groups from
    //     nx.from on) do: a block that finished a round earlier would take bandwidth from the blocks
    //     still streaming (H100, M = 1, D+S 0.45%, launches naming the next one's weights / not, us:
    //     measured at launch_gemv_decode).
    if constexpr (NEXT) {
      if (next >= groups && grp >= nx.from && lane == 0) {
        const unsigned char* at = nx.codes + (size_t)blockIdx.x * nx.group_bytes + (size_t)warp * nx.warp_bytes;
        const long long left = nx.end - at;
        const uint32_t n = (uint32_t)(left < nx.warp_bytes ? (left > 0 ? left & ~15LL : 0) : nx.warp_bytes);
        if (n > 0) bulk_prefetch_l2(at, n);
      }
    }

    // 6. Outliers, after the main loop: their lists have arrived and x is in L1. Branch-free over a
    //    lane's first OUTR entries (an absent entry reads column 0 with value 0), so their x reads
    //    issue together (one branch per entry serialised them: M = 64 took 2.5x the dense time);
    //    entries past those are read now.
    if constexpr (XT) {
      if (!xt_ready) {
        if (tid == 0) grid_wait(xt_old);
        __syncthreads();
        xt_ready = true;
      }
      float s8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      {
        uint4 xq[XP];
#pragma unroll
        for (int o = 0; o < XP; ++o) xq[o] = __ldcg(xT + (size_t)(xa_c[o] >= 0 ? xa_c[o] : 0) * MT + xmg);
#pragma unroll
        for (int o = 0; o < XP; ++o) fma8<T>(s8, xa_c[o] >= 0 ? raw_f(xa_v[o], vals_f32) : 0.f, xq[o]);
      }
      // The rest of the row's share, eight entries at a time (their loads in flight together).
      for (int j0 = xj; j0 < xe; j0 += 8 * XSUB) {
        int cc[8];
        float vv[8];
#pragma unroll
        for (int o = 0; o < 8; ++o) {
          const int j = j0 + o * XSUB;
          cc[o] = j < xe ? cols[j] : 0;
          vv[o] = j < xe ? load_f(vals, vals_f32, j) : 0.f;
        }
        uint4 xq[8];
#pragma unroll
        for (int o = 0; o < 8; ++o) xq[o] = __ldcg(xT + (size_t)cc[o] * MT + xmg);
#pragma unroll
        for (int o = 0; o < 8; ++o) fma8<T>(s8, vv[o], xq[o]);
      }
      // The XSUB lanes' sums by halving (reduce-scatter): while a lane holds v > 1 sums, each step
      // keeps half of them (the upper half where the lane's bit of the step is set) and adds the
      // partner's copy of that half, one shuffle per kept sum; later steps add the one sum left.
      // 4 + log2(XSUB) shuffles from 8 lanes up (4 + 2 + 1, then one per step), where a butterfly
      // over all 8 sums took 8 log2(XSUB) (8 against 32 at XSUB = 16). Same process, H200, D+S,
      // halving / butterfly: 4-bit M = 8 8192x8192 20.41 / 20.60 us, 22016x4096 34.48 / 34.78,
      // 12288x4096 18.58 / 18.77; M = 16 8192x8192 23.64 / 23.77, 12288x4096 21.88 / 22.16; 3-bit
      // and M = 32 within 0.5%. At the end a lane holds sums eo .. eo + v - 1 of its (row, activation
      // rows), the same in every lane that differs from it only in the bits of the last steps (low):
      // the one whose low bits are zero writes them.
      int eo = 0, v = 8, low = 0;
#pragma unroll
      for (int off = XSUB / 2; off >= 1; off /= 2) {
        if (v > 1) {
          const bool upper = (xs & off) != 0;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (i < v / 2) {
              const float send = upper ? s8[i] : s8[i + v / 2], keep = upper ? s8[i + v / 2] : s8[i];
              s8[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
            }
          }
          if (upper) eo += v / 2;
          v /= 2;
        } else {
          s8[0] += __shfl_xor_sync(0xffffffffu, s8[0], off);
          low |= off;
        }
      }
      if ((xs & low) == 0) {
        // eo is a multiple of v (each kept half starts at one), so the v sums go out in 16- or 8-byte
        // stores, as the butterfly's one writer lane stored its 8 (v is a constant once unrolled)
        float* dst = osum + xrow * 8 * MT + 8 * xmg + eo;
        if (v >= 4) {
#pragma unroll
          for (int i = 0; i < 8; i += 4)
            if (i < v) *reinterpret_cast<float4*>(dst + i) = make_float4(s8[i], s8[i + 1], s8[i + 2], s8[i + 3]);
        } else if (v == 2) {
          *reinterpret_cast<float2*>(dst) = make_float2(s8[0], s8[1]);
        } else {
          dst[0] = s8[0];
        }
      }
    } else if (OSPLIT && rows != nullptr && EARLY_X) {
      // The first entries' sums unless the main loop added them; then the entries past them (rows
      // longer than 4 W OUTR), summed over the row's 4 lanes only where a lane of the warp has one.
      if (!xo_done) {
        if (!xo_ready) gather_outlier_x();
        add_first_outliers();
      }
      bool rest = false;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) rest |= cb[0][rr] + OUTR * OSTRIDE < ce[0][rr];
      if (__any_sync(0xffffffffu, rest)) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float part[MO] = {};
          sum_rest_outliers(part, rr);
          add_quad(part, rr);
        }
      }
    } else if (OSPLIT && rows != nullptr) {
      // Every lane sums its share of rows g, g+8 for activation rows 0 .. MO - 1; the 4 lanes of a
      // row reduce, and the lanes that hold each activation row add its sums (add_quad).
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float part[MO] = {};
#pragma unroll
        for (int o = 0; o < OUTR; ++o) {
          const int col = oc[0][rr][o];
          const int cc = col >= 0 ? col : 0;
          const float v = col >= 0 ? raw_f(ov[0][rr][o], vals_f32) : 0.f;
          const float x0 = Cvt<T>::f(xin[cc]), x1 = M > 1 ? Cvt<T>::f(xin[(size_t)K + cc]) : 0.f;
          part[0] = fmaf(v, x0, part[0]);
          part[1] = fmaf(v, x1, part[1]);
          if constexpr (MO == 4) {
            const float x2 = M > 2 ? Cvt<T>::f(xin[(size_t)2 * K + cc]) : 0.f;
            const float x3 = M > 3 ? Cvt<T>::f(xin[(size_t)3 * K + cc]) : 0.f;
            part[2] = fmaf(v, x2, part[2]);
            part[3] = fmaf(v, x3, part[3]);
          }
        }
        sum_rest_outliers(part, rr);
        add_quad(part, rr);
      }
    } else if (rows != nullptr) {  // uniform: dense-only launches skip the step
      // x rows 8i + 2q + {0, 1} of this lane.
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          int cc[OUTR];
          float vv[OUTR];
#pragma unroll
          for (int o = 0; o < OUTR; ++o) {
            const int col = oc[rt][rr][o];
            cc[o] = col >= 0 ? col : 0;
            vv[o] = col >= 0 ? raw_f(ov[rt][rr][o], vals_f32) : 0.f;
          }
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
              const int m = 8 * i + 2 * q + jj;
              if (m < M) {
                const T* xm = xin + (size_t)m * K;
                float xs[OUTR];
#pragma unroll
                for (int o = 0; o < OUTR; ++o) xs[o] = Cvt<T>::f(xm[cc[o]]);
#pragma unroll
                for (int o = 0; o < OUTR; ++o) acc[rt][i][2 * rr + jj] = fmaf(vv[o], xs[o], acc[rt][i][2 * rr + jj]);
              }
            }
          for (int j = cb[rt][rr] + OUTR * OSTRIDE; j < ce[rt][rr]; j += OSTRIDE) {
            const float v = load_f(vals, vals_f32, j);
            const int col = cols[j];
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
              for (int jj = 0; jj < 2; ++jj) {
                const int m = 8 * i + 2 * q + jj;
                if (m < M) acc[rt][i][2 * rr + jj] = fmaf(v, Cvt<T>::f(xin[(size_t)m * K + col]), acc[rt][i][2 * rr + jj]);
              }
          }
        }
    }

    if (RING == 0 && late_pf && !xgroup && next < groups) prefetch();

    if constexpr (LEAN_TILE) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[0][0][j] += acc2[j];
    }

    // 7. Fixed-order reduction over warps. C fragment of row tile rt: acc[rt][i][j] =
    //    y[m = 8i + 2q + (j&1)][n0 + 16rt + g + 8(j>>1)].
    __syncthreads();  // everyone is done with the tables (red aliases them)
    constexpr int PER = RT * MT * 4;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int i = 0; i < MT; ++i)
        *reinterpret_cast<float4*>(red + (warp * 32 + lane) * PER + (rt * MT + i) * 4) =
            make_float4(acc[rt][i][0], acc[rt][i][1], acc[rt][i][2], acc[rt][i][3]);
    __syncthreads();
    //    A thread takes rows r and r + 8 of one C fragment element pair (j and j + 2): with paired
    //    rows (so.half) they are an output row and its partner, which the SiLU epilogue combines.
    for (int h = tid; h < 16 * PER; h += NT) {
      const int idx = 4 * (h >> 1) + (h & 1);
      float s0 = 0.f, s1 = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) {
        s0 += red[w * 32 * PER + idx];
        s1 += red[w * 32 * PER + idx + 2];
      }
      const int l = idx / PER, rt = (idx / (MT * 4)) % RT, i = (idx / 4) % MT, j = idx & 3;
      const int m = 8 * i + 2 * (l & 3) + j, r = 16 * rt + (l >> 2), n = n0 + r;
      if (XT) {
        s0 += osum[r * 8 * MT + m];
        s1 += osum[(r + 8) * 8 * MT + m];
      }
      if (m >= M) continue;
      // whether this kernel stores with `mode`: kEpiAny kernels pick at run time, the others are compiled for one
      const auto epi_is = [&](int mode) { return EPI == kEpiAny ? so.mode == mode : EPI == mode; };
      if (epi_is(kStoreRope)) {
        if (n + 8 < N) lut_rope_store<T>(so, m, lut_pair_row(n, so.half), s0, s1);
      } else if (epi_is(kStoreSilu)) {
        // y[m, j] = silu(z[m, j]) * z[m, j + half], each z rounded as a store would leave it (siluMul's
        // arithmetic on the unfused path's values); y is [M, half].
        if (n + 8 < N) {
          const float a = Cvt<T>::f(Cvt<T>::t(s0)), u = Cvt<T>::f(Cvt<T>::t(s1));
          y[(size_t)m * so.half + lut_pair_row(n, so.half)] = Cvt<T>::t(silu_f(a) * u);
        }
      } else if (epi_is(kStoreResidual)) {
        // y += z, z rounded as a store would leave it: what add(y, y, z) does after the plain GEMV.
        if (n < N) {
          T* p = y + (size_t)m * N + lut_pair_row(n, so.half);
          *p = Cvt<T>::t(Cvt<T>::f(*p) + Cvt<T>::f(Cvt<T>::t(s0)));
        }
        if (n + 8 < N) {
          T* p = y + (size_t)m * N + lut_pair_row(n + 8, so.half);
          *p = Cvt<T>::t(Cvt<T>::f(*p) + Cvt<T>::f(Cvt<T>::t(s1)));
        }
      } else if (EPI != kEpiPlain) {
        if (n < N) y[(size_t)m * N + lut_pair_row(n, so.half)] = Cvt<T>::t(s0);
        if (n + 8 < N) y[(size_t)m * N + lut_pair_row(n + 8, so.half)] = Cvt<T>::t(s1);
      } else {  // plain stores of unpaired rows (launch_gemv_decode)
        if (n < N) y[(size_t)m * N + n] = Cvt<T>::t(s0);
        if (n + 8 < N) y[(size_t)m * N + n + 8] = Cvt<T>::t(s1);
      }
    }
    __syncthreads();  // red is read before the next group's tables overwrite it
  }
}

// ---- GEMM (prefill) ----
// 128x128 output tile per block, 32 k per stage, PST stages of activations and raw codes in flight
// through cp.async; each stage's codes are dequantized (plus that stage's outliers) into a
// double-buffered [n][k] tile one stage ahead of the tensor cores, so one barrier per stage.
// Outliers are folded into the dequantized weight (one rounding of lut + val): the two threads of
// a row walk its CSR list, whose cols must be increasing (checkOutlierCsr enforces it).
constexpr int PBM = 128, PBN = 128, PBK = 32, PST = 5, PLD = PBK + 8, PM_THREADS = 256;


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
                        int K, int U, int pair_half) {
  using G = Geo<BITS>;
  constexpr int E = G::E, CW = BITS == 4 ? 1 : 3;  // raw words per code item and stage (at most)
  SQZ_DYNAMIC_SMEM(psm);
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
      else v = (c & 3) < 3 ? src[0] : cpu::lut_chunk3_pairs(src[0], src[512], src[1024]);  // (bits 6-7 of chunks 0-2 unread)
#pragma unroll
      for (int j = 0; j < 8; ++j) w[it][j] = lut_s[((v >> cpu::lut_code_shift(BITS, j)) & (E - 1)) * PBN + r];
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
        if (m < M && n < N) y[(size_t)m * N + lut_pair_row(n, pair_half)] = Cvt<T>::t(acc[i][j][e]);
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
      // pair i (bits 6i..6i+5 of v) into byte i, then placed as cpu/lut_gemm.h lays chunk c out
      const uint32_t p = (v & 0x3fu) | ((v << 2) & 0x3f00u) | ((v << 4) & 0x3f0000u) | ((v << 6) & 0x3f000000u);
      const int b = c >> 2, cc = c & 3;
      if (cc < 3) {
        out[3 * b + cc] |= p;
      } else {
#pragma unroll
        for (int s2 = 0; s2 < 3; ++s2) out[3 * b + s2] |= ((p >> (2 * s2)) & 0x03030303u) << 6;
      }
    }
  }
  uint32_t* d = dst + (size_t)tu * 64 * G::WU + (r * 4 + qq) * 4;
#pragma unroll
  for (int w = 0; w < G::WU; ++w) d[(w >> 2) * 256 + (w & 3)] = out[w];
}

// xT for the outlier step, [K][mp]: a process-lifetime buffer per device
// (common/process_buffer.h), nullptr where it is missing or too small.
constexpr size_t kLutXtBytes = size_t(8) << 20;
template <class T>
T* lut_xt_buffer(int mp, int K) {
  if ((size_t)mp * K * sizeof(T) > kLutXtBytes) return nullptr;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "lutMatmul: cudaGetDevice");
  return static_cast<T*>(zeroed_process_buffer(dev, ProcessBuffer::kLutXt, kLutXtBytes));
}

// Whether a thread's share of an average row of outliers (nnz / N entries spread over threads_per_row)
// fits in 80% of `depth` entries, a margin for rows above the average. The launch rules that size what a
// kernel's threads request before the main loop ask this: the XT kernels' shallower depth
// (shallow_outliers), the 4-bit ring kernel's depth of 4, and the outlier-rest prefetch (launch_gemv).
inline bool avg_row_fits(int64_t nnz, int N, int threads_per_row, int depth) {
  return nnz * 5 <= (int64_t)N * threads_per_row * depth * 4;
}

// XT: the outliers through xT (written by the launch itself, into the buffer above); where it cannot be
// had, the same launch gathers from x[m][k] instead.
template <class T, int BITS, int MT, int P, bool XVEC, int MINB = 2, int RT = 1, int OSPLIT = 0, bool XT = false,
          int W = GV_WARPS, int XPO = 0, int RING = 0, int UPS = 1, bool XS = false, int EPI = kEpiAny, bool NEXT = false>
void launch_gemv(T* yp, const T* xp, const uint4* cp, const void* lp, bool lf, const int* rp, const int* colp,
                 const void* vp, bool vf, int M, int N, int K, int U, LutLaunch so, cudaStream_t st) {
  T* xT = nullptr;
  if constexpr (XT) {
    xT = lut_xt_buffer<T>(8 * MT, K);
    if (!xT)
      return launch_gemv<T, BITS, MT, P, XVEC, MINB, RT, OSPLIT, false, W>(yp, xp, cp, lp, lf, rp, colp, vp, vf, M, N, K, U, so, st);
  }
  constexpr size_t base = gemv_smem_bytes_ring<BITS, MT, RT, XT, W, RING, UPS>();
  static_assert(base % 16 == 0, "the normalised activations follow at a 16-byte boundary");
  // XS: the normalised activations [M][K] and the norm's 2 W sums follow (rms_norm_to_smem); the
  // occupancy is asked for with them rounded up to whole KiB (never more blocks than fit).
  const size_t xs_kib = XS ? ((size_t)M * K * sizeof(T) + 2 * W * sizeof(float) + 1023) / 1024 : 0;
  const size_t smem = base + (XS ? (size_t)M * K * sizeof(T) + 2 * W * sizeof(float) : 0);
  constexpr auto kern = lut_gemv_kernel<T, BITS, MT, P, XVEC, MINB, RT, OSPLIT, XT, W, XPO, RING, UPS, XS, EPI, NEXT>;
  allow_dynamic_smem<kern>(smem, "lutMatmul");  // tables above 48 KiB need the opt-in
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "lutMatmul: cudaGetDevice");
  // One wave of blocks (they walk the row-tile groups): no tail wave, and each block's prologue
  // latency is paid once.
  auto wave = [&] {
    int per_sm = 0;
    cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, W * 32, base + xs_kib * 1024), "lutMatmul: occupancy");
    const int n = per_sm * sm_count(dev);
    return n > 0 ? n : 1;
  };
  const int blocks_per_wave = xs_kib < 64 ? cached_per_device(dev, (int)xs_kib, wave) : wave();
  const int groups = ((N + 15) / 16 + RT - 1) / RT;
  const int blocks = groups < blocks_per_wave ? groups : blocks_per_wave;
  // The cross-group refill (xgroup) where it measured faster, same process, H200: 3-bit 3-9% at
  // M = 1-8; 4-bit at M = 1 up to 3.5% (22016x4096), but 1-2.6% slower at M = 2-16.
  // SQUEEZELM_LUT_XGROUP=0 / 1 forces it off / on (tuning, tests).
  const int xg = env_int("SQUEEZELM_LUT_XGROUP", -1);
  // SQUEEZELM_LUT_XP: outlier entries per thread requested before the main loop (XT launches; at
  // most the kernel's XP, 0 = XP), to measure what the prefetch depth buys.
  const int xpn = env_int("SQUEEZELM_LUT_XP", 0);
  // L2 prefetch distance of the 4-bit M <= 8 kernel, in rounds of 8P units (SQUEEZELM_LUT_L2PF, 0-3).
  // Same machine, separate processes, H200, M = 1, rounds 0 / 2: 4-bit dense 4096x11008 10.14-10.27 /
  // 9.27-9.33 us, 8192x8192 14.88-14.89 / 14.12-14.27, 8192x28672 41.73-41.95 / 40.65-40.67, M = 4
  // 8192x8192 15.30-15.44 / 14.60-14.78; 28672x8192 D+S 50.26-50.46 / 50.75-50.88; K = 4096 never
  // reaches it (32 units). One round ahead lost 1-5% (8192x28672 D+S 43.23 / 45.43 us).
  const int l2pf = env_int("SQUEEZELM_LUT_L2PF", 2);
  // SQUEEZELM_LUT_L2XG=0 / 1: the L2 prefetch stops at each group's end / runs on into the block's
  // next group; on by default at M = 1. Same process, H200, 4-bit, M = 1, off / on alternating, two
  // runs each: 8192x8192 dense 14.42, 14.35 / 13.97, 13.99 us, D+S 15.33, 15.24 / 15.08, 15.06;
  // 28672x8192 D+S 51.65, 51.54 / 49.55, 49.52; 12288x4096 dense 13.60, 13.56 / 12.88, 12.92;
  // 22016x4096 dense 25.81, 25.71 / 25.17, 25.03 (D+S -0.3%); the 4096-row shapes, one group per
  // block, within 0.5% (docs/log/squeezellm-kernels.md has every row). Measured slower and not
  // kept: the same L2 prefetch at M = 16 (D+S 25.51 -> 26.25 us), and each warp requesting its next
  // unit's activations into L1 (prefetch.global.L1) where x does not stay in L1: M = 16 D+S 25.51 ->
  // 28.51 / 27.62 us one / two rounds ahead, M = 8 20.26 -> 24.20, M = 4 18.13 -> 19.69.
  // 4-bit one-tile launches on register buffers from M = 3 on (the D+S gather at M = 3-5, xT at M = 6-8)
  // take the L2 prefetch across groups and the late code requests (below) too. H100, D+S 0.45%, the LUT
  // probe, in one process, both off / both on, us: M = 8 8192x8192 20.17 / 20.10, 12288x4096 19.05 /
  // 18.61, 22016x4096 33.89 / 32.86, 4096x4096 7.57 / 7.56; M = 6 8192x8192 19.24 / 19.06, 28672x8192
  // 64.53 / 61.66; M = 5 8192x8192 18.97 / 18.67 (docs/log/squeezellm-kernels.md).
  const bool rb4 = BITS == 4 && MT == 1 && RING == 0 && M >= 3;
  const int l2xg = env_int("SQUEEZELM_LUT_L2XG", M == 1 || rb4 ? 1 : 0);
  // SQUEEZELM_LUT_LATEPF=0 / 1: without the cross-group refill, the next group's first code units are
  // requested before / after the outlier step (whose loads otherwise wait behind them). On by default
  // for the 16-warp kernel. Same process, H200, 8192x8192 4-bit D+S, two runs each, off / on: M = 16
  // 24.11, 24.30 / 23.72, 23.99 us; M = 8 (8 warps) 20.93, 20.94 / 21.15, 21.07; M = 4 17.41, 17.26 /
  // 17.25, 17.17; 3-bit M = 16 22.66, 22.46 / 22.62, 22.41.
  const int late_pf = env_int("SQUEEZELM_LUT_LATEPF", W == 16 || rb4 ? 1 : 0);
  // SQUEEZELM_LUT_OEARLY=0 / 1: the decode kernels' outlier step after the main loop / in it (EARLY_X
  // in the kernel). 3-bit takes it in its 8-warp kernels where each block takes one row group and a warp
  // has two runs of units or more (with one, the step stays after the loop either way). H100, 3-bit D+S,
  // M = 1, 0.45%: 4096x11008 (one group per block, 22 units) 12.28 -> 11.63 us in the LUT bench. Where
  // blocks walk several groups the step in the loop lost in the bench, though a probe with every row
  // holding the same number of evenly spread outliers had it winning (after / in the loop, 22016x4096
  // 21.19 / 20.70, 8192x8192 15.5 / 15.13): with it on for the 4-warp kernels (8092db6) the bench's
  // 3-bit D+S 8192x28672 took 42.07 against 38.44 us, 28672x8192 49.11 / 44.21, 22016x4096 20.76 /
  // 19.52, 8192x8192 15.03 / 14.63. At 4096x4096 (8 units, one run per warp) the in-loop build's
  // fallback after the loop measured 4.99 against 4.91 us in the probe, so it stays off there too.
  const bool early3 = (U + UPS - 1) / UPS > W && groups <= blocks_per_wave;
  const int early_om = env_int("SQUEEZELM_LUT_OEARLY", BITS == 4 || early3 ? 1 : 0);
  // SQUEEZELM_LUT_OPF=0 / 1: the kernels that have the outlier-rest prefetch (the kernel's OPF) skip / take
  // it; by default they take it where each block takes one row group. Each prefetch is a request to the
  // SM's bulk-copy unit, which the code ring's copies queue on too: where blocks walk several groups that
  // lost. H100, M = 1, D+S 0.45%, in one process, without / with (then taken in every launch), us: 3-bit
  // 8192x8192 14.55 / 14.23, M = 2 14.82 / 14.58, 8192x28672 37.04 / 36.86; 28672x8192 (3.4 groups per
  // block) 42.48 / 44.81. (Given to the 4-bit decode kernels too, the same build lost 3% at 8192x28672,
  // 43.50 / 44.80, where 4 entries per lane requested early leave almost no rest.) With the run-time test,
  // this rule's build, off / on, another H100: 8192x8192 14.55 / 14.39, M = 2 14.79 / 14.73, 8192x28672
  // 37.54 / 37.46, and 4096x4096 4.81 / 4.88, where no row has a rest (8-warp rows: 64 entries early).
  // Nor where an average row fits in what the kernel's lanes request before the loop (OUTR each, 4 W
  // lanes per row; avg_row_fits), as at 3-bit 4096x4096 (18 per row, 64 requested early): the test alone
  // then waits on the row bounds in front of warp 0's main loop. The 80% margin leaves 3-bit 4096x11008
  // (49.5 per row) without it; by the rule / forced off / forced on, one H100 process: 11.41 / 11.31 /
  // 11.38 us, 3-bit 4096x4096 5.19 / 5.20 / 5.13, 4-bit 4096x11008 10.97 / 10.98 / 11.01: no difference.
  const bool opf_rest = !avg_row_fits(so.nnz, N, 4 * W, split_outr<XPO>());
  const int opf_env = env_int("SQUEEZELM_LUT_OPF", -1);
  const bool opf = opf_env < 0 ? groups <= blocks_per_wave && opf_rest : opf_env != 0;
  if constexpr (NEXT) {
    so.next.from = (groups - 1) / blocks * blocks;  // the first row group of the last round
    so.next.warp_bytes = so.next.block_bytes / W / 16 * 16;
  }
  const int flags = ((xg < 0 ? BITS == 3 || M == 1 : xg != 0) ? 1 : 0) | ((l2pf > 0 && l2pf < 4 ? l2pf : 0) << 2) |
                    (l2xg > 0 ? 16 : 0) | (late_pf > 0 ? 1 << 17 : 0) | (early_om > 0 ? 1 << 18 : 0) |
                    ((xpn > 0 && xpn < 256 ? xpn : 0) << 8) | (opf ? 1 << 19 : 0);
  launch_pdl(kern, dim3(blocks), dim3(W * 32), smem, st, yp, xp, cp, lp, lf, rp, colp, vp, vf, M, N, K, U,
             reinterpret_cast<uint4*>(xT), flags, static_cast<const LutStore&>(so), so.next);
}

// 3-bit decode GEMVs with 4 warps per block (4 blocks per SM, two ring slots of one unit per warp)
// instead of 8 (2 per SM, three slots) where the row groups outnumber the 8-warp kernel's wave (2
// blocks per SM): a group's units then go to 4 warps instead of 8, twice as many groups run at once,
// and each block's barriers (table build, reduction) hold half as many warps. The 3-bit tables are
// 16 KB, so four blocks fit with their rings (and the normalised activations of the fused RMSNorm).
// H100, same process, graph replay, M = 1, 8 / 4 warps, us: D+S 8192x8192 16.83 / 14.58, 8192x28672
// 42.5 / 39.4, 28672x8192 45.0 / 43.9 (dense 40.7 / 42.6, the one loss), 12288x4096 14.34 / 12.74,
// 22016x4096 22.6 / 19.4; with 256 row groups (4096 rows) 4 warps lost (5.02 against 5.55 us at
// 4096x4096), hence the rule. A 6-layer LLaMA-2-7B-shaped 3-bit step (the RMSNorm fused in front): 536
// us with 8 warps everywhere, 520 with 4 for the q|k|v and gate|up launches as the rule gives, 553 with
// 4 for the o and down projections (4096 rows) as well. (With 4 warps every block of the fused norm
// normalises x again, which made the norm kernel apart the faster 3-bit step until the 3-bit lookups
// took one byte permute; ts/model/llama.ts fuseLutNorm.) SQUEEZELM_LUT_DECODE_WARPS=4 / 8 forces one
// (tuning, tests).
bool decode_w4(int N) {
  const int forced = env_int("SQUEEZELM_LUT_DECODE_WARPS", 0);
  if (forced == 4 || forced == 8) return forced == 4;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "lutMatmul: cudaGetDevice");
  return (N + 15) / 16 > 2 * sm_count(dev);
}

// The decode step's GEMV: M <= 2, x vectorisable, with the RMSNorm fused in front (XS: so.gamma
// set) or not. launch() picks ring / osplit / deep (below) and both entry points take the kernel
// from this one table: the code ring on Hopper (4-bit: two slots of two units, the outlier split
// with 2 or 4 entries per lane requested early; 3-bit: three slots of one unit, or 4 warps of two
// slots where decode_w4 says), else register
// buffers, each with or without the outlier split. (The tuning override of the 4-bit ring's slots,
// SQUEEZELM_LUT_RING_UPS=1, is launch()'s own: it does not apply with the norm fused.)
template <class T, int BITS, bool XS, int EPI, bool NEXT = false>
void launch_gemv_decode_table(T* yp, const T* xp, const uint4* q4, const void* lp, bool lf, const int* rp, const int* cp,
                              const void* vp, bool vf, int M, int N, int K, int U, bool ring, bool osplit, bool deep, LutLaunch so,
                              cudaStream_t st) {
  constexpr int P1 = 2;
  // (NEXT: the ring kernels only; the register-buffer ones, for other GPUs, never request the next codes)
#define SQZ_DECODE_W(W, MINB, OSPLIT, XPO, RING, UPS)                                                                \
  launch_gemv<T, BITS, 1, P1, true, MINB, 1, OSPLIT, false, W, XPO, RING, UPS, XS, EPI, NEXT && (RING > 0)>(           \
      yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, so, st)
#define SQZ_DECODE(OSPLIT, XPO, RING, UPS) SQZ_DECODE_W(GV_WARPS, 2, OSPLIT, XPO, RING, UPS)
  if constexpr (BITS == 3) {
    if (ring && decode_w4(N)) {
      if (osplit) SQZ_DECODE_W(4, 4, true, 0, 2, 1);
      else SQZ_DECODE_W(4, 4, false, 0, 2, 1);
      return;
    }
  }
  if (ring) {
    if constexpr (BITS == 4) {
      // The outlier depth `deep`: entries past the first 2 or 4 of a lane are read after the loop, a
      // dependent pair of loads. Same process, H200, depth 2 / 4, us: 8192x28672 (4.0 per lane) M = 1
      // 40.96 / 39.76, M = 2 42.47 / 41.70; at 1.2-1.6 per lane 8192x8192 14.27 / 14.42, 28672x8192
      // 46.93 / 47.37, 4096x11008 10.18 / 10.14; K = 4096 (0.6 per lane) 22016 rows 24.09 / 24.57.
      // SQUEEZELM_LUT_OSPLIT_DEPTH=2 / 4 forces one (tuning, tests).
      if (deep) SQZ_DECODE(true, 4, 2, 2);
      else if (osplit) SQZ_DECODE(true, 0, 2, 2);
      else SQZ_DECODE(false, 0, 2, 2);
    } else {
      if (osplit) SQZ_DECODE(true, 0, 3, 1);
      else SQZ_DECODE(false, 0, 3, 1);
    }
  } else if (osplit) {
    SQZ_DECODE(true, 0, 0, 1);
  } else {
    SQZ_DECODE(false, 0, 0, 1);
  }
#undef SQZ_DECODE
#undef SQZ_DECODE_W
}
// Each launch of the decoder's step takes kernels compiled with its own epilogue only: a plain product
// (unpaired rows, no norm), the residual add (o and down projections), and behind the fused norm the
// SiLU pairs (gate|up) or RoPE/append (q|k|v). Every other combination takes the kernels that carry
// all modes (kEpiAny). The code of the other epilogues in a kernel's row-group loop costs it registers
// and time, most where blocks walk many short groups (docs/log/squeezellm-kernels.md).
// SQUEEZELM_LUT_EPI_KERNELS=0 sends every launch to the kEpiAny kernels (tuning, an A/B in one process).
//
// A 4-bit launch that names the weight whose launch follows (so.next, lutMatmulPacked's prefetchNext)
// takes the same kernels compiled with NEXT (the kernel's step 5b): the SiLU pairs, the plain and
// residual products, and the kEpiAny kernels without the norm (gate|up with the norm apart). Kernels
// without it are the same as before it existed (PTX compared): with the step compiled into every
// kernel behind a run-time test, ptxas allocated 140 of the 186 GEMV kernels differently and the 3-bit
// decode GEMVs lost 3-7% (H100, 28672x8192 D+S 43.6 -> 47.0 us). H100 (7cae5ce), M = 1, D+S 0.45%, the
// LUT bench's launches each naming the next one's weight set / naming none, us: 4-bit 8192x8192 14.18
// / 14.30, 4096x4096 5.34 / 5.51, 4096x11008 9.75 / 10.46, 12288x4096 13.36 / 13.73; where blocks walk
// 5-7 row groups 22016x4096 24.24 / 24.12, 28672x8192 47.53 / 47.27 (at 64 KB per block or more every
// shape lost). The LLaMA-2-7B-shaped step (o, gate|up and down naming the next projection; same
// process): 4-bit 2428.1 / 2470.0 us. The 3-bit GEMVs ignore the hint: with it their step took 2246.7
// against 2241.1 us, and their launches over several rounds of row groups lost 4-9% in the bench
// (28672x8192 47.41 / 43.59 us). Keeping the request out of 4-bit launches over 3 rounds of row groups
// (gate|up) was no better: 2437.2 against 2431.2 us (930d6cd).
template <class T, int BITS, bool XS>
void launch_gemv_decode(T* yp, const T* xp, const uint4* q4, const void* lp, bool lf, const int* rp, const int* cp, const void* vp,
                        bool vf, int M, int N, int K, int U, bool ring, bool osplit, bool deep, LutLaunch so, cudaStream_t st) {
  const bool next = so.next.codes != nullptr && ring;
#define SQZ_TABLE(EPI) \
  return launch_gemv_decode_table<T, BITS, XS, EPI>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, ring, osplit, deep, so, st)
#define SQZ_TABLE_NEXT(EPI)                                                                                                   \
  do {                                                                                                                        \
    if constexpr (BITS == 4)                                                                                                  \
      if (next)                                                                                                               \
        return launch_gemv_decode_table<T, BITS, XS, EPI, true>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, ring, osplit, \
                                                                deep, so, st);                                                \
    SQZ_TABLE(EPI);                                                                                                           \
  } while (0)
  if (env_int("SQUEEZELM_LUT_EPI_KERNELS", 1) != 0) {
    if constexpr (XS) {
      if (so.mode == kStoreRope) SQZ_TABLE(kStoreRope);
      if (so.mode == kStoreSilu) SQZ_TABLE_NEXT(kStoreSilu);
    } else {
      if (so.mode == kStoreRows && so.half == 0) SQZ_TABLE_NEXT(kEpiPlain);
      if (so.mode == kStoreResidual) SQZ_TABLE_NEXT(kStoreResidual);
    }
  }
  if constexpr (XS) SQZ_TABLE(kEpiAny);
  else SQZ_TABLE_NEXT(kEpiAny);
#undef SQZ_TABLE_NEXT
#undef SQZ_TABLE
}

// Whether the shallower outlier depth of an XT kernel runs: a thread's share of an average row fits in it
// (avg_row_fits; each entry past the depth is read after the main loop, a dependent pair of loads).
// SQUEEZELM_LUT_XPLOW=0 / 1 forces the deep / shallow build (tuning, tests).
inline bool shallow_outliers(int64_t nnz, int N, int threads_per_row, int depth) {
  const int forced = env_int("SQUEEZELM_LUT_XPLOW", -1);
  if (forced >= 0) return forced != 0;
  return avg_row_fits(nnz, N, threads_per_row, depth);
}

// An XT launch (outliers through xT): the kernel's own outlier depth, or XP_LOW entries where a thread's
// share of an average row fits (shallow_outliers; a row's entries are split over the kernel's XSUB
// threads, derived here as in the kernel). XP_LOW = 0: no shallower build.
// M = 3-8 (one row tile, 16 threads per row) holds 4 entries or 3: the kernel runs at the 128-register
// cap of two blocks per SM, and the fourth entry is mostly empty at 0.45% outliers (2.3 per thread at K =
// 8192). Same process, H200, D+S, 4 / 3 entries, two runs each: 3-bit 8192x8192 M = 3 16.73, 16.86 /
// 15.66, 15.71 us, M = 4 16.93, 16.90 / 15.96, 16.03, M = 5 17.12, 17.12 / 16.34, 16.42, M = 8 18.64, 18.60
// / 17.96, 17.92; 4-bit M = 6 19.77, 19.62 / 19.59, 19.48, M = 8 20.98, 20.94 / 20.78, 20.68; 3-bit M = 4
// 22016x4096 26.30, 26.18 / 25.24, 25.28. Where the share does not fit, 3 is slower: 4-bit M = 8
// 4096x11008 (3.1 per thread) 13.94, 13.73 / 15.01, 14.81. 2 entries were no faster than 3 at K = 4096 and
// slower at 8192 (3-bit M = 4 18.7 against 15.9 us). M = 9-16: launch_gemv_m16.
template <class T, int BITS, int MT, int P, int MINB, int RT, int W, int XP_LOW>
void launch_gemv_xt(T* yp, const T* xp, const uint4* cp, const void* lp, bool lf, const int* rp, const int* colp,
                    const void* vp, bool vf, int M, int N, int K, int U, LutLaunch so, cudaStream_t st) {
  constexpr int XSUB = W * 32 / (16 * RT * MT);  // threads per (row, 8 activation rows), as in the kernel
  if constexpr (XP_LOW > 0)
    if (shallow_outliers(so.nnz, N, XSUB, XP_LOW))
      return launch_gemv<T, BITS, MT, P, true, MINB, RT, false, true, W, XP_LOW>(yp, xp, cp, lp, lf, rp, colp, vp, vf, M, N, K, U, so, st);
  launch_gemv<T, BITS, MT, P, true, MINB, RT, false, true, W>(yp, xp, cp, lp, lf, rp, colp, vp, vf, M, N, K, U, so, st);
}

// M = 9-16: two row tiles per block (they halve the activation traffic from L2). 4-bit takes one block
// of 16 warps per SM with 2 code buffers each where 16 warps split K's U units as evenly as 8 do
// (SQUEEZELM_LUT_W16=0 / 1 forces the choice), else one block of 8 warps with 4 buffers. The 8-warp
// kernel holds 243 registers per thread and issues from 8 warps per SM; at 128 registers twice the
// warps hide the activations' L2 latency. Same process, H200, 4-bit D+S, M = 16, 8 / 16 warps, two
// runs each: 8192x8192 24.79, 24.76 / 24.31, 24.32 us; 28672x8192 83.71, 83.20 / 81.31, 80.66; dense
// 8192x8192 equal (21.39, 21.32 / 21.44, 21.30); 3 buffers 27.1 us (they spill). 4096x11008 (86 units:
// 16 warps take 6 or 5, 8 warps 11 or 10) 16.46 / 17.49. The 3-bit kernel's three code planes spill at
// 128 registers (~800 bytes), so it keeps 8 warps. (One row tile per block and two blocks per SM
// instead, same process, H200, 8192x8192: 4-bit D+S 29.44 against 25.25 us, 3-bit D+S 29.36 / 22.20,
// 4-bit dense 23.21 / 20.88.)
//
// With outliers (XT), each thread holds its first XP entries in registers through the main loop (see
// the kernel). Where a thread's share of an average row fits in fewer (the 3-bit kernel: 4 threads per
// row and 8 activation rows, 8 entries instead of 12; the 16-warp 4-bit kernel: 8 threads, 3 instead of
// 6), the shallower instantiation runs (shallow_outliers): fewer registers held (3-bit: 241 instead of
// 255, at the cap), and rows above the average take the rest after the main loop. Same process, H200,
// D+S, deep / shallow: 3-bit M = 16 22016x4096 40.3 / 38.0 us, 12288x4096 20.9 / 20.0, M = 9 22016x4096
// 39.4 / 37.1; 4-bit M = 12 22016x4096 39.9 / 39.2, M = 16 equal; the shallow 3-bit kernel forced at
// 8192x8192 (9.2 entries per thread) 22.7 -> 23.2. (The entries copied by cp.async into shared memory
// instead, which freed 33 registers in the 3-bit kernel, measured up to 14% slower at M = 9-16 (within
// 1% on three 3-bit shapes) and 3-6% slower at M <= 8: docs/log/squeezellm-kernels.md.)
template <class T, int BITS, bool XT>
void launch_gemv_m16(T* yp, const T* xp, const uint4* cp, const void* lp, bool lf, const int* rp, const int* colp,
                     const void* vp, bool vf, int M, int N, int K, int U, LutLaunch so, cudaStream_t st) {
  if constexpr (BITS == 4) {
    const bool even = (U + 15) / 16 * 16 <= (U + 7) / 8 * 8;
    if (env_int("SQUEEZELM_LUT_W16", even ? 1 : 0) != 0) {
      if constexpr (XT) return launch_gemv_xt<T, 4, 2, 2, 1, 2, 16, 3>(yp, xp, cp, lp, lf, rp, colp, vp, vf, M, N, K, U, so, st);
      return launch_gemv<T, 4, 2, 2, true, 1, 2, false, false, 16>(yp, xp, cp, lp, lf, rp, colp, vp, vf, M, N, K, U, so, st);
    }
  } else if constexpr (XT) {
    return launch_gemv_xt<T, 3, 2, 2, 1, 2, GV_WARPS, 8>(yp, xp, cp, lp, lf, rp, colp, vp, vf, M, N, K, U, so, st);
  }
  launch_gemv<T, BITS, 2, BITS == 4 ? 4 : 2, true, 1, 2, false, XT>(yp, xp, cp, lp, lf, rp, colp, vp, vf, M, N, K, U, so, st);
}

#include "dense_path.cuh"

// x read 16 bytes at a time by the GEMV: K a multiple of 8, x 16-byte aligned.
bool x_vectorisable(const Tensor& x) { return x.dim(1) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data()) % 16 == 0; }

// Whether launch() takes the GEMV for x (M <= 64 rows, or 16 where x is not vectorisable: that path
// keeps few registers free) rather than the prefill paths: the kernels that have the epilogues, so
// the entry points check their reach with the same rule.
bool gemv_takes(const Tensor& x) { return x.dim(0) <= 16 || (x_vectorisable(x) && x.dim(0) <= 64); }

template <class T, int BITS>
void launch(const Tensor& y, const Tensor& x, const Tensor& codes, const Tensor& lut, const Tensor* rows,
            const Tensor* cols, const Tensor* vals, LutLaunch so, cudaStream_t st) {
  const int M = (int)x.dim(0), K = (int)x.dim(1), N = (int)lut.dim(0);  // y is [M, N/2] for kStoreSilu, unused for kStoreRope
  if (M == 0 || N == 0) return;
  const cpu::LutPacked d(BITS, N, K);
  T* yp = y.ptr<T>();
  const T* xp = x.ptr<T>();
  const bool lf = lut.dtype == DType::F32;
  const int* rp = rows ? rows->ptr<int>() : nullptr;
  const int* cp = cols ? cols->ptr<int>() : nullptr;
  const void* vp = vals ? vals->data() : nullptr;
  const bool vf = vals && vals->dtype == DType::F32;
  const int64_t nnz = cols ? cols->numel() : 0;
  so.nnz = nnz;
  const bool vec = x_vectorisable(x);
  const int U = (int)d.U;
  if (gemv_takes(x)) {
    const uint4* q4 = codes.ptr<uint4>();
    const void* lp = lut.data();
    constexpr int P1 = 2;                  // unit buffers per warp (P - 1 in flight), 1 block of 16 rows
#define SQZ_GEMV(MT, P, XV, MINB, RT) \
  launch_gemv<T, BITS, MT, P, XV, MINB, RT>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, so, st)
#define SQZ_GEMV_XT(MT, P, MINB, RT) \
  launch_gemv<T, BITS, MT, P, true, MINB, RT, false, true>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, so, st)
#define SQZ_GEMV_M16(XT) \
  launch_gemv_m16<T, BITS, XT>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, so, st)
    // Outliers read the activations transposed (xT, written by the launch itself) from M = 3 (3-bit)
    // or M = 6 (4-bit) on, and gather from x[m][k] below that (SQUEEZELM_LUT_XT_MIN_M moves the
    // bound, 0 = never; tuning and tests). Same process, H200, D+S, xT / gather: 3-bit M = 3-8 1.5-9%
    // faster (M = 8 4096x11008 12.7 / 13.9 us, M = 4 22016x4096 25.8 / 27.4); 4-bit M = 8 1-3.5%
    // faster (8192x8192 20.9 / 21.1, 4096x11008 13.8 / 14.2), M = 6 28672x8192 64.2 / 66.4, but M = 3-4
    // 1.5-4% slower (8192x8192 M = 4 18.6 / 17.8). M = 9-64 through xT: with a separate transpose kernel
    // 28.0 us at M = 16 8192x8192 against 33.6 for the gather; in-launch 25.4 against 27.4 for that
    // kernel.
    const int xt_min_m = env_int("SQUEEZELM_LUT_XT_MIN_M", BITS == 3 ? 3 : 6);
    const bool xt = vec && rp != nullptr && xt_min_m > 0 && M >= xt_min_m && M > 2;
    // The one-row-tile kernels (M <= 8) may take their codes through a ring of bulk copies in shared
    // memory (see the kernel) on Hopper: 4-bit, 2 slots per warp of two units each (one 2 KB copy per
    // slot; SQUEEZELM_LUT_RING_UPS=1: 5 slots of one unit); 3-bit, 3 slots of one unit (3 KB).
    // 4-bit: the two-unit ring wherever it measured faster than the register buffers: dense-only at
    // M <= 8, with outliers at M <= 2, and at M = 3-5 (outliers gathered from x[m][k]) where K <= 4096.
    // Same process, H200, register buffers / two-unit ring / one-unit ring, us: M = 1 dense (D+S)
    // 4096x4096 5.10 / 4.78 / 5.25 (5.73 / 5.43 / 5.77), 8192x8192 13.98 / 13.09 / 15.40 (15.10 / 14.25
    // / 15.81), 8192x28672 41.0 / 36.2 / 44.9 (42.8 / 40.8 / 45.5), 28672x8192 47.8 / 43.1 / 50.9 (49.8
    // / 47.0 / 51.7), 12288x4096 13.0 / 11.8 / 13.6 (14.4 / 13.4 / 14.4), 22016x4096 24.9 / 21.5 / 24.3
    // (27.0 / 24.2 / 26.1), 4096x11008 9.45 / 9.44 / 10.5 (10.24 / 10.20 / 10.74); M = 2 D+S 8192x8192
    // 15.72 / 14.90, 22016x4096 29.2 / 25.1; dense M = 4 / 8 at 8192x8192 15.02 / 14.57, 17.50 /
    // 17.48, at 22016x4096 27.7 / 24.4, 30.0 / 27.9; M = 4 D+S (gather) 8192x8192 17.62 / 17.78,
    // 22016x4096 32.1 / 30.4. Fewer, larger copies: a copy request costs the copy engine about the
    // same whatever its size (~100 cycles, docs/log/squeezellm-kernels.md), so 1 KB copies capped the one-unit
    // ring near 2.6 TB/s. (Those one-unit ring times include the proxy fence every refill needs; its
    // earlier, faster times at de3dde9 came without it, and about half of its launches at K = 2080
    // read a unit's rows from the slot's next copy: see fence_proxy_async_shared.)
    // 3-bit, launches alone, where a warp's codes of one row group are at most 3 units (K <= 4096):
    // dense-only at M <= 2 at every N, with outliers at M <= 2 where each block takes one row group, otherwise
    // where a block walks at least 4 row groups, never at M = 3-5 with outliers. Same process, H200,
    // K = 4096, M = 1, register buffers / ring (with the fence), us: dense 4096 rows 4.70 / 4.10,
    // 12288 11.76 / 11.58, 22016 21.03 / 18.68 (M = 2 / 4 / 8: 21.1 / 19.2, 21.2 / 20.4, 23.2 /
    // 23.7); D+S 4096 4.86 / 4.70, 12288 12.36 / 13.18, 22016 22.2 / 21.0 (and at 559e0de: D+S
    // 4096x4096 M = 1 4.87 / 4.70, M = 2 4.92 / 4.82; 8192x8192 13.52 / 15.40).
    // (At K = 8192 the one-unit 3-bit ring was slower: D+S 8192x8192 15.3 against 13.5 us; two units
    // per slot, 6 KB copies, slower still: 15.7 against 13.3.)
    // Those are launches alone. At M <= 2, the decode step, 3-bit takes the ring everywhere: in a
    // graph-replayed LLaMA-2-7B-shaped step (6 layers, D+S 0.45%, fused norm and epilogues, H100, the
    // settings alternated in one process, four runs each) forcing it took 536.1-537.5 us against
    // 549.8-553.3 us for the launch-alone rule above, which kept the q|k|v (12288x4096) and down
    // (4096x11008) projections on register buffers; alone, the ring was 3% slower at 12288x4096 (15.7
    // against 15.2 us) and equal at 4096x11008 (12.7 us). Under programmatic dependent launch the
    // ring's first copies, requested before griddepcontrol.wait, land in shared memory while the
    // previous kernel runs.
    // SQUEEZELM_LUT_RING=0 / 1 forces the register buffers / the ring (tuning, tests).
    const int ring_env = env_int("SQUEEZELM_LUT_RING", -1);
    const bool sparse = rp != nullptr;
    // The outlier split over a row's 4 lanes (the kernel's OSPLIT): at M <= 2, and for 4-bit at M = 3-4
    // on the two-unit ring (split4, OSPLIT = 4: each lane gathers its entries' activations of the 4
    // rows, in the main loop as at M <= 2), where the register-buffer kernel walked each warp's share on
    // the two lane quarters of the real rows, 4.6 entries deep at 0.45% of K = 8192, after the loop.
    // Same process, H100, outliers per row 37 (0.45%) / 1, old / split, us: 8192x8192 M = 3 18.84 /
    // 16.68 (17.61 / 16.41), M = 4 18.87 / 17.65 (17.83 / 17.01); 22016x4096 M = 4 32.24 / 29.61;
    // 4096x11008 M = 4 12.70 / 12.82 at 50 per row (0.45%), 15.17 / 14.17 at 100. The same split over
    // 8 rows (M = 5-8; one entry per lane early, 127 registers) lost at 0.45% against the gather (M = 5)
    // and xT (M = 6-8): 8192x8192 M = 5 19.58 / 20.40, M = 8 20.95 / 23.66, 28672x8192 M = 6 65.2 /
    // 69.8, though it won at one outlier per row (M = 8 19.97 / 18.50): eight scattered 2-byte gathers
    // per entry against one 16-byte xT load. SQUEEZELM_LUT_OSPLIT=0: no split (tuning);
    // SQUEEZELM_LUT_OSPLIT_M=2 keeps M = 3-4 on the older kernels (tuning, tests).
    const bool split_env = env_int("SQUEEZELM_LUT_OSPLIT", 1) != 0;
    const bool split4 =
        BITS == 4 && M > 2 && M <= 4 && M <= env_int("SQUEEZELM_LUT_OSPLIT_M", 4) && vec && sparse && split_env;
    bool ring = ring_env != 0 && hopper_kernels_available();
    if (ring && ring_env < 0) {
      if constexpr (BITS == 4) {
        ring = !sparse || M <= 2 || split4 || (M <= 5 && K <= 4096);
      } else {
        int dev = 0;
        cuda_check(cudaGetDevice(&dev), "lutMatmul: cudaGetDevice");
        const bool short_groups = (U + GV_WARPS - 1) / GV_WARPS <= 1;
        // row groups against the ring kernel's resident blocks (2 per SM)
        const int groups = (N + 15) / 16, slots = 2 * sm_count(dev);
        const bool many_groups = groups >= 4 * slots;
        ring = M <= 2 || (short_groups && many_groups && !sparse);
      }
    }
    const bool osplit = M <= 2 && vec && sparse && split_env;
    // Each of a row's 32 lanes of the 4-bit ring kernel requests its first 2 outlier entries before
    // the main loop, or 4 where an average row holds more than 1.6 per lane (see below).
    const bool deep = osplit && env_int("SQUEEZELM_LUT_OSPLIT_DEPTH", avg_row_fits(nnz, N, 32, 2) ? 2 : 4) == 4;
    // The decode step (M <= 2, x vectorisable): launch_gemv_decode, the norm fused in front where asked
    // (the entry points checked its reach, check_norm_fusable: M <= 2, x vectorisable).
    const bool ups1 = BITS == 4 && ring && env_int("SQUEEZELM_LUT_RING_UPS", 2) == 1;
    if (so.gamma != nullptr) return launch_gemv_decode<T, BITS, true>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, ring, osplit, deep, so, st);
    if (M <= 2 && vec && !ups1)
      return launch_gemv_decode<T, BITS, false>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, ring, osplit, deep, so, st);
    if (ring && M <= 8 && vec && (osplit || (split4 && !ups1) || !xt)) {
      // M = 3-8 (the outlier split at 4-bit M = 3-4 only), and the 4-bit ring with one-unit slots at
      // every M <= 8 (SQUEEZELM_LUT_RING_UPS=1: 5 slots; tuning).
#define SQZ_GEMV_RING(OSPLIT, XPO, RING, UPS) \
  launch_gemv<T, BITS, 1, P1, true, 2, 1, OSPLIT, false, GV_WARPS, XPO, RING, UPS>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, so, st)
      if constexpr (BITS == 4) {
        if (ups1) {
          if (osplit) SQZ_GEMV_RING(true, 0, 5, 1);
          else SQZ_GEMV_RING(false, 0, 5, 1);
        } else if (split4) {
          SQZ_GEMV_RING(4, 0, 2, 2);
        } else {
          SQZ_GEMV_RING(false, 0, 2, 2);
        }
      } else {
        SQZ_GEMV_RING(false, 0, 3, 1);
      }
#undef SQZ_GEMV_RING
      return;
    }
    if (xt && M <= 8) launch_gemv_xt<T, BITS, 1, P1, 2, 1, GV_WARPS, 3>(yp, xp, q4, lp, lf, rp, cp, vp, vf, M, N, K, U, so, st);
    else if (xt && M <= 16) SQZ_GEMV_M16(true);
    else if (xt && M <= 32) SQZ_GEMV_XT(4, (BITS == 4 ? 2 : 1), 1, 2);
    else if (xt) SQZ_GEMV_XT(8, 1, 1, (BITS == 4 ? 2 : 1));
    else if (M <= 8 && vec) SQZ_GEMV(1, P1, true, 2, 1);
    else if (M <= 8) SQZ_GEMV(1, P1, false, 2, 1);
    else if (!vec) SQZ_GEMV(2, P1, false, 2, 1);
    // More activation rows: 2 row tiles per block (launch_gemv_m16).
    else if (M <= 16) SQZ_GEMV_M16(false);
    else if (M <= 32) SQZ_GEMV(4, (BITS == 4 ? 2 : 1), true, 1, 2);
    else SQZ_GEMV(8, 1, true, 1, (BITS == 4 ? 2 : 1));
#undef SQZ_GEMV
#undef SQZ_GEMV_XT
#undef SQZ_GEMV_M16
  } else {
    if (dense::run<T, BITS>(y, x, codes, lut, rows, cols, vals, U, so.half, st)) return;  // large M: dense_path.cuh
    constexpr size_t smem = pgemm_smem_bytes<BITS>();
    auto kern = vec ? lut_gemm_mma_kernel<T, BITS, true> : lut_gemm_mma_kernel<T, BITS, false>;
    if (vec) allow_dynamic_smem<lut_gemm_mma_kernel<T, BITS, true>>(smem, "lutMatmul");
    else allow_dynamic_smem<lut_gemm_mma_kernel<T, BITS, false>>(smem, "lutMatmul");
    dim3 grid((N + PBN - 1) / PBN, (M + PBM - 1) / PBM), block(PM_THREADS);
    launch_plain(kern, grid, block, smem, st, yp, xp, codes.ptr<uint32_t>(), lut.data(), lf, rp, cp, vp, vf, M, N, K, U, so.half);
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
  if (bits == 4) launch_plain(lut_repack_kernel<4>, dim3(blocks), dim3(threads), 0, stream, o, q, N, groups, (int)d.U, quarters);
  else if (bits == 3) launch_plain(lut_repack_kernel<3>, dim3(blocks), dim3(threads), 0, stream, o, q, N, groups, (int)d.U, quarters);
  else fail("ERR_UNSUPPORTED", "lutRepack: bits must be 3 or 4");
}

namespace {

// The fused RMSNorm's reach (launch_gemv_decode with XS): up to 2 rows of x, K a multiple of 8, x 16-byte aligned.
void check_norm_fusable(const Tensor& x, const char* op) {
  if (x.dim(0) > 2 || !x_vectorisable(x))
    fail("ERR_UNSUPPORTED", std::string(op) + ": the fused RMSNorm runs on CUDA for up to 2 rows of x with K a multiple of 8 "
                                              "(16-byte aligned), got x " + x.shape_str());
}

// launch() for x's dtype and the weight's bits.
void launch_any(const Tensor& y, const Tensor& x, const Tensor& codes, const Tensor& lut, const Tensor* rows,
                const Tensor* cols, const Tensor* vals, int bits, const LutLaunch& so, const char* op, cudaStream_t stream) {
  const bool bf = x.dtype == DType::BF16;
  if (bits == 4) {
    if (bf) launch<__nv_bfloat16, 4>(y, x, codes, lut, rows, cols, vals, so, stream);
    else launch<__half, 4>(y, x, codes, lut, rows, cols, vals, so, stream);
  } else if (bits == 3) {
    if (bf) launch<__nv_bfloat16, 3>(y, x, codes, lut, rows, cols, vals, so, stream);
    else launch<__half, 3>(y, x, codes, lut, rows, cols, vals, so, stream);
  } else {
    fail("ERR_UNSUPPORTED", std::string(op) + ": bits must be 3 or 4");
  }
}

}  // namespace

void lut_matmul_packed(const Tensor& y, const Tensor& x, const Tensor& codes, const Tensor& lut,
                       const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, int pair_half, cpu::LutEpilogue epilogue,
                       const Tensor* gamma, float eps, const Tensor* next_codes, cudaStream_t stream) {
  if (epilogue != cpu::kLutStore && !gemv_takes(x))
    fail("ERR_UNSUPPORTED", std::string("lutMatmulPacked: the ") + (epilogue == cpu::kLutSiluPairs ? "siluPairs" : "residual") +
                                " epilogue runs on CUDA for up to 64 rows of x (16 unaligned), got " + std::to_string(x.dim(0)));
  if (gamma) check_norm_fusable(x, "lutMatmulPacked");
  LutLaunch so{};
  so.half = pair_half;
  so.mode = epilogue == cpu::kLutSiluPairs ? kStoreSilu : epilogue == cpu::kLutResidual ? kStoreResidual : kStoreRows;
  so.gamma = gamma ? gamma->data() : nullptr;
  so.eps = eps;
  // SQUEEZELM_LUT_PREFETCH_KB: KB per block of the next weight's codes requested into L2 (0: none;
  // tuning). A row group of the packed layout is 16 rows of codes, contiguous. Only the 4-bit decode
  // GEMVs (M <= 2) on the code ring act on it (launch_gemv_decode).
  const int next_kb = next_codes != nullptr ? env_int("SQUEEZELM_LUT_PREFETCH_KB", 16) : 0;
  if (next_kb > 0 && next_kb <= 1024) {
    so.next.codes = static_cast<const unsigned char*>(next_codes->data());
    so.next.end = so.next.codes + next_codes->numel() * 4;
    so.next.group_bytes = 16LL * next_codes->dim(1) * 4;
    so.next.block_bytes = next_kb * 1024;
  }
  launch_any(y, x, codes, lut, rows, cols, vals, bits, so, "lutMatmul", stream);
}

void lut_rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& x, const Tensor& codes,
                     const Tensor& lut, const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, int pair_half,
                     const Tensor& positions, const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens,
                     const Tensor& cu_q, const Tensor* gamma, float eps, cudaStream_t stream) {
  if (!gemv_takes(x))
    fail("ERR_UNSUPPORTED", "lutRopeAppend: runs on CUDA for up to 64 rows of x (16 unaligned), got " + std::to_string(x.dim(0)));
  if (gamma) check_norm_fusable(x, "lutRopeAppend");
  if (x.dim(0) == 0) return;
  LutLaunch so{};
  so.gamma = gamma ? gamma->data() : nullptr;
  so.eps = eps;
  so.half = pair_half;
  so.mode = kStoreRope;
  so.rope = rope_append_params(q_out, kc, x.dim(0), positions, inv_freq, page_table, seq_lens, cu_q);
  so.q_out = q_out.data();
  so.kc = kc.data();
  so.vc = vc.data();
  launch_any(q_out, x, codes, lut, rows, cols, vals, bits, so, "lutRopeAppend", stream);  // (q_out stands in for y, unused)
}

}  // namespace sqz::cuda
