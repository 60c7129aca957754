// Shared device helpers of the attention kernels: 8-wide fp16/bf16 <-> f32 conversion,
// cp.async with zero fill, ldmatrix and the m16n8k16 tensor-core product.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/common/ptx.cuh"

namespace sqz::cuda::attn {

// Everything a kernel needs about one call. Index tensors live in device memory so a
// captured graph can replay with new lengths and page tables.
struct Params {
  void* out;
  const void* q;
  const void* kc;
  const void* vc;
  const int* page_table;  // [B, max_pages]
  const int* seq_lens;    // [B]
  const int* cu_q;        // [B + 1]
  int B, Hq, Hkv, D;
  int pages, page_size, max_pages, page_shift;  // page_shift >= 0 when page_size is a power of two
  float scale_log2;                             // softmax scale * log2(e): scores live in base 2
  int max_q;
  // decode only
  int splits, chunk, qchunks;  // chunk: the fewest tokens a split takes (see split_tokens)
  float* ws_acc;  // [B * max_q * Hq, splits, D]
  float* ws_ml;   // [B * max_q * Hq, splits, 2] (max in base 2, sum)
  // [B * Hkv * qchunks] arrival counters, zero between launches; null: a separate combine kernel
  int* counters;
};

// Logical token t of sequence b -> its page, or -1 when the page table cannot hold it or
// names a page outside the pool (such keys are ignored, never read).
__device__ __forceinline__ int page_of(const Params& p, int b, int t) {
  int blk = p.page_shift >= 0 ? (t >> p.page_shift) : t / p.page_size;
  if (blk >= p.max_pages) return -1;
  int page = __ldg(p.page_table + (int64_t)b * p.max_pages + blk);
  return (page >= 0 && page < p.pages) ? page : -1;
}

// Element offset of (page, token-in-page, kv head) in a cache [pages, P, Hkv, D].
__device__ __forceinline__ int64_t cache_offset(const Params& p, int page, int t, int kvh) {
  int slot = p.page_shift >= 0 ? (t & (p.page_size - 1)) : t % p.page_size;
  return (((int64_t)page * p.page_size + slot) * p.Hkv + kvh) * p.D;
}

template <class T> struct Traits;
template <> struct Traits<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ float2 to_f2(T2 v) { return __half22float2(v); }
  static __device__ __forceinline__ T2 from_f2(float a, float b) { return __floats2half2_rn(a, b); }
};
template <> struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_f2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ T2 from_f2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// 16 bytes = 8 elements -> 8 floats.
template <class T>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  using T2 = typename Traits<T>::T2;
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    T2 h = *reinterpret_cast<const T2*>(&w[i]);
    float2 v = Traits<T>::to_f2(h);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

template <class T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  typename Traits<T>::T2 h = Traits<T>::from_f2(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// ld_stream (K/V are streamed once, kept out of L1), cp.async and ldmatrix: common/ptx.cuh.

// One online-softmax step (base 2) over a tile of m16n8 score fragments, shared by the
// tensor-core prefill and decode kernels. s[nb][e] holds this tile's masked scores (-inf where
// masked) of row e >> 1 (the fragment's rows g and g + 8); a row's 4 lanes (a quad) hold its
// keys. Updates the running max m and sum l of both rows, rescales the accumulators o, and
// leaves the probabilities exp2(s - max) in s for the P V product.
template <int NB, int ND>
__device__ __forceinline__ void online_softmax_tile(float (&s)[NB][4], float (&m)[2], float (&l)[2],
                                                    float (&o)[ND][4]) {
  float ref[2], alpha[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * rr], s[nb][2 * rr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn = fmaxf(m[rr], mx);
    ref[rr] = mn == -INFINITY ? 0.f : mn;  // nothing visible yet: stay at zero, no NaN
    alpha[rr] = exp2f(m[rr] - ref[rr]);
    m[rr] = mn;
    l[rr] *= alpha[rr];
  }
  // Rescale the accumulators only when some row's max grew (after the first tiles it rarely
  // does): a warp-uniform branch instead of D/2 multiplies per tile; skipping a product by 1
  // changes no bit.
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
      o[nd][0] *= alpha[0];
      o[nd][1] *= alpha[0];
      o[nd][2] *= alpha[1];
      o[nd][3] *= alpha[1];
    }
  }
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float pv = exp2f(s[nb][e] - ref[e >> 1]);
      s[nb][e] = pv;
      l[e >> 1] += pv;
    }
}

// D(16x8, f32) += A(16x16) * B(16x8).
// (ptx.cuh's mma_16816 with the A fragment as one array.)
template <class T> struct Mma {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_16816<T>(d, a[0], a[1], a[2], a[3], b0, b1);
  }
};

}  // namespace sqz::cuda::attn
