// Device-side helpers shared by kernel families: fp16/bf16/f32 <-> float conversions,
// 16-byte vector loads and stores, deterministic block reductions, and a switch from a
// runtime DType to a template parameter.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/error.h"
#include "core/tensor.h"

namespace sqz::cuda {

template <class T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as the CPU backend's float_to_half / float_to_bf16.
template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A 16-byte vector of T: N elements moved with one 128-bit load or store.
template <class T> struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[N];
  };
};

template <class T> __device__ __forceinline__ Vec16<T> load16(const T* p) {
  Vec16<T> r;
  r.raw = *reinterpret_cast<const uint4*>(p);
  return r;
}
template <class T> __device__ __forceinline__ void store16(T* p, const Vec16<T>& r) {
  *reinterpret_cast<uint4*>(p) = r.raw;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Sum over the block in a fixed tree (warp shuffles, then one warp over the warp sums):
// the same inputs always give the same bits. Every thread gets the total. `smem` needs
// 32 elements; blockDim.x must be a multiple of 32. Threads may still read smem when the
// first returns: a caller that writes smem itself afterwards needs a barrier first (a next
// block_sum has its own).
template <class V>
__device__ __forceinline__ V block_sum(V v, V* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nw ? smem[lane] : V(0);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Inclusive scan over the lanes of a warp: lane l gets op(v_0, ..., v_l), combined in a fixed
// order (log2(32) shuffle steps). Every lane of the warp calls it.
template <class V, class Op>
__device__ __forceinline__ V warp_inclusive_scan(V v, Op op) {
  const int lane = threadIdx.x & 31;
  for (int o = 1; o < 32; o <<= 1) {
    const V y = __shfl_sync(0xffffffffu, v, lane >= o ? lane - o : lane);
    if (lane >= o) v = op(v, y);
  }
  return v;
}

// Calls f(T{}) with T the CUDA type of a float dtype.
template <class F>
void dispatch_float(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
    default: fail("ERR_DTYPE", std::string(op) + ": unsupported dtype " + dtype_name(dt) + " on CUDA");
  }
}

}  // namespace sqz::cuda
