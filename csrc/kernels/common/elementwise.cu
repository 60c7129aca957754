// Flat elementwise kernels (add, cast, siluMul, fills) as grid-stride loops with 16-byte
// vectors where every pointer is aligned and a scalar loop for the tail; row gathers for
// embedding and gatherRows as aligned word copies.
#include <algorithm>
#include <cstdint>

#include "kernels/common/pdl.cuh"
#include "common.h"
#include "core/cuda_stream.h"
#include "dtype_cuda.cuh"
#include "random.h"
#include "silu.cuh"

namespace sqz::cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t work) { return (unsigned)std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 8192)); }

// out[i] = a[i] + b[ROW ? i % h : i]: with ROW, b is one row of h elements added to every row of a
// (a bias), and with VEC h is a multiple of the vector width, so a vector never straddles two
// rows. out may alias a or b: each element is read and written by the same thread.
template <class T, bool VEC, bool ROW>
__global__ void add_kernel(T* __restrict__ out, const T* a, const T* b, int64_t n, int64_t h) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x, tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (VEC) {
    constexpr int N = Vec16<T>::N;
    const int64_t nv = n / N;
    for (int64_t i = tid; i < nv; i += stride) {
      Vec16<T> x = load16(a + i * N), y = load16(b + (ROW ? (i * N) % h : i * N)), z;
#pragma unroll
      for (int k = 0; k < N; ++k) z.v[k] = from_f32<T>(to_f32(x.v[k]) + to_f32(y.v[k]));
      store16(out + i * N, z);
    }
    done = nv * N;
  }
  for (int64_t i = done + tid; i < n; i += stride) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[ROW ? i % h : i]));
}

template <class Ti, class To>
__global__ void cast_kernel(To* __restrict__ out, const Ti* __restrict__ x, int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = from_f32<To>(to_f32(x[i]));
}

// out[r, j] = silu(g[r, j]) * g[r, I + j] over rows of 2I; VEC when I is a multiple of the
// vector width and the pointers are aligned.
template <class T, bool VEC>
__global__ void silu_mul_kernel(T* __restrict__ out, const T* __restrict__ gu, int64_t rows, int64_t inter) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  const int64_t stride = (int64_t)gridDim.x * blockDim.x, tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (VEC) {
    constexpr int N = Vec16<T>::N;
    const int64_t per_row = inter / N, nv = rows * per_row;
    for (int64_t i = tid; i < nv; i += stride) {
      const int64_t r = i / per_row, c = (i - r * per_row) * N;
      const T* g = gu + r * 2 * inter + c;
      Vec16<T> x = load16(g), y = load16(g + inter), z;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float a = to_f32(x.v[k]);
        z.v[k] = from_f32<T>(silu_f(a) * to_f32(y.v[k]));
      }
      store16(out + r * inter + c, z);
    }
  } else {
    const int64_t n = rows * inter;
    for (int64_t i = tid; i < n; i += stride) {
      const int64_t r = i / inter, c = i - r * inter;
      const float a = to_f32(gu[r * 2 * inter + c]);
      out[i] = from_f32<T>(silu_f(a) * to_f32(gu[r * 2 * inter + inter + c]));
    }
  }
}

template <class W>
__global__ void fill_kernel(W* __restrict__ p, W v, int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = v;
}

template <class T>
__global__ void fill_random_kernel(T* __restrict__ p, int64_t n, uint64_t seed, float mean, float sd) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint64_t h = rnd::hash2(seed, (uint64_t)i);
    const float u1 = rnd::uniform24_open0(h), u2 = rnd::uniform24(h);
    // Precise logf/cosf (not the fast intrinsics) to stay within an ulp of the CPU.
    const float z = sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
    p[i] = from_f32<T>(__fadd_rn(mean, __fmul_rn(sd, z)));  // no fma: the CPU rounds twice
  }
}

template <class W>
__global__ void fill_random_int_kernel(W* __restrict__ p, int64_t n, uint64_t seed) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint64_t h = rnd::hash2(seed, (uint64_t)i);
    p[i] = sizeof(W) == 4 ? (W)(uint32_t)(h >> 32) : (W)(uint8_t)(h >> 56);
  }
}

// One block per output row; W-byte words (W divides the row bytes and both row starts are
// W-aligned). An index outside [0, rows) writes zeros.
template <class W>
__global__ void gather_kernel(char* __restrict__ out, const char* __restrict__ src, const int* __restrict__ idx,
                              int64_t src_rows, int64_t row_bytes) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  const int64_t r = idx[blockIdx.x];
  W* o = reinterpret_cast<W*>(out + (int64_t)blockIdx.x * row_bytes);
  const int64_t nw = row_bytes / (int64_t)sizeof(W);
  if (r < 0 || r >= src_rows) {
    W z;
    memset(&z, 0, sizeof(W));
    for (int64_t i = threadIdx.x; i < nw; i += blockDim.x) o[i] = z;
    return;
  }
  const W* s = reinterpret_cast<const W*>(src + r * row_bytes);
  for (int64_t i = threadIdx.x; i < nw; i += blockDim.x) o[i] = s[i];
}

template <class Ti, class To>
__global__ void gather_cast_kernel(To* __restrict__ out, const Ti* __restrict__ src, const int* __restrict__ idx,
                                   int64_t src_rows, int64_t h) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  const int64_t r = idx[blockIdx.x];
  To* o = out + (int64_t)blockIdx.x * h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x)
    o[i] = (r < 0 || r >= src_rows) ? from_f32<To>(0.f) : from_f32<To>(to_f32(src[r * h + i]));
}

}  // namespace

void add(const Tensor& out, const Tensor& a, const Tensor& b, cudaStream_t s) {
  const int64_t n = out.numel();
  if (n == 0) return;
  dispatch_float(out.dtype, "add", [&](auto t) {
    using T = decltype(t);
    const int64_t h = b.numel();  // n, or one row added to every row
    const bool row = h != n;
    const bool vec = aligned16(out.data()) && aligned16(a.data()) && aligned16(b.data()) && (!row || h % Vec16<T>::N == 0);
    const unsigned g = grid_for(vec ? n / Vec16<T>::N + 1 : n);
    auto launch = [&](auto kernel) {
      launch_plain(kernel, dim3(g), dim3(kThreads), 0, s, out.ptr<T>(), a.ptr<T>(), b.ptr<T>(), n, h);
    };
    if (vec && row) launch(add_kernel<T, true, true>);
    else if (vec) launch(add_kernel<T, true, false>);
    else if (row) launch(add_kernel<T, false, true>);
    else launch(add_kernel<T, false, false>);
  });
}

void cast(const Tensor& out, const Tensor& x, cudaStream_t s) {
  const int64_t n = out.numel();
  if (n == 0) return;
  dispatch_float(x.dtype, "cast", [&](auto ti) {
    dispatch_float(out.dtype, "cast", [&](auto to) {
      using Ti = decltype(ti);
      using To = decltype(to);
      launch_plain(cast_kernel<Ti, To>, dim3(grid_for(n)), dim3(kThreads), 0, s, out.ptr<To>(), x.ptr<Ti>(), n);
    });
  });
}

void silu_mul(const Tensor& out, const Tensor& gate_up, cudaStream_t s) {
  const int64_t inter = out.dim(-1), rows = inter ? out.numel() / inter : 0;
  if (rows == 0 || inter == 0) return;
  dispatch_float(out.dtype, "siluMul", [&](auto t) {
    using T = decltype(t);
    constexpr int N = Vec16<T>::N;
    const bool vec = inter % N == 0 && aligned16(out.data()) && aligned16(gate_up.data());
    const unsigned g = grid_for(vec ? rows * inter / N : rows * inter);
    if (vec) launch_pdl(silu_mul_kernel<T, true>, dim3(g), dim3(kThreads), 0, s, out.ptr<T>(), gate_up.ptr<T>(), rows, inter);
    else launch_pdl(silu_mul_kernel<T, false>, dim3(g), dim3(kThreads), 0, s, out.ptr<T>(), gate_up.ptr<T>(), rows, inter);
  });
}

void fill(const Tensor& t, double value, cudaStream_t s) {
  const int64_t n = t.numel();
  if (n == 0) return;
  const unsigned g = grid_for(n);
  const dim3 grid(g), block(kThreads);
  switch (t.dtype) {
    case DType::F32: launch_plain(fill_kernel<float>, grid, block, 0, s, t.ptr<float>(), (float)value, n); break;
    case DType::F16: launch_plain(fill_kernel<uint16_t>, grid, block, 0, s, t.ptr<uint16_t>(), float_to_half((float)value), n); break;
    case DType::BF16: launch_plain(fill_kernel<uint16_t>, grid, block, 0, s, t.ptr<uint16_t>(), float_to_bf16((float)value), n); break;
    case DType::I32: launch_plain(fill_kernel<int32_t>, grid, block, 0, s, t.ptr<int32_t>(), (int32_t)value, n); break;
    case DType::U32: launch_plain(fill_kernel<uint32_t>, grid, block, 0, s, t.ptr<uint32_t>(), (uint32_t)value, n); break;
    case DType::I8: launch_plain(fill_kernel<int8_t>, grid, block, 0, s, t.ptr<int8_t>(), (int8_t)value, n); break;
    case DType::U8: launch_plain(fill_kernel<uint8_t>, grid, block, 0, s, t.ptr<uint8_t>(), (uint8_t)value, n); break;
  }
}

void fill_random(const Tensor& t, uint64_t seed, float mean, float std, cudaStream_t s) {
  const int64_t n = t.numel();
  if (n == 0) return;
  dispatch_float(t.dtype, "fillRandom", [&](auto tt) {
    using T = decltype(tt);
    launch_plain(fill_random_kernel<T>, dim3(grid_for(n)), dim3(kThreads), 0, s, t.ptr<T>(), n, seed, mean, std);
  });
}

void fill_random_int(const Tensor& t, uint64_t seed, cudaStream_t s) {
  const int64_t n = t.numel();
  if (n == 0) return;
  if (dtype_size(t.dtype) == 4)
    launch_plain(fill_random_int_kernel<uint32_t>, dim3(grid_for(n)), dim3(kThreads), 0, s, t.ptr<uint32_t>(), n, seed);
  else
    launch_plain(fill_random_int_kernel<uint8_t>, dim3(grid_for(n)), dim3(kThreads), 0, s, t.ptr<uint8_t>(), n, seed);
}

void gather_rows(const Tensor& out, const Tensor& src, const Tensor& index, cudaStream_t s) {
  const int64_t n = index.numel(), src_rows = src.dim(0), h = src.dim(1);
  if (n == 0) return;
  if (out.dtype != src.dtype) {
    dispatch_float(src.dtype, "gatherRows", [&](auto ti) {
      dispatch_float(out.dtype, "gatherRows", [&](auto to) {
        using Ti = decltype(ti);
        using To = decltype(to);
        launch_pdl(gather_cast_kernel<Ti, To>, dim3((unsigned)n), dim3(kThreads), 0, s, out.ptr<To>(), src.ptr<Ti>(), index.ptr<int>(), src_rows, h);
      });
    });
    return;
  }
  const int64_t row_bytes = h * (int64_t)dtype_size(src.dtype);
  if (row_bytes == 0) return;
  const uintptr_t al = reinterpret_cast<uintptr_t>(out.data()) | reinterpret_cast<uintptr_t>(src.data()) | (uintptr_t)row_bytes;
  char* o = static_cast<char*>(out.data());
  const char* sp = static_cast<const char*>(src.data());
  const int* id = index.ptr<int>();
  if ((al & 15) == 0) launch_pdl(gather_kernel<uint4>, dim3((unsigned)n), dim3(kThreads), 0, s, o, sp, id, src_rows, row_bytes);
  else if ((al & 3) == 0) launch_pdl(gather_kernel<uint32_t>, dim3((unsigned)n), dim3(kThreads), 0, s, o, sp, id, src_rows, row_bytes);
  else if ((al & 1) == 0) launch_pdl(gather_kernel<uint16_t>, dim3((unsigned)n), dim3(kThreads), 0, s, o, sp, id, src_rows, row_bytes);
  else launch_pdl(gather_kernel<uint8_t>, dim3((unsigned)n), dim3(kThreads), 0, s, o, sp, id, src_rows, row_bytes);
}

}  // namespace sqz::cuda
