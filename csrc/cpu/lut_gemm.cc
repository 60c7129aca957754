#include "lut_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../core/error.h"
#include "../core/parallel.h"
#include "elementwise.h"
#include "fused.h"
#include "gemm.h"
#include "vec.h"


namespace sqz::cpu {

namespace {

// lut_matmul_packed from this many rows of x on: the weight dequantized once, then the blocked
// matmul (gemm.cc), where that f32 copy takes at most kDenseMaxBytes.
constexpr int64_t kDenseMinM = 16;
constexpr int64_t kDenseMaxBytes = int64_t(512) << 20;

// The row kernels of the CPU matmul at small M. For row n and unit u, the words of quarter q are
// at row_words(L, c, n, u) + (w / 4) * 256 + q * 4 + w % 4 (see the layout in lut_gemm.h), and
// chunk ch of quarter q holds the 8 codes of k = u * KU + 32 ch + 8 q .. + 7.
inline const uint32_t* row_words(const LutPacked& L, const uint32_t* c, int64_t n, int64_t u) {
  return c + ((n / 16) * L.U + u) * 64 * L.WU + (n % 16) * 16;
}
template <int bits>
inline void quarter_words(const uint32_t* rw, int q, uint32_t (&wq)[12]) {
  constexpr int WU = bits == 4 ? 4 : 12;
  for (int i = 0; i < WU; ++i) wq[i] = rw[(i / 4) * 256 + q * 4 + i % 4];
}

// Row n's weights (`table`: the row's 2^bits entries as floats) into dst[0, Kp), whole chunks of 8,
// the k at and past K set to 0 (the caller's x is zero there as well). The portable form; the AVX2
// one below does the same with 8 lookups per instruction.
template <int bits>
void dequant_row_portable(const LutPacked& L, const uint32_t* c, int64_t n, const float* table, int64_t K, float* dst) {
  constexpr uint32_t mask = (1u << bits) - 1;
  const int chunks = (int)(L.KU / 32);
  for (int64_t u = 0; u < L.U; ++u) {
    const uint32_t* rw = row_words(L, c, n, u);
    for (int q = 0; q < 4; ++q) {
      uint32_t wq[12];
      quarter_words<bits>(rw, q, wq);
      for (int ch = 0; ch < chunks; ++ch) {
        const int64_t k0 = u * L.KU + 32 * ch + 8 * q;
        const uint32_t v = lut_chunk_pairs(wq, bits, ch);
        for (int j = 0; j < 8; ++j) dst[k0 + j] = k0 + j < K ? table[(v >> lut_code_shift(bits, j)) & mask] : 0.f;
      }
    }
  }
}

#ifdef SQZ_X86
// 8 weights of one chunk from its pair bytes v: 4-bit entries 0-7 and 8-15 in two registers, picked
// by code bit 3 (moved to the sign bit); 3-bit entries in one. Lanes at k >= K are zeroed.
template <int bits>
__attribute__((target("avx2,fma"))) inline __m256 chunk_weights(uint32_t v, __m256 t0, __m256 t1, int64_t k0, int64_t K) {
  const __m256i shifts = bits == 4 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28) : _mm256_setr_epi32(0, 3, 8, 11, 16, 19, 24, 27);
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)v), shifts), _mm256_set1_epi32((1 << bits) - 1));
  __m256 w = _mm256_permutevar8x32_ps(t0, idx);
  if constexpr (bits == 4) w = _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(t1, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  if (k0 + 8 > K) {  // the chunks at the end of a row whose K is not a multiple of 8 (or past it)
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::max<int64_t>(0, K - k0)), lane);
    w = _mm256_and_ps(w, _mm256_castsi256_ps(keep));
  }
  return w;
}

template <int bits>
__attribute__((target("avx2,fma"))) void dequant_row_avx2(const LutPacked& L, const uint32_t* c, int64_t n,
                                                           const float* table, int64_t K, float* dst) {
  static_assert(bits == 3 || bits == 4, "3- or 4-bit codes");
  const int chunks = (int)(L.KU / 32);
  const __m256 t0 = _mm256_loadu_ps(table), t1 = bits == 4 ? _mm256_loadu_ps(table + 8) : t0;
  for (int64_t u = 0; u < L.U; ++u) {
    const uint32_t* rw = row_words(L, c, n, u);
    for (int q = 0; q < 4; ++q) {
      uint32_t wq[12];
      quarter_words<bits>(rw, q, wq);
      for (int ch = 0; ch < chunks; ++ch) {
        const int64_t k0 = u * L.KU + 32 * ch + 8 * q;
        _mm256_storeu_ps(dst + k0, chunk_weights<bits>(lut_chunk_pairs(wq, bits, ch), t0, t1, k0, K));
      }
    }
  }
}

// One row times the M (<= 16) rows of x (each Kp long, zero past K), the weights never stored: each
// group of four chunks of a quarter is decoded once and summed into every x row's accumulator as a
// short tree (two products, two fused adds, one add), so one row of x does not wait on one chain.
// MC: the row count when known at compile time (1: decode; its accumulator stays in a register), 0
// for any M.
template <int bits, int MC>
__attribute__((target("avx2,fma"))) void rows_dot_avx2(const LutPacked& L, const uint32_t* c, int64_t n, const float* table,
                                                         int64_t K, const float* x, int64_t M_, int64_t Kp, float* out) {
  const int64_t M = MC ? MC : M_;
  const int chunks = (int)(L.KU / 32);
  const __m256 t0 = _mm256_loadu_ps(table), t1 = bits == 4 ? _mm256_loadu_ps(table + 8) : t0;
  __m256 acc[16];
  for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t u = 0; u < L.U; ++u) {
    const uint32_t* rw = row_words(L, c, n, u);
    for (int q = 0; q < 4; ++q) {
      uint32_t wq[12];
      quarter_words<bits>(rw, q, wq);
      const int64_t kq = u * L.KU + 8 * q;
      for (int ch = 0; ch < chunks; ch += 4) {
        const int64_t k = kq + 32 * ch;
        const __m256 w0 = chunk_weights<bits>(lut_chunk_pairs(wq, bits, ch), t0, t1, k, K);
        const __m256 w1 = chunk_weights<bits>(lut_chunk_pairs(wq, bits, ch + 1), t0, t1, k + 32, K);
        const __m256 w2 = chunk_weights<bits>(lut_chunk_pairs(wq, bits, ch + 2), t0, t1, k + 64, K);
        const __m256 w3 = chunk_weights<bits>(lut_chunk_pairs(wq, bits, ch + 3), t0, t1, k + 96, K);
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = x + m * Kp + k;
          const __m256 p01 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 32), _mm256_mul_ps(w0, _mm256_loadu_ps(xm)));
          const __m256 p23 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 96), _mm256_mul_ps(w2, _mm256_loadu_ps(xm + 64)));
          acc[m] = _mm256_add_ps(acc[m], _mm256_add_ps(p01, p23));
        }
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) out[m] = vec::hsum256(acc[m]);
}
#endif

// The row kernels of one build and machine: AVX2 where vec.h uses its AVX2 forms, portable otherwise
// (SQUEEZELM_CPU_PORTABLE=1 forces the portable ones, for tests).
using DequantRow = void (*)(const LutPacked&, const uint32_t*, int64_t, const float*, int64_t, float*);
using RowsDot = void (*)(const LutPacked&, const uint32_t*, int64_t, const float*, int64_t, const float*, int64_t, int64_t, float*);
struct RowKernels {
  DequantRow dequant3, dequant4;
  // M <= 16, weights not stored (null: dequant + dot); [0]: one x row, [1]: any
  RowsDot rows_dot3[2] = {nullptr, nullptr}, rows_dot4[2] = {nullptr, nullptr};
};
RowKernels pick_row_kernels() {
#ifdef SQZ_X86
  if (vec::avx2())
    return {dequant_row_avx2<3>, dequant_row_avx2<4>, {rows_dot_avx2<3, 1>, rows_dot_avx2<3, 0>}, {rows_dot_avx2<4, 1>, rows_dot_avx2<4, 0>}};
#endif
  return {dequant_row_portable<3>, dequant_row_portable<4>};
}

}  // namespace

uint32_t LutPacked::get(const uint32_t* c, int64_t n, int64_t k) const {
  const int64_t u = k / KU, kk = k % KU;
  const int ch = (int)(kk / 32), q = (int)((kk % 32) / 8), j = (int)(kk % 8);
  uint32_t w[12];
  for (int i = 0; i < WU; ++i) w[i] = c[word(n, u, q, i)];
  return (lut_chunk_pairs(w, bits, ch) >> lut_code_shift(bits, j)) & ((1u << bits) - 1);
}

void LutPacked::put(uint32_t* c, int64_t n, int64_t k, uint32_t code) const {
  const int64_t u = k / KU, kk = k % KU;
  const int ch = (int)(kk / 32), q = (int)((kk % 32) / 8), j = (int)(kk % 8);
  if (bits == 4) {
    c[word(n, u, q, ch)] |= code << (4 * j);
    return;
  }
  const int b = ch >> 2, cc = ch & 3;
  if (cc < 3) {
    c[word(n, u, q, 3 * b + cc)] |= code << lut_code_shift(3, j);
    return;
  }
  // chunk 3: bit t of its pair i (t = 3 (j % 2) + s) at bit 8i + 6 + t % 2 of word 3b + t / 2
  for (int s = 0; s < 3; ++s)
    if ((code >> s) & 1u) {
      const int t = 3 * (j & 1) + s;
      c[word(n, u, q, 3 * b + t / 2)] |= 1u << (8 * (j >> 1) + 6 + t % 2);
    }
}

void lut_repack(const Tensor& dst, const Tensor& qweight, int bits) {
  const int64_t N = qweight.dim(1), groups = qweight.dim(0) / bits;
  const LutPacked L(bits, N, groups * 32);
  const uint32_t* q = qweight.ptr<uint32_t>();
  uint32_t* d = dst.ptr<uint32_t>();
  const int64_t tile_words = 16 * L.words_per_row();
  parallel_for(L.Np / 16, 1, [&](int64_t tb, int64_t te) {
    std::memset(d + tb * tile_words, 0, (size_t)((te - tb) * tile_words) * 4);
    for (int64_t tile = tb; tile < te; ++tile)
      for (int64_t n = tile * 16; n < std::min(N, tile * 16 + 16); ++n)
        for (int64_t g = 0; g < groups; ++g) {
          uint32_t gw[4];
          for (int b = 0; b < bits; ++b) gw[b] = q[(g * bits + b) * N + n];
          if (bits == 4) {
            // 4-bit: a word permutation (word q of group g is quarter q's word of chunk g % 4).
            for (int qq = 0; qq < 4; ++qq) d[L.word(n, g / 4, qq, (int)(g % 4))] = gw[qq];
          } else {
            for (int i = 0; i < 32; ++i) L.put(d, n, g * 32 + i, lut_code(gw, bits, i));
          }
        }
  });
}

void lut_matmul_packed(const Tensor& y, const Tensor& x, const Tensor& codes, const Tensor& lut,
                       const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, int pair_half, LutEpilogue epilogue,
                       const Tensor* gamma, float eps) {
  const int64_t M = x.dim(0), K = x.dim(1), N = lut.dim(0), H = pair_half;
  if (gamma) {
    // The unfused sequence: the norm into x's dtype, then the product.
    Tensor h = Tensor::empty(x.dtype, {M, K}, Device{});
    rms_norm(h, x, *gamma, eps);
    lut_matmul_packed(y, h, codes, lut, rows, cols, vals, bits, pair_half, epilogue);
    return;
  }
  if (epilogue == kLutResidual) {
    Tensor z = Tensor::empty(y.dtype, {M, N}, Device{});
    lut_matmul_packed(z, x, codes, lut, rows, cols, vals, bits, pair_half, kLutStore);
    add(y, y, z);
    return;
  }
  if (epilogue == kLutSiluPairs) {
    // The unfused sequence itself: z rounded to y's dtype, then siluMul's arithmetic.
    Tensor z = Tensor::empty(y.dtype, {M, N}, Device{});
    lut_matmul_packed(z, x, codes, lut, rows, cols, vals, bits, pair_half, kLutStore);
    silu_mul(y, z);
    return;
  }
  const LutPacked L(bits, N, K);
  const int E = 1 << bits;
  const uint32_t* c = codes.ptr<uint32_t>();

  // Row n's table as floats. The products use the table entries in the activation dtype, as the
  // CUDA kernels do (their tensor cores multiply two values of one type: an f16 table with bf16
  // activations loses 3 bits of each entry there); outliers are added in fp32 by both.
  auto row_table = [&](int64_t n, float (&t)[16]) {
    convert_to_float(static_cast<const char*>(lut.data()) + (size_t)(n * E) * dtype_size(lut.dtype), lut.dtype, t, (size_t)E);
    if (x.dtype == DType::F16)
      for (int e = 0; e < E; ++e) t[e] = half_to_float(float_to_half(t[e]));
    else if (x.dtype == DType::BF16)
      for (int e = 0; e < E; ++e) t[e] = bf16_to_float(float_to_bf16(t[e]));
  };

  const int32_t* rp = rows ? rows->ptr<int32_t>() : nullptr;
  const int32_t* cp = cols ? cols->ptr<int32_t>() : nullptr;
  const int64_t nnz = cols ? cols->numel() : 0;
  static const RowKernels kern = pick_row_kernels();
  const vec::Loops& V = vec::loops();
  const DequantRow dequant = bits == 4 ? kern.dequant4 : kern.dequant3;
  const RowsDot rows_dot = (bits == 4 ? kern.rows_dot4 : kern.rows_dot3)[M == 1 ? 0 : 1];
  // Row n's weights (table entries) into dst[0, Kp), zero from K on.
  auto dequant_row = [&](int64_t n, float* dst) {
    float t[16];
    row_table(n, t);
    dequant(L, c, n, t, K, dst);
  };
  // Row n's outliers (memory-safe even on unchecked data; the loader checks the CSR once).
  auto for_outliers = [&](int64_t n, auto&& f) {
    if (!rp) return;
    const int64_t b = std::max<int64_t>(0, rp[n]), e = std::min<int64_t>(nnz, rp[n + 1]);
    for (int64_t t = b; t < e; ++t) {
      const int32_t k = cp[t];
      if (k >= 0 && k < K) f(k, load_as_float(vals->data(), vals->dtype, (size_t)t));
    }
  };

  if (M >= kDenseMinM && N * K * 4 <= kDenseMaxBytes) {
    // Many rows of x: the weight is dequantized once (outliers added in fp32) and multiplied by the
    // blocked matmul. The row-at-a-time loop below reads all of x once per output row: on two
    // cores, pycoder-mini's perplexity over 4 windows took 6.7 s that way against 2.2 s dense.
    Tensor w = Tensor::empty(DType::F32, {N, K}, Device{});
    float* wp = w.ptr<float>();
    parallel_for(N, 4, [&](int64_t nb, int64_t ne) {
      std::vector<float> buf((size_t)L.Kp);
      for (int64_t n = nb; n < ne; ++n) {
        float* row = wp + (size_t)(lut_pair_row(n, H) * K);  // stored row n is output row lut_pair_row(n)
        dequant_row(n, buf.data());
        std::memcpy(row, buf.data(), (size_t)K * sizeof(float));
        for_outliers(n, [&](int32_t k, float v) { row[k] += v; });
      }
    });
    matmul(y, x, w, nullptr);
    return;
  }

  // x in f32, each row padded with zeros to Kp (the dequantized rows are zero there as well), so
  // the dot products run over whole vectors
  const int64_t Kp = L.Kp;
  std::vector<float> xf((size_t)(M * Kp), 0.f);
  for (int64_t m = 0; m < M; ++m)
    convert_to_float(static_cast<const char*>(x.data()) + (size_t)(m * K) * dtype_size(x.dtype), x.dtype, &xf[(size_t)(m * Kp)], (size_t)K);
  parallel_for(N, 4, [&](int64_t nb, int64_t ne) {
    std::vector<float> w((size_t)Kp);
    std::vector<float> acc((size_t)M);
    for (int64_t n = nb; n < ne; ++n) {
      if (rows_dot && M <= 16) {  // its accumulators hold 16 rows; more only where the dense copy would be too big
        float t[16];
        row_table(n, t);
        rows_dot(L, c, n, t, K, xf.data(), M, Kp, acc.data());
      } else {
        dequant_row(n, w.data());
        for (int64_t m = 0; m < M; ++m) acc[(size_t)m] = V.dot(w.data(), &xf[(size_t)(m * Kp)], Kp);
      }
      for_outliers(n, [&](int32_t k, float v) {
        for (int64_t m = 0; m < M; ++m) acc[(size_t)m] += v * xf[(size_t)(m * Kp + k)];
      });
      const int64_t out = lut_pair_row(n, H);
      for (int64_t m = 0; m < M; ++m) store_from_float(y.data(), y.dtype, (size_t)(m * N + out), acc[(size_t)m]);
    }
  });
}

void lut_rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& x, const Tensor& codes,
                     const Tensor& lut, const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, int pair_half,
                     const Tensor& positions, const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens,
                     const Tensor& cu_q, const Tensor* gamma, float eps) {
  Tensor qkv = Tensor::empty(x.dtype, {x.dim(0), lut.dim(0)}, Device{});
  lut_matmul_packed(qkv, x, codes, lut, rows, cols, vals, bits, pair_half, kLutStore, gamma, eps);
  rope_append(q_out, kc, vc, qkv, positions, inv_freq, page_table, seq_lens, cu_q);
}

}  // namespace sqz::cpu
