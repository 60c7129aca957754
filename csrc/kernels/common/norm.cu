// RMSNorm and the fused residual add + RMSNorm: one block per row, fp32 sum of squares
// reduced in a fixed tree (deterministic), 16-byte vectors when the row allows.
#include <algorithm>

#include "kernels/common/pdl.cuh"
#include "common.h"
#include "core/cuda_stream.h"
#include "dtype_cuda.cuh"

namespace sqz::cuda {
namespace {

// ADD: res += x (rounded to T and stored), then normalise res. Else normalise x. Each
// element is read and written by the same thread in both passes, so out may alias x or
// res.
template <class T, bool VEC, bool ADD>
__global__ void rms_norm_kernel(T* out, T* res, const T* x, const T* __restrict__ w, int64_t h, float eps) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  __shared__ float red[32];
  const int64_t off = (int64_t)blockIdx.x * h;
  const T* src = ADD ? res + off : x + off;
  float ss = 0.f;
  if (VEC) {
    constexpr int N = Vec16<T>::N;
    for (int64_t i = threadIdx.x; i < h / N; i += blockDim.x) {
      Vec16<T> v = load16(src + i * N);
      if (ADD) {
        const Vec16<T> a = load16(x + off + i * N);
#pragma unroll
        for (int k = 0; k < N; ++k) v.v[k] = from_f32<T>(to_f32(v.v[k]) + to_f32(a.v[k]));
        store16(res + off + i * N, v);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float f = to_f32(v.v[k]);
        ss += f * f;
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      T v = src[i];
      if (ADD) {
        v = from_f32<T>(to_f32(v) + to_f32(x[off + i]));
        res[off + i] = v;
      }
      const float f = to_f32(v);
      ss += f * f;
    }
  }
  ss = block_sum(ss, red);
  const float inv = 1.0f / sqrtf(ss / (float)h + eps);
  if (VEC) {
    constexpr int N = Vec16<T>::N;
    for (int64_t i = threadIdx.x; i < h / N; i += blockDim.x) {
      const Vec16<T> v = load16(src + i * N), g = load16(w + i * N);
      Vec16<T> y;
#pragma unroll
      for (int k = 0; k < N; ++k) y.v[k] = from_f32<T>(to_f32(v.v[k]) * inv * to_f32(g.v[k]));
      store16(out + off + i * N, y);
    }
  } else {
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x)
      out[off + i] = from_f32<T>(to_f32(src[i]) * inv * to_f32(w[i]));
  }
}

template <bool ADD>
void launch(const Tensor& out, const Tensor* res, const Tensor& x, const Tensor& w, float eps, cudaStream_t s) {
  const int64_t h = x.dim(-1), rows = h ? x.numel() / h : 0;
  if (rows == 0) return;
  dispatch_float(x.dtype, ADD ? "addRmsNorm" : "rmsNorm", [&](auto t) {
    using T = decltype(t);
    constexpr int N = Vec16<T>::N;
    T* r = res ? res->ptr<T>() : nullptr;
    const bool vec = h % N == 0 && aligned16(out.data()) && aligned16(x.data()) && aligned16(w.data()) &&
                     (!res || aligned16(res->data()));
    const int64_t items = vec ? h / N : h;
    const int threads = (int)std::min<int64_t>(1024, std::max<int64_t>(32, (items + 31) / 32 * 32));
    if (vec)
      launch_pdl(rms_norm_kernel<T, true, ADD>, dim3((unsigned)rows), dim3(threads), 0, s, out.ptr<T>(), r, x.ptr<T>(), w.ptr<T>(), h, eps);
    else
      launch_pdl(rms_norm_kernel<T, false, ADD>, dim3((unsigned)rows), dim3(threads), 0, s, out.ptr<T>(), r, x.ptr<T>(), w.ptr<T>(), h, eps);
  });
}

}  // namespace

void rms_norm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps, cudaStream_t s) {
  launch<false>(out, nullptr, x, weight, eps, s);
}

void add_rms_norm(const Tensor& residual, const Tensor& x, const Tensor& out, const Tensor& weight, float eps,
                  cudaStream_t s) {
  launch<true>(out, &residual, x, weight, eps, s);
}

}  // namespace sqz::cuda
