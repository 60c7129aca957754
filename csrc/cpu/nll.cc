#include "nll.h"

#include <cmath>

#include "../core/parallel.h"

namespace sqz::cpu {

void token_nll(const float* logits, int64_t V, const int32_t* targets, int64_t rows, double* out) {
  // a row is V exps: a few rows per chunk keep small calls on one thread
  const int64_t grain = V >= 8192 ? 1 : (8192 + V - 1) / V;
  parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = logits + r * V;
      double m = -INFINITY;
      for (int64_t v = 0; v < V; ++v)
        if (x[v] > m) m = x[v];
      double s = 0;
      for (int64_t v = 0; v < V; ++v) s += std::exp((double)x[v] - m);
      out[r] = m + std::log(s) - (double)x[targets[r]];
    }
  });
}

}  // namespace sqz::cpu
