// Weighted 1-D k-means per row (the SqueezeLLM quantizer) on CUDA.
//
// The CPU reference (csrc/cpu/kmeans.cc) sorts each row once; with the values sorted, every
// k-means segment is a contiguous range, so a Lloyd iteration needs only E-1 binary searches for
// the boundaries and prefix-sum differences for the weighted means. This file does the same:
//   1. the rows of a chunk are sorted by value with CUB's segmented radix sort (stable, so ties
//      keep their original order, as std::stable_sort does), carrying the column index;
//   2. one block per row builds the prefix sums of weight and weight*value over the sorted row
//      (fp64, per-thread contiguous runs and a fixed-order scan of the run totals: deterministic);
//   3. the same block runs the reference's initialisation (weighted quantiles) and iterations
//      (sort centroids, midpoint boundaries with the same tie rule, stop when the boundaries are
//      stable), one thread per centroid;
//   4. codes: nearest centroid in the original order (ties to the lower index).
// No atomics; the only difference from the reference is the association order of the fp64
// prefix sums, which moves a centroid by at most an ulp of fp32 after rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/device/device_segmented_radix_sort.cuh>
#include <algorithm>
#include <cstdint>
#include <string>

#include "core/backend.h"
#include "core/cuda_stream.h"
#include "core/error.h"
#include "kmeans.h"

namespace sqz::cuda {
namespace {

constexpr int THREADS = 256;

__device__ __forceinline__ float load_any(const void* p, int dt, long long i) {
  if (dt == (int)DType::F32) return static_cast<const float*>(p)[i];
  if (dt == (int)DType::F16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// keys[i] = w[r0*K + i] as f32 (when w is not f32 already), idx[i] = i % K, offsets[j] = j*K.
__global__ void prep_kernel(float* keys, int* idx, int* offsets, const void* w, int wdt, long long base, int R, int K) {
  const long long n = (long long)R * K;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    if (keys) keys[i] = load_any(w, wdt, base + i);
    idx[i] = (int)(i % K);
  }
  // Grid-stride as well: the launch caps the grid, and very short rows make R + 1 > grid size.
  for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t <= R; t += (long long)gridDim.x * blockDim.x)
    offsets[t] = (int)(t * K);
}

// First index i in [0, n) with a[i] > x (n when none): std::upper_bound.
template <class T>
__device__ __forceinline__ int upper_bound(const T* a, int n, T x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] > x) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

struct RowArgs {
  float* lut;               // [N, E]
  uint8_t* codes;           // [N, K]
  const void* w;            // [N, K]
  int wdt;
  const void* sens;         // [N, K] or [K]
  int sdt;
  bool shared_sens;
  const float* sorted;      // [R, K] sorted values of the chunk
  const int* order;         // [R, K] their columns
  double* pw;               // [R, K+1]
  double* pwv;              // [R, K+1]
  long long r0;             // first row of the chunk
  int K, E, iters;
};

__global__ void __launch_bounds__(THREADS) row_kernel(RowArgs a) {
  __shared__ double red_w[THREADS], red_v[THREADS];
  __shared__ float cent[256], tmp[256];
  __shared__ int bound[257], prev[257];
  __shared__ int s_done;
  const int tid = threadIdx.x, K = a.K, E = a.E;
  const long long n = a.r0 + blockIdx.x;
  const float* sv = a.sorted + (long long)blockIdx.x * K;
  const int* ord = a.order + (long long)blockIdx.x * K;
  double* pw = a.pw + (long long)blockIdx.x * (K + 1);
  double* pwv = a.pwv + (long long)blockIdx.x * (K + 1);
  const long long soff = a.shared_sens ? 0 : n * K;

  // Total weight (is the row uniformly weighted?): a fixed-shape tree reduction.
  double tot = 0;
  for (int k = tid; k < K; k += THREADS) tot += (double)fmaxf(0.f, load_any(a.sens, a.sdt, soff + k));
  red_w[tid] = tot;
  __syncthreads();
  for (int s = THREADS / 2; s > 0; s >>= 1) {
    if (tid < s) red_w[tid] += red_w[tid + s];
    __syncthreads();
  }
  const bool uniform = !(red_w[0] > 0);
  __syncthreads();

  // Prefix sums over the sorted row: thread t owns ranks [t*run, (t+1)*run).
  const int run = (K + THREADS - 1) / THREADS;
  const int i0 = min(K, tid * run), i1 = min(K, i0 + run);
  double lw = 0, lv = 0;
  for (int i = i0; i < i1; ++i) {
    const double wt = uniform ? 1.0 : (double)fmaxf(0.f, load_any(a.sens, a.sdt, soff + ord[i]));
    lw += wt;
    lv += wt * (double)sv[i];
  }
  red_w[tid] = lw;
  red_v[tid] = lv;
  __syncthreads();
  if (tid == 0) {
    double cw = 0, cv = 0;
    for (int t = 0; t < THREADS; ++t) {
      const double xw = red_w[t], xv = red_v[t];
      red_w[t] = cw;
      red_v[t] = cv;
      cw += xw;
      cv += xv;
    }
    pw[0] = 0;
    pwv[0] = 0;
  }
  __syncthreads();
  {
    double cw = red_w[tid], cv = red_v[tid];
    for (int i = i0; i < i1; ++i) {
      const double wt = uniform ? 1.0 : (double)fmaxf(0.f, load_any(a.sens, a.sdt, soff + ord[i]));
      cw += wt;
      cv += wt * (double)sv[i];
      pw[i + 1] = cw;
      pwv[i + 1] = cv;
    }
  }
  __syncthreads();

  // Weighted quantile initialisation.
  const double W = pw[K];
  if (tid < E) {
    const double target = W * (tid + 0.5) / E;
    int i = upper_bound(pw + 1, K, target);
    i = min(max(i, 0), K - 1);
    cent[tid] = sv[i];
  }
  if (tid <= E) prev[tid] = -1;
  __syncthreads();

  for (int it = 0; it <= a.iters; ++it) {
    // Sort the centroids (rank sort; equal values keep their relative order).
    if (tid < E) {
      const float c = cent[tid];
      int r = 0;
      for (int j = 0; j < E; ++j) r += (cent[j] < c) || (cent[j] == c && j < tid);
      tmp[r] = c;
    }
    __syncthreads();
    if (tid < E) cent[tid] = tmp[tid];
    __syncthreads();
    // Boundaries at the midpoints (ties go low).
    if (tid >= 1 && tid < E) {
      const float mid = 0.5f * (cent[tid - 1] + cent[tid]);
      bound[tid] = upper_bound(sv, K, mid);
    }
    __syncthreads();
    if (tid == 0) {
      bound[0] = 0;
      bound[E] = K;
      for (int e = 1; e < E; ++e)
        if (cent[e - 1] == cent[e]) bound[e] = bound[e - 1];
      bool same = true;
      for (int e = 0; e <= E; ++e) same = same && bound[e] == prev[e];
      s_done = (same || it == a.iters) ? 1 : 0;
      if (!s_done)
        for (int e = 0; e <= E; ++e) prev[e] = bound[e];
    }
    __syncthreads();
    if (s_done) break;
    if (tid < E) {
      const double sw = pw[bound[tid + 1]] - pw[bound[tid]];
      if (sw > 0) cent[tid] = (float)((pwv[bound[tid + 1]] - pwv[bound[tid]]) / sw);
    }
    __syncthreads();
  }

  if (tid < E) a.lut[n * E + tid] = cent[tid];
  for (int k = tid; k < K; k += THREADS) {
    const float x = load_any(a.w, a.wdt, n * K + k);
    int best = 0;
    float bd = fabsf(x - cent[0]);
    for (int e = 1; e < E; ++e) {
      const float d = fabsf(x - cent[e]);
      if (d < bd) {
        bd = d;
        best = e;
      }
    }
    a.codes[n * K + k] = (uint8_t)best;
  }
}

size_t align256(size_t b) { return (b + 255) & ~size_t(255); }

}  // namespace

void kmeans_rows(const Tensor& lut, const Tensor& codes, const Tensor& w, const Tensor& sens, int iters, int device,
                 cudaStream_t stream) {
  const long long N = w.dim(0), K = w.dim(1);
  const int E = (int)lut.dim(1);
  if (E < 2 || E > 256) fail("ERR_SHAPE", "kmeansRows: 2^bits must be in [2, 256]");
  if (K > (1LL << 30)) fail("ERR_SHAPE", "kmeansRows: rows longer than 2^30 are not supported");
  if (N == 0) return;
  if (K == 0) {
    cuda_check(cudaMemsetAsync(lut.data(), 0, lut.nbytes(), stream), "kmeansRows");
    return;
  }
  // Rows per chunk: about 4M weights (bounded by int offsets for the segmented sort).
  const long long R = std::max(1LL, std::min(N, (4LL << 20) / K));
  const bool f32 = w.dtype == DType::F32;
  const size_t items = (size_t)(R * K);
  size_t temp_bytes = 0;
  cuda_check(cub::DeviceSegmentedRadixSort::SortPairs(nullptr, temp_bytes, (const float*)nullptr, (float*)nullptr,
                                                      (const int*)nullptr, (int*)nullptr, (int)items, (int)R,
                                                      (const int*)nullptr, (const int*)nullptr, 0, 32, stream),
             "kmeansRows: sort size");
  const size_t b_keys_in = f32 ? 0 : align256(items * 4), b_keys = align256(items * 4), b_idx = align256(items * 4),
               b_off = align256((size_t)(R + 1) * 4), b_pw = align256((size_t)(R * (K + 1)) * 8),
               b_temp = align256(temp_bytes);
  const size_t total = b_keys_in + b_keys + 2 * b_idx + b_off + 2 * b_pw + b_temp;
  char* base = static_cast<char*>(cuda_alloc(device, total));
  char* p = base;
  float* keys_in = f32 ? nullptr : reinterpret_cast<float*>(p);
  p += b_keys_in;
  float* keys = reinterpret_cast<float*>(p);
  p += b_keys;
  int* idx_in = reinterpret_cast<int*>(p);
  p += b_idx;
  int* idx = reinterpret_cast<int*>(p);
  p += b_idx;
  int* offsets = reinterpret_cast<int*>(p);
  p += b_off;
  double* pw = reinterpret_cast<double*>(p);
  p += b_pw;
  double* pwv = reinterpret_cast<double*>(p);
  p += b_pw;
  void* temp = p;
  try {
    for (long long r0 = 0; r0 < N; r0 += R) {
      const int rows = (int)std::min(R, N - r0);
      const long long n_items = (long long)rows * K;
      const unsigned blocks = (unsigned)std::min<long long>(4096, std::max<long long>(ceil_div(n_items, 256), ceil_div(rows + 1, 256)));
      prep_kernel<<<blocks, 256, 0, stream>>>(keys_in, idx_in, offsets, w.data(), (int)w.dtype, r0 * K, rows, (int)K);
      cuda_check(cudaGetLastError(), "kmeansRows: prep");
      const float* kin = f32 ? static_cast<const float*>(w.data()) + r0 * K : keys_in;
      size_t tb = temp_bytes;
      cuda_check(cub::DeviceSegmentedRadixSort::SortPairs(temp, tb, kin, keys, idx_in, idx, (int)n_items, rows, offsets,
                                                          offsets + 1, 0, 32, stream),
                 "kmeansRows: sort");
      RowArgs a;
      a.lut = lut.ptr<float>();
      a.codes = codes.ptr<uint8_t>();
      a.w = w.data();
      a.wdt = (int)w.dtype;
      a.sens = sens.data();
      a.sdt = (int)sens.dtype;
      a.shared_sens = sens.ndim() == 1;
      a.sorted = keys;
      a.order = idx;
      a.pw = pw;
      a.pwv = pwv;
      a.r0 = r0;
      a.K = (int)K;
      a.E = E;
      a.iters = iters;
      row_kernel<<<rows, THREADS, 0, stream>>>(a);
      cuda_check(cudaGetLastError(), "kmeansRows: rows");
    }
  } catch (...) {
    cuda_free(device, base, total);
    throw;
  }
  // The pool hands this block out again only to work queued later on the same stream.
  cuda_free(device, base, total);
}

}  // namespace sqz::cuda
