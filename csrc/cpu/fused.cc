#include "fused.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/parallel.h"
#include "gemm.h"

namespace sqz::cpu {

void rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& qkv, const Tensor& positions,
                 const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q) {
  const int64_t T = qkv.dim(0), Hq = q_out.dim(1), D = q_out.dim(2), half = D / 2;
  const int64_t pages = kc.dim(0), page_size = kc.dim(1), Hkv = kc.dim(2);
  const int64_t B = seq_lens.dim(0), max_pages = page_table.dim(1);
  const int64_t width = (Hq + 2 * Hkv) * D, kv_row = Hkv * D;
  const int32_t* pos = positions.ptr<int32_t>();
  const float* f = inv_freq.ptr<float>();
  const int* pt = page_table.ptr<int>();
  const int* lens = seq_lens.ptr<int>();
  const int* cuq = cu_q.ptr<int>();
  const size_t es_in = dtype_size(qkv.dtype), es_q = dtype_size(q_out.dtype), es_c = dtype_size(kc.dtype);

  // Sequence of each row (-1: none), from cu_q as given (bad ranges own no rows).
  std::vector<int> owner((size_t)T, -1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = std::max<int64_t>(0, cuq[b]), e = std::min<int64_t>(T, cuq[b + 1]);
    for (int64_t i = s; i < e; ++i) owner[(size_t)i] = (int)b;
  }

  parallel_for(T, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> c((size_t)half), s((size_t)half), row((size_t)width);
    for (int64_t r = r0; r < r1; ++r) {
      const float p = (float)pos[r];
      for (int64_t i = 0; i < half; ++i) {
        const float a = p * f[i];
        c[(size_t)i] = std::cos(a);
        s[(size_t)i] = std::sin(a);
      }
      const char* src = static_cast<const char*>(qkv.data()) + (size_t)(r * width) * es_in;
      convert_to_float(src, qkv.dtype, row.data(), (size_t)width);
      // Rotate the q and k heads, each rounded to the input dtype (what rope in place leaves).
      for (int64_t h = 0; h < Hq + Hkv; ++h) {
        float* v = row.data() + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i], x2 = v[i + half];
          v[i] = x1 * c[(size_t)i] - x2 * s[(size_t)i];
          v[i + half] = x2 * c[(size_t)i] + x1 * s[(size_t)i];
        }
      }
      std::vector<char> tmp((size_t)width * es_in);
      convert_from_float(row.data(), tmp.data(), qkv.dtype, (size_t)width);
      convert_to_float(tmp.data(), qkv.dtype, row.data(), (size_t)width);
      convert_from_float(row.data(), static_cast<char*>(q_out.data()) + (size_t)(r * Hq * D) * es_q, q_out.dtype,
                         (size_t)(Hq * D));
      const int b = owner[(size_t)r];
      if (b < 0) continue;
      const int64_t n = (int64_t)cuq[b + 1] - cuq[b];
      const int64_t t = (int64_t)lens[b] - n + (r - cuq[b]);
      if (t < 0) continue;
      const int64_t blk = t / page_size;
      if (blk >= max_pages) continue;
      const int page = pt[b * max_pages + blk];
      if (page < 0 || page >= pages) continue;
      const size_t dst = (size_t)(((int64_t)page * page_size + t % page_size) * Hkv * D) * es_c;
      convert_from_float(row.data() + Hq * D, static_cast<char*>(kc.data()) + dst, kc.dtype, (size_t)kv_row);
      convert_from_float(row.data() + (Hq + Hkv) * D, static_cast<char*>(vc.data()) + dst, vc.dtype, (size_t)kv_row);
    }
  });
}

void linear_rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& x, const Tensor& w,
                        const Tensor* bias, const Tensor* gamma, float eps, const Tensor& positions,
                        const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q) {
  Device cpu;
  Tensor qkv = Tensor::empty(x.dtype, {x.dim(0), w.dim(0)}, cpu);
  fused_linear(qkv, x, w, bias, gamma, eps, 0);
  rope_append(q_out, kc, vc, qkv, positions, inv_freq, page_table, seq_lens, cu_q);
}

}  // namespace sqz::cpu
