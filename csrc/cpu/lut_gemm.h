// SqueezeLLM dense-and-sparse matmul, CPU reference.
//
// Interchange layout (the file format):
//   qweight i32 [Kg*bits/32, N], Kg = ceil(K/32)*32: the codes of output row n packed along the
//   input dim K, least significant bits first; 4-bit: 8 codes per word; 3-bit: 32 codes in
//   3 words, straddling word boundaries (code i of a group sits at bit 3i of the 96-bit group).
//   lut [N, 2^bits] (f16 | f32): row n = the codebook of output channel n.
//   Optional outliers in CSR over output rows: rows i32 [N+1], cols i32 [nnz], vals [nnz]
//   (f16 | f32), added to the dense part.
//
// Kernel layout ("packed", made once by lut_repack; lut and outliers stay as they are):
//   Output rows are taken in tiles of 16 (Np = ceil(N/16)*16, rows past N hold code 0) and K in
//   units of KU = 128 k (4-bit) or 512 k (3-bit) (Kp = ceil(Kg/KU)*KU, codes past Kg are 0).
//   codes i32 [Np, Kp*bits/32], stored tile by tile, unit by unit, in 16-byte planes:
//     word (tile*U + u)*64*WU + ((w/4)*64 + r*4 + q)*4 + w%4,   U = Kp/KU, WU = 4 (4-bit) | 12 (3-bit),
//   is word w (0..WU-1) of row n = 16*tile + r, "quarter" q in 0..3 (so the words w = 4v..4v+3 of
//   all 64 (row, quarter)s of a plane v are one contiguous 1 KB run). Quarter q of row n in unit u
//   holds the codes of k = u*KU + 32c + 8q + j (chunk c in 0..KU/32-1, j in 0..7) as 4 pairs per chunk,
//   pair i = (k = ..+2i, ..+2i+1), e = code(k) | code(k+1) << bits:
//     4-bit: word c, bits 8i..8i+7 (the interchange word itself: w[c] = qweight word q of group
//            4u+c);
//     3-bit: chunks in blocks of 4 (b = c/4, cc = c%4) over words 3b..3b+2, a pair's 6 bits in
//            the low bits of a byte: chunk cc < 3 in word 3b+cc, pair i at bits 8i..8i+5; chunk 3 in
//            the two top bits of every byte: bits 2s, 2s+1 of its pair i at bits 8i+6, 8i+7 of word
//            3b+s (s = 0..2). So a chunk's "pair bytes" (pair i in byte i) are w[3b+cc] & 0x3f3f3f3f,
//            or for chunk 3 (w[3b]>>6 & 0x03030303) | (w[3b+1]>>4 & 0x0c0c0c0c) | (w[3b+2]>>2 &
//            0x30303030), and a pair's lookup offset is one byte permute of them, as at 4 bits.
//   In a chunk's pair bytes, code j (k = ..+j) sits at bit lut_code_shift(bits, j).
//   One 16-byte load of a quarter's words is, after a pair-table lookup, exactly the A operand
//   of mma.m16n8k16 (see csrc/kernels/lut_gemm/lut_gemm.cu).
//
// y[m, n] = sum_k lut[n, code(n, k)] * x[m, k] + sum_j vals[j] * x[m, cols[j]].
//
// Paired rows (optional, chosen when a weight is loaded; lut_pair_row): the rows of a weight may be
// stored in an order that puts output rows j and j + H (H = "pair half") in one tile, at tile rows
// i and i + 8, so that a fused epilogue (SiLU-and-multiply of a gate|up projection) has both in one
// thread. The codes, lut and outlier rows are all in that stored order; the matmul writes each
// stored row to its output row, so the result is the unpaired weight's.
#pragma once
#include <cstdint>

#include "../core/tensor.h"

namespace sqz::cpu {

#ifdef __CUDACC__
#define SQZ_LUT_HD __host__ __device__ __forceinline__
#else
#define SQZ_LUT_HD inline
#endif

// Output row of stored row p of a weight with paired rows of half H (H = 0: p itself). H is a
// multiple of 8 and N a multiple of 2H: stored tile t holds, of the 2H-row block b = t / (H/8),
// rows 8s .. 8s+7 (s = t % (H/8)) in its rows 0..7 and their partners 8s+H .. 8s+H+7 in rows 8..15.
template <class I>
SQZ_LUT_HD I lut_pair_row(I p, I H) {
  if (H <= 0) return p;
  const I t = p >> 4, i = p & 15, per = H >> 3, b = t / per, s = t - b * per;
  return b * 2 * H + 8 * s + (i < 8 ? i : H + i - 8);
}
// Whether rows of an N-row weight can be paired at half H.
inline bool lut_pairable(int64_t N, int64_t H) { return H > 0 && H % 8 == 0 && N % (2 * H) == 0; }

// Bit offset of code j (0..7) of a chunk in its pair bytes (pair i = codes 2i, 2i+1 in byte i, the
// first in the low bits): 4j at 4 bits, 8(j/2) + 3(j%2) at 3.
SQZ_LUT_HD constexpr int lut_code_shift(int bits, int j) { return 8 * (j >> 1) + bits * (j & 1); }

// The pair bytes of the fourth chunk of a 3-bit block from the block's three words (the layout above).
SQZ_LUT_HD uint32_t lut_chunk3_pairs(uint32_t w0, uint32_t w1, uint32_t w2) {
  return ((w0 >> 6) & 0x03030303u) | ((w1 >> 4) & 0x0c0c0c0cu) | ((w2 >> 2) & 0x30303030u);
}
// The pair bytes of chunk c of a unit from the words w of one (row, quarter) (the layout above):
// 4-bit, word c itself; 3-bit, one mask for chunks 0-2 of a block, three shifts and masks for chunk 3.
// The CPU op and every CUDA kernel read codes through it (in the kernels w is a register array and c
// a constant once unrolled).
SQZ_LUT_HD uint32_t lut_chunk_pairs(const uint32_t* w, int bits, int c) {
  if (bits == 4) return w[c];
  const int b = c >> 2, cc = c & 3;
  if (cc < 3) return w[3 * b + cc] & 0x3f3f3f3fu;
  return lut_chunk3_pairs(w[3 * b], w[3 * b + 1], w[3 * b + 2]);
}

// Decodes code i (0..31) of a 32-code interchange group given the group's `bits` words.
inline uint32_t lut_code(const uint32_t* w, int bits, int i) {
  if (bits == 4) return (w[i >> 3] >> ((i & 7) * 4)) & 15u;
  const int bit = 3 * i, word = bit >> 5, off = bit & 31;
  uint32_t v = w[word] >> off;
  if (off > 29) v |= w[word + 1] << (32 - off);
  return v & 7u;
}

// Geometry of the packed layout.
struct LutPacked {
  int bits;
  int64_t N, Kg, Np, Kp, U, KU, WU;
  LutPacked(int b, int64_t n, int64_t k) : bits(b), N(n) {
    Kg = (k + 31) / 32 * 32;
    KU = b == 4 ? 128 : 512;
    WU = b == 4 ? 4 : 12;
    Np = (n + 15) / 16 * 16;
    Kp = (Kg + KU - 1) / KU * KU;
    U = Kp / KU;
  }
  int64_t words_per_row() const { return Kp * bits / 32; }
  // Index of word w of (row n, quarter q) in unit u.
  int64_t word(int64_t n, int64_t u, int q, int w) const {
    return ((n / 16) * U + u) * 64 * WU + ((w / 4) * 64 + (n % 16) * 4 + q) * 4 + w % 4;
  }
  // Code (n, k) of packed codes `c`.
  uint32_t get(const uint32_t* c, int64_t n, int64_t k) const;
  // Sets code (n, k) (the bits must be zero before).
  void put(uint32_t* c, int64_t n, int64_t k, uint32_t code) const;
};

// dst i32 [Np, Kp*bits/32] (packed) <- qweight i32 [Kg*bits/32, N] (interchange).
void lut_repack(const Tensor& dst, const Tensor& qweight, int bits);

// What lut_matmul_packed does with its product z (the values are the native surface's `epilogue`
// argument, ts/ops/lut.ts). kLutStore: y = z (y [M, N]); kLutSiluPairs (pair_half = N/2): y[m, j] =
// silu(z[m, j]) * z[m, j + N/2] with z rounded to y's dtype first (y [M, N/2]); kLutResidual: y += z,
// z rounded to y's dtype first (add(y, y, z) after the plain product).
enum LutEpilogue : int { kLutStore = 0, kLutSiluPairs = 1, kLutResidual = 2 };

// z[M,N] = x[M,K] * dequant(codes, lut)^T + CSR outliers, codes in the packed layout, stored rows
// paired at half pair_half (0: not paired), then the epilogue.
// gamma (or null): x is replaced by rms_norm(x, gamma, eps) in x's dtype first (the decoder's RMSNorm
// fused in front).
void lut_matmul_packed(const Tensor& y, const Tensor& x, const Tensor& codes, const Tensor& lut,
                       const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, int pair_half = 0,
                       LutEpilogue epilogue = kLutStore, const Tensor* gamma = nullptr, float eps = 1e-6f);

// lut_matmul_packed into a q|k|v row of x's dtype (the weight's rows paired at pair_half = head_dim/2,
// so each tile holds rotation pairs), then rope_append(q_out, kc, vc, q|k|v, ...) (cpu/fused.h): the
// decode step's quantized q|k|v projection with RoPE and the fp16 cache append behind it. gamma: the
// RMSNorm of x in front, as in lut_matmul_packed.
void lut_rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& x, const Tensor& codes,
                     const Tensor& lut, const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, int pair_half,
                     const Tensor& positions, const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens,
                     const Tensor& cu_q, const Tensor* gamma = nullptr, float eps = 1e-6f);

}  // namespace sqz::cpu
