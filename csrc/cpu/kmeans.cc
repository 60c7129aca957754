#include "kmeans.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../core/parallel.h"

namespace sqz::cpu {

namespace {

// One row. v: values, s: weights (K each). Writes E centroids and K codes.
void kmeans_row(const float* v, const float* s, int64_t K, int E, int iters, float* cent, uint8_t* code,
                std::vector<int64_t>& order, std::vector<double>& pw, std::vector<double>& pwv,
                std::vector<float>& sv) {
  order.resize((size_t)K);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return v[a] < v[b]; });
  double total = 0;
  for (int64_t k = 0; k < K; ++k) total += std::max(0.f, s[k]);
  const bool uniform = !(total > 0);
  // Prefix sums over the sorted values: pw[i] = sum of weights of the first i, pwv weighted values.
  pw.assign((size_t)K + 1, 0.0);
  pwv.assign((size_t)K + 1, 0.0);
  sv.resize((size_t)K);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t k = order[(size_t)i];
    const double wt = uniform ? 1.0 : std::max(0.f, s[k]);
    sv[(size_t)i] = v[k];
    pw[(size_t)i + 1] = pw[(size_t)i] + wt;
    pwv[(size_t)i + 1] = pwv[(size_t)i] + wt * v[k];
  }
  const double W = pw[(size_t)K];
  // Weighted quantile init: centroid e at the value where the cumulative weight reaches (e + 0.5)/E.
  for (int e = 0; e < E; ++e) {
    const double target = W * (e + 0.5) / E;
    int64_t i = std::upper_bound(pw.begin() + 1, pw.end(), target) - (pw.begin() + 1);
    i = std::min<int64_t>(std::max<int64_t>(i, 0), K - 1);
    cent[e] = K > 0 ? sv[(size_t)i] : 0.f;
  }
  std::vector<int64_t> bound((size_t)E + 1), prev((size_t)E + 1, -1);
  for (int it = 0; it <= iters; ++it) {
    std::sort(cent, cent + E);
    // Segment e = sorted values nearest to centroid e: boundaries at the midpoints (ties go low).
    bound[0] = 0;
    bound[(size_t)E] = K;
    for (int e = 1; e < E; ++e) {
      const float mid = 0.5f * (cent[e - 1] + cent[e]);
      bound[(size_t)e] = std::upper_bound(sv.begin(), sv.end(), mid) - sv.begin();
      if (cent[e - 1] == cent[e]) bound[(size_t)e] = bound[(size_t)e - 1];
    }
    if (bound == prev || it == iters) break;
    prev = bound;
    for (int e = 0; e < E; ++e) {
      const double sw = pw[(size_t)bound[e + 1]] - pw[(size_t)bound[e]];
      if (sw > 0) cent[e] = (float)((pwv[(size_t)bound[e + 1]] - pwv[(size_t)bound[e]]) / sw);
    }
  }
  // Codes: nearest centroid (ties to the lower index); centroids are sorted.
  for (int64_t k = 0; k < K; ++k) {
    const float x = v[k];
    int best = 0;
    float bd = std::abs(x - cent[0]);
    for (int e = 1; e < E; ++e) {
      const float d = std::abs(x - cent[e]);
      if (d < bd) { bd = d; best = e; }
    }
    code[k] = (uint8_t)best;
  }
}

}  // namespace

void kmeans_rows(const Tensor& lut, const Tensor& codes, const Tensor& w, const Tensor& sens, int iters) {
  const int64_t N = w.dim(0), K = w.dim(1);
  const int E = (int)lut.dim(1);
  const bool shared = sens.ndim() == 1;
  float* lp = lut.ptr<float>();
  uint8_t* cp = codes.ptr<uint8_t>();
  parallel_for(N, 4, [&](int64_t b, int64_t e) {
    std::vector<float> row((size_t)K), srow((size_t)K), sv;
    std::vector<int64_t> order;
    std::vector<double> pw, pwv;
    for (int64_t n = b; n < e; ++n) {
      convert_to_float(static_cast<const char*>(w.data()) + (size_t)(n * K) * dtype_size(w.dtype), w.dtype, row.data(),
                       (size_t)K);
      const size_t so = shared ? 0 : (size_t)(n * K);
      convert_to_float(static_cast<const char*>(sens.data()) + so * dtype_size(sens.dtype), sens.dtype, srow.data(),
                       (size_t)K);
      kmeans_row(row.data(), srow.data(), K, E, iters, lp + n * E, cp + n * K, order, pw, pwv, sv);
    }
  });
}

}  // namespace sqz::cpu
