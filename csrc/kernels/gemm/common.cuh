// Small device helpers shared by the dense GEMV and GEMM kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/ptx.cuh"

namespace sqz::cuda::gemm_detail {

template <class T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Two packed halves (one 32-bit word) to two floats.
template <class T> __device__ __forceinline__ float2 pair_to_f2(uint32_t u);
template <> __device__ __forceinline__ float2 pair_to_f2<__half>(uint32_t u) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  return __half22float2(h);
}
template <> __device__ __forceinline__ float2 pair_to_f2<__nv_bfloat16>(uint32_t u) {
  // bf16 -> f32 is a shift: exact and cheaper than the intrinsic round trip.
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

// ld_stream (weights are streamed once) comes from common/ptx.cuh.

// Activations: read-only for the kernel's lifetime and reread by many warps, so they go
// through L1. volatile keeps the load where it is written: issued with the weight loads of the
// same round, not sunk next to its first use (where its latency would be exposed).
__device__ __forceinline__ uint4 ld_act(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// Stream-K splits (gemv_bulk.cuh, gemv_tma.cuh): block b takes units [I·b/B, I·(b+1)/B) of I (B <= I,
// so every range is non-empty); the block whose range holds unit i.
__device__ __forceinline__ int split_block_of(long long i, long long I, long long B) { return (int)(((i + 1) * B - 1) / I); }

// One 32-k chunk of the tensor-core GEMVs (gemv_tc.cuh, gemv_bulk.cuh) in their permuted k order:
// lane (g, t) holds k = 8t..8t+7 of activation rows g (xa) and g+8 (xb) and of weight row g of an
// 8-row tile (w); elements 0-3 feed one m16n8k16 product and 4-7 the other. A and B are permuted
// alike, so c gains the plain dot products.
template <class T>
__device__ __forceinline__ void mma_chunk32(float (&c)[4], const uint4& xa, const uint4& xb, const uint4& w) {
  mma_16816<T>(c, xa.x, xb.x, xa.y, xb.y, w.x, w.y);
  mma_16816<T>(c, xa.z, xb.z, xa.w, xb.w, w.z, w.w);
}

}  // namespace sqz::cuda::gemm_detail
