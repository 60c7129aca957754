// LUT GEMV / GEMM for SqueezeLLM weights.
//
// The kernels read the interchange layout as is: qweight [Kp*b/32, N] packs the codes of output
// column n along K, so a warp whose lanes own 32 consecutive output columns reads one 128-byte
// line per packed word row (fully coalesced), and each lane decodes its column's codes in
// registers. Each block loads the tables of its 32 (GEMV) or 64 (GEMM) columns into shared
// memory, transposed so that lane l's lookups hit bank l (conflict-free for any codes).
//
// GEMV (M <= 8): block = 32 columns x 16 warps; warp w walks the 32-code groups w, w+16, ...
// keeping several groups of words in flight; x is read with warp-broadcast 16-byte loads; each
// code is decoded and looked up once and applied to all M rows. Outliers of column n are split
// over the 16 warps (j = rows[n] + w, + 16, ...). Partial sums are reduced across warps in a fixed
// order through shared memory: deterministic, no atomics.
//
// GEMM (M > 8): 64x64 output tiles, K in steps of one 32-code group: codes are dequantized into
// shared memory as the activation dtype and multiplied with wmma (fp32 accumulation); the
// epilogue adds outliers and converts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "core/cuda_stream.h"
#include "core/error.h"
#include "lut_gemm.h"

namespace sqz::cuda {
namespace {

template <class T> struct Cvt;
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    __half2 h;
    memcpy(&h, &u, 4);
    return __half22float2(h);
  }
  static __device__ __forceinline__ __half t(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    __nv_bfloat162 h;
    memcpy(&h, &u, 4);
    return __bfloat1622float2(h);
  }
  static __device__ __forceinline__ __nv_bfloat16 t(float v) { return __float2bfloat16_rn(v); }
};

// Guarded reads in this file are plain loads, never __ldg: __ldg is a non-volatile asm statement
// that the compiler treats as side-effect free and may hoist above its guard (out of a loop whose
// trip count is zero), turning "no outliers" (null vals/cols) or a column past N into an
// out-of-bounds read. Plain loads of read-only data still compile to the non-coherent path.
__device__ __forceinline__ float load_f(const void* p, bool is_f32, long long i) {
  if (is_f32) return static_cast<const float*>(p)[i];
  return __half2float(static_cast<const __half*>(p)[i]);
}

// Code i (compile-time after unrolling) of a 32-code group held in BITS words.
template <int BITS>
__device__ __forceinline__ uint32_t code_of(const uint32_t* w, int i) {
  if (BITS == 4) return (w[i >> 3] >> ((i & 7) * 4)) & 15u;
  const int bit = 3 * i, word = bit >> 5, off = bit & 31;
  if (off > 29) return __funnelshift_r(w[word], w[word + 1], off) & 7u;
  return (w[word] >> off) & 7u;
}

// 8 activations x[k .. k+8) as floats; zero beyond K. vec: row base 16-byte aligned and K % 8 == 0.
template <class T>
__device__ __forceinline__ void load_x8(const T* xr, int k, int K, bool vec, float* out) {
  if (vec) {
    if (k < K) {
      const uint4 u = *reinterpret_cast<const uint4*>(xr + k);
      float2 a = Cvt<T>::f2(u.x), b = Cvt<T>::f2(u.y), c = Cvt<T>::f2(u.z), d = Cvt<T>::f2(u.w);
      out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
      out[4] = c.x; out[5] = c.y; out[6] = d.x; out[7] = d.y;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = (k + i < K) ? Cvt<T>::f(xr[k + i]) : 0.f;
  }
}

constexpr int GEMV_WARPS = 16;

template <class T, int BITS, int MT>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    lut_gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const uint32_t* __restrict__ q,
                    const void* __restrict__ lut, bool lut_f32, const int* __restrict__ rows,
                    const int* __restrict__ cols, const void* __restrict__ vals, bool vals_f32, int M, int N,
                    int K, bool vec) {
  constexpr int E = 1 << BITS;
  constexpr int GEMV_UNROLL = MT >= 8 ? 2 : 4;  // groups of words in flight per thread
  __shared__ float lut_s[E][32];
  __shared__ float red[GEMV_WARPS][MT][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int n0 = blockIdx.x * 32, n = n0 + lane;
  const bool valid = n < N;

  for (int i = threadIdx.x; i < E * 32; i += blockDim.x) {
    const int e = i >> 5, c = i & 31;
    lut_s[e][c] = (n0 + c < N) ? load_f(lut, lut_f32, (long long)(n0 + c) * E + e) : 0.f;
  }
  __syncthreads();

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  const int groups = (K + 31) >> 5;
  for (int g0 = w; g0 < groups; g0 += GEMV_WARPS * GEMV_UNROLL) {
    uint32_t qw[GEMV_UNROLL][BITS];
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) {
      const int g = g0 + u * GEMV_WARPS;
#pragma unroll
      for (int b = 0; b < BITS; ++b)
        qw[u][b] = (valid && g < groups) ? q[(size_t)(g * BITS + b) * N + n] : 0u;
    }
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) {
      const int g = g0 + u * GEMV_WARPS;
      if (g >= groups) break;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float wv[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) wv[i] = lut_s[code_of<BITS>(qw[u], c * 8 + i)][lane];
        const int k = g * 32 + c * 8;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            float xv[8];
            load_x8<T>(x + (size_t)m * K, k, K, vec, xv);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[m] = fmaf(wv[i], xv[i], acc[m]);
          }
        }
      }
    }
  }

  if (rows != nullptr && valid) {
    const int b = rows[n], e = rows[n + 1];
    for (int j = b + w; j < e; j += GEMV_WARPS) {
      const float v = load_f(vals, vals_f32, j);
      const int k = cols[j];
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) acc[m] = fmaf(v, Cvt<T>::f(x[(size_t)m * K + k]), acc[m]);
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m) red[w][m][lane] = acc[m];
  __syncthreads();
  for (int t = threadIdx.x; t < MT * 32; t += blockDim.x) {
    const int m = t >> 5, c = t & 31;
    if (m < M && n0 + c < N) {
      float s = 0.f;
#pragma unroll
      for (int ww = 0; ww < GEMV_WARPS; ++ww) s += red[ww][m][c];
      y[(size_t)m * N + n0 + c] = Cvt<T>::t(s);
    }
  }
}

// ---- GEMM ----
constexpr int BM = 64, BN = 64, BK = 32, LDS = BK + 8, LDC = BN + 4, GEMM_THREADS = 128;

template <class T, int BITS>
__global__ void __launch_bounds__(GEMM_THREADS)
    lut_gemm_kernel(T* __restrict__ y, const T* __restrict__ x, const uint32_t* __restrict__ q,
                    const void* __restrict__ lut, bool lut_f32, const int* __restrict__ rows,
                    const int* __restrict__ cols, const void* __restrict__ vals, bool vals_f32, int M, int N,
                    int K) {
  using namespace nvcuda;
  constexpr int E = 1 << BITS;
  __shared__ __align__(32) T xs[BM][LDS];
  __shared__ __align__(32) T ws[BN][LDS];  // ws[n][k]: B = W^T in column-major order
  __shared__ float lut_s[E][BN];
  __shared__ __align__(32) float cs[BM][LDC];

  const int t = threadIdx.x, warp = t >> 5;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  for (int i = t; i < E * BN; i += GEMM_THREADS) {
    const int e = i / BN, c = i % BN;
    lut_s[e][c] = (n0 + c < N) ? load_f(lut, lut_f32, (long long)(n0 + c) * E + e) : 0.f;
  }

  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int groups = (K + 31) >> 5;
  const int wc = t & (BN - 1), half_ = t >> 6;  // column and which 16 codes of the group
  for (int g = 0; g < groups; ++g) {
    __syncthreads();  // previous tile consumed (and lut_s written on the first pass)
    // activations: 64 rows x 32 k
    for (int i = t; i < BM * BK; i += GEMM_THREADS) {
      const int r = i / BK, kk = i % BK, m = m0 + r, k = g * BK + kk;
      xs[r][kk] = (m < M && k < K) ? x[(size_t)m * K + k] : Cvt<T>::t(0.f);
    }
    // weights: column wc, codes half_*16 .. +16
    {
      uint32_t qw[BITS];
      const bool ok = n0 + wc < N;
#pragma unroll
      for (int b = 0; b < BITS; ++b) qw[b] = ok ? q[(size_t)(g * BITS + b) * N + n0 + wc] : 0u;
      if (half_ == 0) {
#pragma unroll
        for (int ci = 0; ci < 16; ++ci) ws[wc][ci] = Cvt<T>::t(lut_s[code_of<BITS>(qw, ci)][wc]);
      } else {
#pragma unroll
        for (int ci = 16; ci < 32; ++ci) ws[wc][ci] = Cvt<T>::t(lut_s[code_of<BITS>(qw, ci)][wc]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &xs[wm + i * 16][ks], LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &ws[wn + j * 16][ks], LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&cs[wm + i * 16][wn + j * 16], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();

  // epilogue: thread owns column wc and rows half_, half_ + 2, ...
  const int n = n0 + wc;
  if (n >= N) return;
  int ob = 0, oe = 0;
  if (rows != nullptr) { ob = rows[n]; oe = rows[n + 1]; }
  for (int r = half_; r < BM; r += 2) {
    const int m = m0 + r;
    if (m >= M) break;
    float s = cs[r][wc];
    for (int j = ob; j < oe; ++j) s = fmaf(load_f(vals, vals_f32, j), Cvt<T>::f(x[(size_t)m * K + cols[j]]), s);
    y[(size_t)m * N + n] = Cvt<T>::t(s);
  }
}

template <class T, int BITS>
void launch(const Tensor& y, const Tensor& x, const Tensor& qw, const Tensor& lut, const Tensor* rows,
            const Tensor* cols, const Tensor* vals, cudaStream_t st) {
  const int M = (int)x.dim(0), K = (int)x.dim(1), N = (int)y.dim(1);
  if (M == 0 || N == 0) return;
  T* yp = y.ptr<T>();
  const T* xp = x.ptr<T>();
  const uint32_t* qp = qw.ptr<uint32_t>();
  const bool lf = lut.dtype == DType::F32;
  const int* rp = rows ? rows->ptr<int>() : nullptr;
  const int* cp = cols ? cols->ptr<int>() : nullptr;
  const void* vp = vals ? vals->data() : nullptr;
  const bool vf = vals && vals->dtype == DType::F32;
  if (M <= 8) {
    const bool vec = (K % 8 == 0) && (reinterpret_cast<uintptr_t>(xp) % 16 == 0);
    dim3 grid(ceil_div(N, 32)), block(GEMV_WARPS * 32);
#define SQZ_GEMV(MT) \
  lut_gemv_kernel<T, BITS, MT><<<grid, block, 0, st>>>(yp, xp, qp, lut.data(), lf, rp, cp, vp, vf, M, N, K, vec)
    if (M == 1) SQZ_GEMV(1);
    else if (M == 2) SQZ_GEMV(2);
    else if (M <= 4) SQZ_GEMV(4);
    else SQZ_GEMV(8);
#undef SQZ_GEMV
  } else {
    dim3 grid(ceil_div(N, BN), ceil_div(M, BM)), block(GEMM_THREADS);
    lut_gemm_kernel<T, BITS><<<grid, block, 0, st>>>(yp, xp, qp, lut.data(), lf, rp, cp, vp, vf, M, N, K);
  }
}

}  // namespace

void lut_matmul(const Tensor& y, const Tensor& x, const Tensor& qweight, const Tensor& lut,
                const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, cudaStream_t stream) {
  const bool bf = x.dtype == DType::BF16;
  if (bits == 4) {
    if (bf) launch<__nv_bfloat16, 4>(y, x, qweight, lut, rows, cols, vals, stream);
    else launch<__half, 4>(y, x, qweight, lut, rows, cols, vals, stream);
  } else if (bits == 3) {
    if (bf) launch<__nv_bfloat16, 3>(y, x, qweight, lut, rows, cols, vals, stream);
    else launch<__half, 3>(y, x, qweight, lut, rows, cols, vals, stream);
  } else {
    fail("ERR_UNSUPPORTED", "lutMatmul: bits must be 3 or 4");
  }
}

}  // namespace sqz::cuda
