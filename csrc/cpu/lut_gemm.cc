#include "lut_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../core/error.h"
#include "../core/parallel.h"
#include "gemm.h"

namespace sqz::cpu {

namespace {

// lut_matmul_packed from this many rows of x on: the weight dequantized once, then the blocked
// matmul (gemm.cc), where that f32 copy takes at most kDenseMaxBytes.
constexpr int64_t kDenseMinM = 16;
constexpr int64_t kDenseMaxBytes = int64_t(512) << 20;

// The 8 codes of (row, quarter q, chunk ch) of a unit as one value: 4-bit 32 bits, 3-bit 24 bits.
inline uint32_t chunk_bits(const uint32_t* w, int bits, int ch) {
  if (bits == 4) return w[ch];
  const int b = ch >> 2, cc = ch & 3;
  if (cc < 3) return w[3 * b + cc] & 0xffffffu;
  return (w[3 * b] >> 24) | ((w[3 * b + 1] >> 24) << 8) | ((w[3 * b + 2] >> 24) << 16);
}

}  // namespace

uint32_t LutPacked::get(const uint32_t* c, int64_t n, int64_t k) const {
  const int64_t u = k / KU, kk = k % KU;
  const int ch = (int)(kk / 32), q = (int)((kk % 32) / 8), j = (int)(kk % 8);
  uint32_t w[12];
  for (int i = 0; i < WU; ++i) w[i] = c[word(n, u, q, i)];
  return (chunk_bits(w, bits, ch) >> (bits * j)) & ((1u << bits) - 1);
}

void LutPacked::put(uint32_t* c, int64_t n, int64_t k, uint32_t code) const {
  const int64_t u = k / KU, kk = k % KU;
  const int ch = (int)(kk / 32), q = (int)((kk % 32) / 8), j = (int)(kk % 8);
  if (bits == 4) {
    c[word(n, u, q, ch)] |= code << (4 * j);
    return;
  }
  const int b = ch >> 2, cc = ch & 3, p = 3 * j;
  if (cc < 3) {
    c[word(n, u, q, 3 * b + cc)] |= code << p;
    return;
  }
  for (int s = 0; s < 3; ++s)
    if ((code >> s) & 1u) {
      const int bit = p + s;
      c[word(n, u, q, 3 * b + bit / 8)] |= 1u << (24 + bit % 8);
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
                       const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits) {
  const int64_t M = x.dim(0), K = x.dim(1), N = y.dim(1);
  const LutPacked L(bits, N, K);
  const int E = 1 << bits;
  const uint32_t mask = (uint32_t)E - 1;
  const uint32_t* c = codes.ptr<uint32_t>();

  std::vector<float> lf((size_t)(N * E));
  convert_to_float(lut.data(), lut.dtype, lf.data(), lf.size());
  // The products use the table entries in the activation dtype, as the CUDA kernels do (their
  // tensor cores multiply two values of one type: an f16 table with bf16 activations loses 3 bits
  // of each entry there); outliers are added in fp32 by both.
  if (x.dtype == DType::F16)
    for (float& v : lf) v = half_to_float(float_to_half(v));
  else if (x.dtype == DType::BF16)
    for (float& v : lf) v = bf16_to_float(float_to_bf16(v));

  const int32_t* rp = rows ? rows->ptr<int32_t>() : nullptr;
  const int32_t* cp = cols ? cols->ptr<int32_t>() : nullptr;
  const int64_t nnz = cols ? cols->numel() : 0;
  const int chunks = (int)(L.KU / 32);
  // Row n's weights (table entries) into dst[0, K).
  auto dequant_row = [&](int64_t n, float* dst) {
    const float* l = &lf[(size_t)(n * E)];
    for (int64_t u = 0; u < L.U; ++u)
      for (int q = 0; q < 4; ++q) {
        uint32_t wq[12];
        for (int i = 0; i < L.WU; ++i) wq[i] = c[L.word(n, u, q, i)];
        for (int ch = 0; ch < chunks; ++ch) {
          const int64_t k0 = u * L.KU + 32 * ch + 8 * q, m = std::min<int64_t>(8, K - k0);
          const uint32_t v = chunk_bits(wq, bits, ch);
          for (int j = 0; j < m; ++j) dst[k0 + j] = l[(v >> (bits * j)) & mask];
        }
      }
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
      for (int64_t n = nb; n < ne; ++n) {
        float* row = wp + (size_t)(n * K);
        dequant_row(n, row);
        for_outliers(n, [&](int32_t k, float v) { row[k] += v; });
      }
    });
    matmul(y, x, w, nullptr);
    return;
  }

  std::vector<float> xf((size_t)(M * K));
  convert_to_float(x.data(), x.dtype, xf.data(), xf.size());
  parallel_for(N, 4, [&](int64_t nb, int64_t ne) {
    std::vector<float> w((size_t)K);
    std::vector<float> acc((size_t)M);
    for (int64_t n = nb; n < ne; ++n) {
      dequant_row(n, w.data());
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = &xf[(size_t)(m * K)];
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += w[(size_t)k] * xr[k];
        acc[(size_t)m] = s;
      }
      for_outliers(n, [&](int32_t k, float v) {
        for (int64_t m = 0; m < M; ++m) acc[(size_t)m] += v * xf[(size_t)(m * K + k)];
      });
      for (int64_t m = 0; m < M; ++m) store_from_float(y.data(), y.dtype, (size_t)(m * N + n), acc[(size_t)m]);
    }
  });
}

}  // namespace sqz::cpu
