// CPU reference of paged attention: exact two-pass softmax in fp32, parallel over
// (query row, kv head) so the g query heads of a group convert each key row once.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/parallel.h"
#include "vec.h"

namespace sqz::cpu {

namespace {

struct Layout {
  int B, Hkv, D, pages, page_size, max_pages;
  const int* pt;
  const int* lens;
  const int* cuq;
  // Page of token t of sequence b, or -1 when it cannot be addressed.
  int page_of(int b, int64_t t) const {
    if (t < 0) return -1;
    int64_t blk = t / page_size;
    if (blk >= max_pages) return -1;
    int page = pt[(int64_t)b * max_pages + blk];
    return (page >= 0 && page < pages) ? page : -1;
  }
  int64_t offset(int page, int64_t t, int kvh) const {
    return (((int64_t)page * page_size + t % page_size) * Hkv + kvh) * D;
  }
};

Layout layout_of(const Tensor& kc, const Tensor& pt, const Tensor& lens, const Tensor& cuq) {
  return Layout{(int)lens.dim(0), (int)kc.dim(2), (int)kc.dim(3), (int)kc.dim(0), (int)kc.dim(1), (int)pt.dim(1),
                pt.ptr<int>(), lens.ptr<int>(), cuq.ptr<int>()};
}

// Sequence of each row (-1: none), from cu_q as given (bad ranges own no rows).
std::vector<int> row_owner(const Layout& L, int64_t N) {
  std::vector<int> owner((size_t)N, -1);
  for (int b = 0; b < L.B; ++b) {
    int64_t s = std::max<int64_t>(0, L.cuq[b]), e = std::min<int64_t>(N, L.cuq[b + 1]);
    for (int64_t i = s; i < e; ++i) owner[(size_t)i] = b;
  }
  return owner;
}

}  // namespace

void kv_append(const Tensor& kc, const Tensor& vc, const Tensor& k, const Tensor& v, const Tensor& page_table,
               const Tensor& seq_lens, const Tensor& cu_q) {
  const Layout L = layout_of(kc, page_table, seq_lens, cu_q);
  const int64_t N = k.dim(0);
  const int64_t row = (int64_t)L.Hkv * L.D;
  std::vector<int> owner = row_owner(L, N);
  parallel_for(N, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf((size_t)row);
    for (int64_t i = r0; i < r1; ++i) {
      const int b = owner[(size_t)i];
      if (b < 0) continue;
      const int64_t n = (int64_t)L.cuq[b + 1] - L.cuq[b];
      const int64_t pos = (int64_t)L.lens[b] - n + (i - L.cuq[b]);
      const int page = L.page_of(b, pos);
      if (page < 0) continue;
      const int64_t dst = L.offset(page, pos, 0);
      for (int which = 0; which < 2; ++which) {
        const Tensor& src = which ? v : k;
        const Tensor& cache = which ? vc : kc;
        if (src.dtype == cache.dtype) {
          const size_t es = dtype_size(src.dtype);
          std::memcpy(static_cast<char*>(cache.data()) + dst * es, static_cast<const char*>(src.data()) + i * row * es,
                      (size_t)row * es);
        } else {
          convert_to_float(static_cast<const char*>(src.data()) + i * row * dtype_size(src.dtype), src.dtype,
                           buf.data(), (size_t)row);
          convert_from_float(buf.data(), static_cast<char*>(cache.data()) + dst * dtype_size(cache.dtype),
                             cache.dtype, (size_t)row);
        }
      }
    }
  });
}

void attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
               const Tensor& seq_lens, const Tensor& cu_q, float scale) {
  const Layout L = layout_of(kc, page_table, seq_lens, cu_q);
  const int64_t N = q.dim(0);
  const int Hq = (int)q.dim(1), D = L.D, Hkv = L.Hkv, g = Hq / Hkv;
  std::vector<int> owner = row_owner(L, N);
  const size_t es_q = dtype_size(q.dtype), es_o = dtype_size(out.dtype), es_c = dtype_size(kc.dtype);
  const bool f32_cache = kc.dtype == DType::F32 && vc.dtype == DType::F32;
  const vec::Loops& V = vec::loops();

  parallel_for(N * Hkv, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qf((size_t)g * D), acc((size_t)g * D), krow(D), scores;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w / Hkv;
      const int kvh = (int)(w % Hkv);
      const int b = owner[(size_t)i];
      std::fill(acc.begin(), acc.end(), 0.f);
      if (b >= 0) {
        const int64_t n = (int64_t)L.cuq[b + 1] - L.cuq[b];
        const int64_t pos = (int64_t)L.lens[b] - n + (i - L.cuq[b]);  // keys 0..pos are visible
        const int64_t nk = std::max<int64_t>(0, pos + 1);
        convert_to_float(static_cast<const char*>(q.data()) + (i * Hq + (int64_t)kvh * g) * D * es_q, q.dtype,
                         qf.data(), (size_t)g * D);
        scores.assign((size_t)(g * nk), -INFINITY);
        std::vector<float> mx(g, -INFINITY);
        // an f32 cache row is read in place; other dtypes are converted into krow
        auto row = [&](const Tensor& cache, int page, int64_t t) -> const float* {
          if (f32_cache) return cache.ptr<float>() + L.offset(page, t, kvh);
          convert_to_float(static_cast<const char*>(cache.data()) + L.offset(page, t, kvh) * es_c, cache.dtype, krow.data(), (size_t)D);
          return krow.data();
        };
        for (int64_t t = 0; t < nk; ++t) {
          const int page = L.page_of(b, t);
          if (page < 0) continue;
          const float* kr = row(kc, page, t);
          for (int hh = 0; hh < g; ++hh) {
            const float s = V.dot(qf.data() + (size_t)hh * D, kr, D) * scale;
            scores[(size_t)(hh * nk + t)] = s;
            mx[hh] = std::max(mx[hh], s);
          }
        }
        std::vector<float> sum(g, 0.f);
        for (int64_t t = 0; t < nk; ++t) {
          const int page = L.page_of(b, t);
          if (page < 0) continue;
          const float* vr = row(vc, page, t);
          for (int hh = 0; hh < g; ++hh) {
            const float p = std::exp(scores[(size_t)(hh * nk + t)] - mx[hh]);
            sum[hh] += p;
            V.axpy(acc.data() + (size_t)hh * D, p, vr, D);
          }
        }
        for (int hh = 0; hh < g; ++hh) {
          const float inv = sum[hh] > 0.f ? 1.f / sum[hh] : 0.f;
          for (int d = 0; d < D; ++d) acc[(size_t)hh * D + d] *= inv;
        }
      }
      convert_from_float(acc.data(), static_cast<char*>(out.data()) + (i * Hq + (int64_t)kvh * g) * D * es_o,
                         out.dtype, (size_t)g * D);
    }
  });
}

}  // namespace sqz::cpu
