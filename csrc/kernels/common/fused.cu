// ropeAppend: rotary embedding of the q and k heads of a packed q|k|v matrix, q into q_out and
// k into the paged key cache, and a copy of the v heads into the value cache, at the slot
// kv_append uses (the sequence found by binary search over cu_q in device memory, so a
// captured graph replays with new batches; rows whose position or page is out of range are
// not stored).
//
// Grid (pieces, rows): one thread per rotation pair (q and k heads) or per 16-byte piece of the
// v heads, so a decode step (one row) spreads over many blocks and every thread has one load
// in flight; a loop over pairs would wait one memory latency per iteration. Each thread
// computes its own angle (fp32 product, precise sincosf, products rounded separately: bit for
// bit what the rope kernel computes).
#include <algorithm>

#include "kernels/common/pdl.cuh"
#include "core/cuda_stream.h"
#include "dtype_cuda.cuh"
#include "fused.h"
#include "rope_append.cuh"

namespace sqz::cuda {
namespace {

// One rotation pair (idx < qk_pairs) or one piece of the v heads of one row.
template <class T>
__device__ __forceinline__ void rope_append_piece(const RopeAppendParams& p, T* __restrict__ q_out, T* __restrict__ kc,
                                                  T* __restrict__ vc, const T* __restrict__ src, int row, int idx,
                                                  int qk_pairs) {
  const int half = p.half, D = 2 * half;
  if (idx < qk_pairs) {
    const int h = idx / half, i = idx - h * half;
    const T* xh = src + (int64_t)h * D;
    float r1, r2;
    rope_rotate(p, row, i, to_f32(xh[i]), to_f32(xh[i + half]), &r1, &r2);
    const T y1 = from_f32<T>(r1), y2 = from_f32<T>(r2);
    T* out;
    if (h < p.Hq) {
      out = q_out + ((int64_t)row * p.Hq + h) * D;
    } else {
      const long long dst = rope_slot_offset(p, row);
      if (dst < 0) return;
      out = kc + dst + (int64_t)(h - p.Hq) * D;
    }
    out[i] = y1;
    out[i + half] = y2;
    return;
  }
  // v heads: 16-byte pieces where the row allows it (D * sizeof(T) % 16 == 0 keeps every head's
  // start aligned given an aligned base), else element by element.
  const int j = idx - qk_pairs, n = p.Hkv * D;
  const T* v = src + (int64_t)(p.Hq + p.Hkv) * D;
  if (p.vec) {
    if (j >= n * (int)sizeof(T) / 16) return;
    const long long dst = rope_slot_offset(p, row);
    if (dst < 0) return;
    reinterpret_cast<uint4*>(vc + dst)[j] = reinterpret_cast<const uint4*>(v)[j];
  } else {
    if (j >= n) return;
    const long long dst = rope_slot_offset(p, row);
    if (dst < 0) return;
    vc[dst + j] = v[j];
  }
}

template <class T>
__global__ void rope_append_kernel(RopeAppendParams p, T* __restrict__ q_out, T* __restrict__ kc, T* __restrict__ vc,
                                   const T* __restrict__ qkv) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  const int half = p.half, D = 2 * half;
  const int64_t width = (int64_t)(p.Hq + 2 * p.Hkv) * D;
  const int qk_pairs = (p.Hq + p.Hkv) * half;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  for (int row = blockIdx.y; row < p.T; row += gridDim.y)
    rope_append_piece(p, q_out, kc, vc, qkv + (int64_t)row * width, row, idx, qk_pairs);
}

}  // namespace

void rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& qkv, const Tensor& positions,
                 const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q,
                 cudaStream_t s) {
  RopeAppendParams p = rope_append_params(q_out, kc, qkv.dim(0), positions, inv_freq, page_table, seq_lens, cu_q);
  if (p.T == 0 || p.half == 0) return;
  const int64_t D = 2 * (int64_t)p.half, esz = dtype_size(qkv.dtype);
  const bool aligned = reinterpret_cast<uintptr_t>(qkv.data()) % 16 == 0 && reinterpret_cast<uintptr_t>(vc.data()) % 16 == 0;
  p.vec = aligned && (D * esz) % 16 == 0 ? 1 : 0;
  const int64_t pieces = (int64_t)(p.Hq + p.Hkv) * p.half + (p.vec ? p.Hkv * D * esz / 16 : p.Hkv * D);
  const int threads = 256;
  const unsigned gx = (unsigned)((pieces + threads - 1) / threads);
  dispatch_float(qkv.dtype, "ropeAppend", [&](auto tt) {
    using T = decltype(tt);
    launch_pdl(rope_append_kernel<T>, dim3(gx, (unsigned)std::min(p.T, 65535)), dim3(threads), 0, s, p, static_cast<T*>(q_out.data()),
               static_cast<T*>(kc.data()), static_cast<T*>(vc.data()), static_cast<const T*>(qkv.data()));
  });
}

}  // namespace sqz::cuda
