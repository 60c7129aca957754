// CPU matmul. The CPU backend scores whole sequences with it, so it is blocked and vectorised:
// the work is split into (block of x rows) x (tile of w rows) tasks; a task converts its w
// tile to f32 once and reuses it for every x row of its block, and the inner kernel computes
// a 2x4 patch of outputs so each loaded vector feeds several FMAs. AVX2+FMA code is chosen at
// run time; the portable kernel is plain C++ the compiler can vectorise for the baseline ISA.
#include <cmath>
#include "gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../core/error.h"
#include "../core/parallel.h"

#include "vec.h"

namespace sqz::cpu {
namespace {

constexpr int64_t kBlockM = 128;  // x rows per task (f32 block stays in L2 for K <= 512)
constexpr int64_t kTileN = 32;    // w rows per task (converted once per task)

// out[i][j] = dot(x_i, w_j) for i < 2, j < 4 (rows given by pointers, length K).
using Kernel2x4 = void (*)(const float* const* xr, const float* const* wr, int64_t K, float out[2][4]);

void kernel_portable(const float* const* xr, const float* const* wr, int64_t K, float out[2][4]) {
  // Four independent partial sums per output hide FMA latency and let the compiler vectorise.
  float acc[2][4][4] = {};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4)
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j)
        for (int l = 0; l < 4; ++l) acc[i][j][l] += xr[i][k + l] * wr[j][k + l];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      float s = (acc[i][j][0] + acc[i][j][1]) + (acc[i][j][2] + acc[i][j][3]);
      for (int64_t kk = k; kk < K; ++kk) s += xr[i][kk] * wr[j][kk];
      out[i][j] = s;
    }
}

#ifdef SQZ_X86
using vec::hsum256;

// 8 accumulators + 4 w vectors + 1 x vector = 13 of the 16 ymm registers.
__attribute__((target("avx2,fma"))) void kernel_avx2(const float* const* xr, const float* const* wr, int64_t K,
                                                     float out[2][4]) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  const float *x0 = xr[0], *x1 = xr[1], *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3];
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 b0 = _mm256_loadu_ps(w0 + k), b1 = _mm256_loadu_ps(w1 + k);
    __m256 b2 = _mm256_loadu_ps(w2 + k), b3 = _mm256_loadu_ps(w3 + k);
    __m256 v = _mm256_loadu_ps(x0 + k);
    a00 = _mm256_fmadd_ps(v, b0, a00); a01 = _mm256_fmadd_ps(v, b1, a01);
    a02 = _mm256_fmadd_ps(v, b2, a02); a03 = _mm256_fmadd_ps(v, b3, a03);
    v = _mm256_loadu_ps(x1 + k);
    a10 = _mm256_fmadd_ps(v, b0, a10); a11 = _mm256_fmadd_ps(v, b1, a11);
    a12 = _mm256_fmadd_ps(v, b2, a12); a13 = _mm256_fmadd_ps(v, b3, a13);
  }
  float r[2][4] = {{hsum256(a00), hsum256(a01), hsum256(a02), hsum256(a03)},
                   {hsum256(a10), hsum256(a11), hsum256(a12), hsum256(a13)}};
  for (; k < K; ++k)
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j) r[i][j] += xr[i][k] * wr[j][k];
  std::memcpy(out, r, sizeof r);
}
#endif

// Row conversion to f32. Weights are converted once per task, but with one x row (decode) that
// conversion is most of the work, so f16 uses the F16C instruction where present and bf16 a
// shift loop the compiler vectorises.
void to_f32_portable(const void* src, DType t, float* dst, size_t n) {
  if (t == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (size_t i = 0; i < n; ++i) {
      const uint32_t u = (uint32_t)s[i] << 16;
      std::memcpy(dst + i, &u, 4);
    }
  } else {
    convert_to_float(src, t, dst, n);
  }
}

#ifdef SQZ_X86
__attribute__((target("avx2,f16c"))) void to_f32_f16c(const void* src, DType t, float* dst, size_t n) {
  if (t != DType::F16) return to_f32_portable(src, t, dst, n);
  const uint16_t* s = static_cast<const uint16_t*>(src);
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) dst[i] = half_to_float(s[i]);
}
#endif

using ToF32 = void (*)(const void*, DType, float*, size_t);
ToF32 pick_convert() {
#ifdef SQZ_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return to_f32_f16c;
#endif
  return to_f32_portable;
}

Kernel2x4 pick_kernel() {
#ifdef SQZ_X86
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kernel_avx2;
#endif
  return kernel_portable;
}

}  // namespace

void matmul(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias) {
  static const Kernel2x4 kernel = pick_kernel();
  static const ToF32 to_f32 = pick_convert();
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  if (M == 0 || N == 0) return;

  // x as f32: used in place when it already is, else converted once (every w tile reuses it).
  std::vector<float> xbuf;
  const float* xf = x.ptr<float>();
  if (x.dtype != DType::F32) {
    xbuf.resize((size_t)(M * K));
    parallel_for(M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        to_f32(static_cast<const char*>(x.data()) + (size_t)(m * K) * dtype_size(x.dtype), x.dtype,
               xbuf.data() + m * K, (size_t)K);
    });
    xf = xbuf.data();
  }
  std::vector<float> biasf;
  if (bias) {
    biasf.resize((size_t)N);
    convert_to_float(bias->data(), bias->dtype, biasf.data(), (size_t)N);
  }
  const float* bf = bias ? biasf.data() : nullptr;
  const bool w_f32 = w.dtype == DType::F32;
  const size_t wes = dtype_size(w.dtype);
  const char* wbytes = static_cast<const char*>(w.data());

  const int64_t mb = (M + kBlockM - 1) / kBlockM, nt = (N + kTileN - 1) / kTileN;
  // With few x rows (decode) the tasks are the w tiles alone; split them finer so both cores work.
  parallel_for(mb * nt, 1, [&](int64_t b, int64_t e) {
    std::vector<float> wtile;
    if (!w_f32) wtile.resize((size_t)(kTileN * K));
    for (int64_t t = b; t < e; ++t) {
      const int64_t m0 = (t / nt) * kBlockM, m1 = std::min(M, m0 + kBlockM);
      const int64_t n0 = (t % nt) * kTileN, n1 = std::min(N, n0 + kTileN);
      const float* wt;
      if (w_f32) {
        wt = w.ptr<float>() + n0 * K;
      } else {
        to_f32(wbytes + (size_t)(n0 * K) * wes, w.dtype, wtile.data(), (size_t)((n1 - n0) * K));
        wt = wtile.data();
      }
      for (int64_t n = n0; n < n1; n += 4) {
        const int nj = (int)std::min<int64_t>(4, n1 - n);
        const float* wr[4];
        for (int j = 0; j < 4; ++j) wr[j] = wt + (n - n0 + std::min(j, nj - 1)) * K;  // tails repeat a row
        for (int64_t m = m0; m < m1; m += 2) {
          const int mi = (int)std::min<int64_t>(2, m1 - m);
          const float* xr[2] = {xf + m * K, xf + (m + mi - 1) * K};
          float out[2][4];
          kernel(xr, wr, K, out);
          for (int i = 0; i < mi; ++i)
            for (int j = 0; j < nj; ++j) {
              float v = out[i][j] + (bf ? bf[n + j] : 0.f);
              store_from_float(y.data(), y.dtype, (size_t)((m + i) * N + n + j), v);
            }
        }
      }
    }
  });
}

void fused_linear(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* gamma, float eps,
                  int mode) {
  const int64_t M = x.dim(0), K = x.dim(1), N = w.dim(0);
  if (M == 0 || N == 0) return;
  const Device cpu{};
  Tensor h = Tensor::empty(DType::F32, {M, K}, cpu), z = Tensor::empty(DType::F32, {M, N}, cpu);
  std::vector<float> g;
  if (gamma) {
    g.resize((size_t)K);
    convert_to_float(gamma->data(), gamma->dtype, g.data(), (size_t)K);
  }
  float* hp = h.ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    float* row = hp + m * K;
    convert_to_float(static_cast<const char*>(x.data()) + (size_t)(m * K) * dtype_size(x.dtype), x.dtype, row,
                     (size_t)K);
    if (!gamma) continue;
    double ss = 0;
    for (int64_t k = 0; k < K; ++k) ss += (double)row[k] * row[k];
    const float inv = (float)(1.0 / std::sqrt(ss / (double)K + (double)eps));
    for (int64_t k = 0; k < K; ++k) row[k] = row[k] * g[(size_t)k] * inv;
  }
  matmul(z, h, w, bias);
  const float* zp = z.ptr<float>();
  if (mode == 2) {
    const int64_t P = N / 2;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < P; ++j) {
        const float a = zp[m * N + j], b = zp[m * N + P + j];
        store_from_float(y.data(), y.dtype, (size_t)(m * P + j), a / (1.0f + std::exp(-a)) * b);
      }
    return;
  }
  for (int64_t i = 0; i < M * N; ++i) {
    float v = zp[i];
    if (mode == 1) v += load_as_float(y.data(), y.dtype, (size_t)i);
    store_from_float(y.data(), y.dtype, (size_t)i, v);
  }
}

}  // namespace sqz::cpu
