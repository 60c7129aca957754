#include "lut_gemm.h"

#include <algorithm>
#include <vector>

#include "../core/error.h"
#include "../core/parallel.h"

namespace sqz::cpu {

void lut_matmul(const Tensor& y, const Tensor& x, const Tensor& qweight, const Tensor& lut,
                const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits) {
  const int64_t M = x.dim(0), K = x.dim(1), N = y.dim(1);
  const int64_t groups = (K + 31) / 32, Kp = groups * 32;
  const int E = 1 << bits;
  const uint32_t* q = qweight.ptr<uint32_t>();

  std::vector<float> xf((size_t)(M * K));
  convert_to_float(x.data(), x.dtype, xf.data(), xf.size());
  std::vector<float> lf((size_t)(N * E));
  convert_to_float(lut.data(), lut.dtype, lf.data(), lf.size());

  const int32_t* rp = rows ? rows->ptr<int32_t>() : nullptr;
  const int32_t* cp = cols ? cols->ptr<int32_t>() : nullptr;
  const int64_t nnz = cols ? cols->numel() : 0;

  constexpr int64_t CH = 16;  // output columns dequantized together
  parallel_for((N + CH - 1) / CH, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> w((size_t)(CH * Kp));
    std::vector<float> acc((size_t)(CH * M));
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t n0 = c * CH, nc = std::min(CH, N - n0);
      // Dequantize columns n0..n0+nc into w[j][k] (row-major over k).
      uint32_t gw[4];
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t j = 0; j < nc; ++j) {
          for (int b = 0; b < bits; ++b) gw[b] = q[(g * bits + b) * N + n0 + j];
          const float* l = &lf[(size_t)((n0 + j) * E)];
          float* dst = &w[(size_t)(j * Kp + g * 32)];
          for (int i = 0; i < 32; ++i) dst[i] = l[lut_code(gw, bits, i)];
        }
      for (int64_t j = 0; j < nc; ++j) {
        const float* wr = &w[(size_t)(j * Kp)];
        for (int64_t m = 0; m < M; ++m) {
          const float* xr = &xf[(size_t)(m * K)];
          float s = 0.f;
          for (int64_t k = 0; k < K; ++k) s += wr[k] * xr[k];
          acc[(size_t)(j * M + m)] = s;
        }
        if (rp) {
          const int64_t n = n0 + j;
          // Memory-safe even on unchecked data (the loader checks the CSR once).
          const int64_t b = std::max<int64_t>(0, rp[n]), e = std::min<int64_t>(nnz, rp[n + 1]);
          for (int64_t t = b; t < e; ++t) {
            const int32_t k = cp[t];
            if (k < 0 || k >= K) continue;
            const float v = load_as_float(vals->data(), vals->dtype, (size_t)t);
            for (int64_t m = 0; m < M; ++m) acc[(size_t)(j * M + m)] += v * xf[(size_t)(m * K + k)];
          }
        }
      }
      for (int64_t j = 0; j < nc; ++j)
        for (int64_t m = 0; m < M; ++m) store_from_float(y.data(), y.dtype, (size_t)(m * N + n0 + j), acc[(size_t)(j * M + m)]);
    }
  });
}

}  // namespace sqz::cpu
