// ropeAppend: one block per row of a packed q|k|v matrix. The block computes cos/sin of its
// D/2 angles once (fp32 angle, precise sincosf, products rounded separately: bit for bit
// what the rope kernel computes), rotates the q heads into q_out and the k heads into the
// paged key cache, and copies the v heads into the value cache, at the slot kv_append
// uses (the sequence found by binary search over cu_q in device memory, so a captured graph
// replays with new batches; rows whose position or page is out of range are not stored).
#include <algorithm>

#include "pdl.cuh"
#include "core/cuda_stream.h"
#include "dtype_cuda.cuh"
#include "fused.h"
#include "paged_rows.cuh"

namespace sqz::cuda {
namespace {

struct RopeAppendParams {
  const int* pos;
  const float* inv_freq;
  const int* page_table;
  const int* seq_lens;
  const int* cu_q;
  int T, B, Hq, Hkv, half;
  int pages, page_size, max_pages;
};

template <class T>
__global__ void rope_append_kernel(RopeAppendParams p, T* __restrict__ q_out, T* __restrict__ kc, T* __restrict__ vc,
                                   const T* __restrict__ qkv) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  extern __shared__ float cs[];  // cos[half], sin[half]
  __shared__ long long dst_s;
  const int half = p.half, D = 2 * half;
  const int64_t width = (int64_t)(p.Hq + 2 * p.Hkv) * D;
  for (int row = blockIdx.x; row < p.T; row += gridDim.x) {
    __syncthreads();  // the previous row is done with cs and dst_s
    const float ps = (float)__ldg(p.pos + row);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      const float a = ps * __ldg(p.inv_freq + i);
      float sn, cn;
      sincosf(a, &sn, &cn);
      cs[i] = cn;
      cs[half + i] = sn;
    }
    if (threadIdx.x == 0) {
      long long dst = -1;
      int b, t;
      if (paged_row_position(p.cu_q, p.seq_lens, p.B, row, &b, &t) && t >= 0) {
        const int blk = t / p.page_size;
        if (blk < p.max_pages) {
          const int page = __ldg(p.page_table + (int64_t)b * p.max_pages + blk);
          if (page >= 0 && page < p.pages) dst = (((long long)page * p.page_size + t % p.page_size) * p.Hkv) * D;
        }
      }
      dst_s = dst;
    }
    __syncthreads();
    const long long dst = dst_s;
    const T* src = qkv + (int64_t)row * width;
    const int qk_pairs = (p.Hq + p.Hkv) * half;
    for (int q = threadIdx.x; q < qk_pairs; q += blockDim.x) {
      const int h = q / half, i = q - h * half;
      const T* xh = src + (int64_t)h * D;
      const float x1 = to_f32(xh[i]), x2 = to_f32(xh[i + half]);
      const float c = cs[i], s = cs[half + i];
      const T y1 = from_f32<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
      const T y2 = from_f32<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
      T* out;
      if (h < p.Hq) {
        out = q_out + ((int64_t)row * p.Hq + h) * D;
      } else {
        if (dst < 0) continue;
        out = kc + dst + (int64_t)(h - p.Hq) * D;
      }
      out[i] = y1;
      out[i + half] = y2;
    }
    if (dst >= 0) {
      const T* v = src + (int64_t)(p.Hq + p.Hkv) * D;
      const int n = p.Hkv * D;
      for (int j = threadIdx.x; j < n; j += blockDim.x) vc[dst + j] = v[j];
    }
  }
}

}  // namespace

void rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& qkv, const Tensor& positions,
                 const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q,
                 cudaStream_t s) {
  RopeAppendParams p{};
  p.T = (int)qkv.dim(0);
  p.B = (int)seq_lens.dim(0);
  p.Hq = (int)q_out.dim(1);
  p.half = (int)(q_out.dim(2) / 2);
  p.Hkv = (int)kc.dim(2);
  p.pages = (int)kc.dim(0);
  p.page_size = (int)kc.dim(1);
  p.max_pages = (int)page_table.dim(1);
  p.pos = positions.ptr<int>();
  p.inv_freq = inv_freq.ptr<float>();
  p.page_table = page_table.ptr<int>();
  p.seq_lens = seq_lens.ptr<int>();
  p.cu_q = cu_q.ptr<int>();
  if (p.T == 0 || p.half == 0) return;
  dispatch_float(qkv.dtype, "ropeAppend", [&](auto tt) {
    using T = decltype(tt);
    const int pairs = (p.Hq + p.Hkv) * p.half;
    const int threads = std::min(512, std::max(32, (pairs + 31) / 32 * 32));
    const int grid = std::min(p.T, 65535);
    launch_pdl(rope_append_kernel<T>, dim3(grid), dim3(threads), 2 * p.half * sizeof(float), s, p, static_cast<T*>(q_out.data()), static_cast<T*>(kc.data()), static_cast<T*>(vc.data()),
        static_cast<const T*>(qkv.data()));
  });
}

}  // namespace sqz::cuda
