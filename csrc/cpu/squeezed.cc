#include "squeezed.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/parallel.h"
#include "kernels/sparse_attn/squeezed_layout.h"
#include "vec.h"

namespace sqz::cpu {

void squeezed_attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
                        const Tensor& seq_lens, float scale, const Tensor& prefix_lens, const Tensor& context_of,
                        const Tensor& contexts, const Tensor& centroids, const Tensor& cluster_start, const Tensor& cluster_tokens,
                        int max_clusters) {
  const int64_t B = q.dim(0), Hq = q.dim(1), D = q.dim(2);
  const int64_t pages = kc.dim(0), ps = kc.dim(1), Hkv = kc.dim(2), maxp = page_table.dim(1);
  const int64_t G = Hq / Hkv, N = contexts.dim(0);
  const int* pt = page_table.ptr<int>();
  const int* lens = seq_lens.ptr<int>();
  const int* pre = prefix_lens.ptr<int>();
  const int* cof = context_of.ptr<int>();
  const int* table = contexts.ptr<int>();
  const float* cen = centroids.ptr<float>();
  const int* cs = cluster_start.ptr<int>();
  const int* ct = cluster_tokens.ptr<int>();
  const size_t es_c = dtype_size(kc.dtype), es_q = dtype_size(q.dtype), es_o = dtype_size(out.dtype);
  const vec::Loops& V = vec::loops();
  parallel_for(B * Hq, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qf(D), kr(D), acc(D), sc, ps_;
    std::vector<int64_t> order, visible;
    std::vector<char> keep;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hq, h = w % Hq, g = h / G;
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t len = std::max<int64_t>(0, lens[b]);
      squeezed::Context cx{};
      const bool has = squeezed::context_at(table, N, cof[b], Hkv, D, centroids.numel(), cluster_start.numel(), cluster_tokens.numel(),
                                            max_clusters, cx);
      const int64_t P = has ? std::min<int64_t>(std::max<int64_t>(0, pre[b]), len) : 0;
      const int64_t C = cx.C, Pc = cx.P, top_c = cx.top;
      convert_to_float(static_cast<const char*>(q.data()) + (size_t)((b * Hq + h) * D) * es_q, q.dtype, qf.data(), (size_t)D);
      visible.clear();
      if (P > 0) {
        sc.resize((size_t)C);
        for (int64_t c = 0; c < C; ++c) sc[(size_t)c] = V.dot(qf.data(), cen + cx.cen + (g * C + c) * D, D);
        order.resize((size_t)C);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return sc[(size_t)x] > sc[(size_t)y]; });
        keep.assign((size_t)C, 0);
        for (int64_t i = 0; i < std::min<int64_t>(top_c, C); ++i) keep[(size_t)order[(size_t)i]] = 1;
        // cluster c owns entries [S(c), S(c + 1)), S(c) = the running maximum of the starts, in [0, Pc]
        const int* st = cs + cx.start + g * (C + 1);
        int64_t s = std::min<int64_t>(std::max<int64_t>(0, st[0]), Pc);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t e = std::min<int64_t>(std::max<int64_t>(s, st[c + 1]), Pc);
          if (keep[(size_t)c])
            for (int64_t i = s; i < e; ++i) {
              const int64_t t = ct[cx.tok + g * Pc + i];
              if (t >= 0 && t < P) visible.push_back(t);
            }
          s = e;
        }
        std::sort(visible.begin(), visible.end());
      }
      for (int64_t t = P; t < len; ++t) visible.push_back(t);
      // exact softmax over the visible keys, in position order
      auto row = [&](const Tensor& cache, int64_t t, float* dst) -> bool {
        const int64_t blk = t / ps;
        if (blk >= maxp) return false;
        const int page = pt[b * maxp + blk];
        if (page < 0 || page >= pages) return false;
        convert_to_float(static_cast<const char*>(cache.data()) + (size_t)(((page * ps + t % ps) * Hkv + g) * D) * es_c, cache.dtype, dst, (size_t)D);
        return true;
      };
      ps_.assign(visible.size(), -INFINITY);
      float mx = -INFINITY;
      for (size_t i = 0; i < visible.size(); ++i) {
        if (!row(kc, visible[i], kr.data())) continue;
        ps_[i] = V.dot(qf.data(), kr.data(), D) * scale;
        mx = std::max(mx, ps_[i]);
      }
      float sum = 0.f;
      for (size_t i = 0; i < visible.size(); ++i) {
        if (ps_[i] == -INFINITY || !row(vc, visible[i], kr.data())) continue;
        const float p = std::exp(ps_[i] - mx);
        sum += p;
        V.axpy(acc.data(), p, kr.data(), D);
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      for (auto& a : acc) a *= inv;
      convert_from_float(acc.data(), static_cast<char*>(out.data()) + (size_t)((b * Hq + h) * D) * es_o, out.dtype, (size_t)D);
    }
  });
}

}  // namespace sqz::cpu
