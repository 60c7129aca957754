// No fused multiply-adds: the sums must round as the TypeScript reference's do.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "kmeans1d.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace sqz::cpu {

void kmeans_1d(const float* x, const float* w, int64_t n, const float* init, int E, int iterations, float* out) {
  if (n < E) {
    std::copy(init, init + E, out);
    return;
  }
  std::vector<double> xs((size_t)n), ws(w ? (size_t)n : 0);
  if (w) {
    // weighted: the samples by value, then index (a stable sort; NaN, not expected, last), weights along
    std::vector<int64_t> order((size_t)n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      const float va = x[a], vb = x[b];
      return va < vb || (!std::isnan(va) && std::isnan(vb));
    });
    for (int64_t i = 0; i < n; ++i) {
      xs[(size_t)i] = x[order[(size_t)i]];
      ws[(size_t)i] = w[order[(size_t)i]];
    }
  } else {
    // unweighted: the values alone, as a numeric sort of them orders them (-0 before +0, NaN last)
    for (int64_t i = 0; i < n; ++i) xs[(size_t)i] = x[i];
    std::sort(xs.begin(), xs.end(), [](double a, double b) {
      if (std::isnan(b)) return !std::isnan(a);
      return a < b || (a == b && std::signbit(a) && !std::signbit(b));
    });
  }
  std::vector<double> cb(init, init + E), sum((size_t)E), cnt((size_t)E), next((size_t)E);
  std::sort(cb.begin(), cb.end());
  for (int it = 0; it < iterations; ++it) {
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(cnt.begin(), cnt.end(), 0.0);
    int j = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double xi = xs[(size_t)i];
      while (j < E - 1 && std::fabs(xi - cb[(size_t)j + 1]) <= std::fabs(xi - cb[(size_t)j])) ++j;
      const double wi = w ? ws[(size_t)i] : 1.0;
      const double p = wi * xi;
      sum[(size_t)j] += p;
      cnt[(size_t)j] += wi;
    }
    double moved = 0;
    for (int c = 0; c < E; ++c) {
      next[(size_t)c] = cnt[(size_t)c] > 0 ? sum[(size_t)c] / cnt[(size_t)c] : cb[(size_t)c];
      moved = std::max(moved, std::fabs(next[(size_t)c] - cb[(size_t)c]));
    }
    cb = next;
    std::sort(cb.begin(), cb.end());
    if (moved < 1e-7) break;
  }
  for (int c = 0; c < E; ++c) out[c] = (float)std::max(-1.0, std::min(1.0, cb[(size_t)c]));
  for (int c = 1; c < E; ++c)
    if (!(out[c] > out[c - 1])) {
      std::copy(init, init + E, out);
      return;
    }
}

}  // namespace sqz::cpu
