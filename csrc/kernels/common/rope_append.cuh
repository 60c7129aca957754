// What ropeAppend does to one rotation pair, shared by its own kernel (fused.cu) and by the
// q|k|v GEMV that applies it in its epilogue (gemm/gemv.cuh, linearRopeAppend): where a row's
// keys and values land in the paged cache, and the rotation, so both give the same bits.
#pragma once
#include <cstdint>

#include "core/tensor.h"
#include "paged_rows.cuh"

namespace sqz::cuda {

struct RopeAppendParams {
  const int* pos;
  const float* inv_freq;
  const int* page_table;
  const int* seq_lens;
  const int* cu_q;
  int T, B, Hq, Hkv, half;
  int pages, page_size, max_pages;
  int vec;  // v heads move in 16-byte pieces (ropeAppend's kernel only)
};

// The parameters for T rows, q_out [T, Hq, D] and caches [pages, pageSize, Hkv, D] (checked by
// the binding); vec is left 0.
inline RopeAppendParams rope_append_params(const Tensor& q_out, const Tensor& kc, int64_t T, const Tensor& positions,
                                           const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens,
                                           const Tensor& cu_q) {
  RopeAppendParams p{};
  p.T = (int)T;
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
  return p;
}

// Cache element offset of `row`'s slot (kv head 0, element 0), or -1 when it is not stored.
__device__ __forceinline__ long long rope_slot_offset(const RopeAppendParams& p, int row) {
  int b, t;
  if (!paged_row_position(p.cu_q, p.seq_lens, p.B, row, &b, &t) || t < 0) return -1;
  const int blk = t / p.page_size;
  if (blk >= p.max_pages) return -1;
  const int page = __ldg(p.page_table + (int64_t)b * p.max_pages + blk);
  if (page < 0 || page >= p.pages) return -1;
  return (((long long)page * p.page_size + t % p.page_size) * p.Hkv) * (2 * p.half);
}

// cos and sin of pair i at `row`'s position: fp32 angle pos * invFreq[i], precise sincosf.
__device__ __forceinline__ void rope_cos_sin(const RopeAppendParams& p, int row, int i, float* c, float* s) {
  const float a = (float)__ldg(p.pos + row) * __ldg(p.inv_freq + i);
  sincosf(a, s, c);
}
// The rotation with products rounded separately (what the rope kernel computes).
__device__ __forceinline__ void rope_apply(float x1, float x2, float c, float s, float* y1, float* y2) {
  *y1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
  *y2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}
// Pair i of a head of `row` rotated by its position.
__device__ __forceinline__ void rope_rotate(const RopeAppendParams& p, int row, int i, float x1, float x2, float* y1,
                                            float* y2) {
  float c, s;
  rope_cos_sin(p, row, i, &c, &s);
  rope_apply(x1, x2, c, s, y1, y2);
}

}  // namespace sqz::cuda
