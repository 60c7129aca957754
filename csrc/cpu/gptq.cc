#include "gptq.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../core/parallel.h"

namespace sqz::cpu {

namespace {

struct Row {
  std::vector<uint8_t> codes;
  std::vector<double> t, q;
};

// dᵀ h d
double quad(const double* d, const float* h, int64_t K) {
  double s = 0;
  for (int64_t i = 0; i < K; ++i) {
    if (d[i] == 0) continue;
    const float* hr = h + i * K;
    double t = 0;
    for (int64_t j = 0; j < K; ++j) t += hr[j] * d[j];
    s += d[i] * t;
  }
  return s;
}

// Solves a x = b (a [n,n] overwritten; b becomes x), partial pivoting. False when singular.
bool solve(std::vector<double>& a, std::vector<double>& b, int n) {
  for (int c = 0; c < n; ++c) {
    int p = c;
    for (int r = c + 1; r < n; ++r)
      if (std::abs(a[(size_t)(r * n + c)]) > std::abs(a[(size_t)(p * n + c)])) p = r;
    if (!(std::abs(a[(size_t)(p * n + c)]) > 0)) return false;
    if (p != c) {
      for (int j = 0; j < n; ++j) std::swap(a[(size_t)(c * n + j)], a[(size_t)(p * n + j)]);
      std::swap(b[(size_t)c], b[(size_t)p]);
    }
    for (int r = c + 1; r < n; ++r) {
      const double f = a[(size_t)(r * n + c)] / a[(size_t)(c * n + c)];
      if (f == 0) continue;
      for (int j = c; j < n; ++j) a[(size_t)(r * n + j)] -= f * a[(size_t)(c * n + j)];
      b[(size_t)r] -= f * b[(size_t)c];
    }
  }
  for (int c = n - 1; c >= 0; --c) {
    double s = b[(size_t)c];
    for (int j = c + 1; j < n; ++j) s -= a[(size_t)(c * n + j)] * b[(size_t)j];
    b[(size_t)c] = s / a[(size_t)(c * n + c)];
  }
  return true;
}

struct Work {
  std::vector<double> w, work, d, g, m, b, tmp, a, y;
  std::vector<int> bucket;
  std::vector<uint8_t> out;
  std::vector<int64_t> S;
};

// d_S = −h_SS⁻¹ h_S,rest d_rest: the outlier values that absorb the dense part's error.
void optimize_outliers(const float* h, int64_t K, Row& s, Work& wk) {
  wk.S.clear();
  for (int64_t k = 0; k < K; ++k)
    if (wk.out[(size_t)k]) wk.S.push_back(k);
  const int n = (int)wk.S.size();
  if (!n) return;
  wk.a.assign((size_t)n * n, 0.0);
  wk.y.assign((size_t)n, 0.0);
  for (int i = 0; i < n; ++i) {
    const float* hr = h + wk.S[(size_t)i] * K;
    double t = 0;
    for (int64_t j = 0; j < K; ++j)
      if (!wk.out[(size_t)j]) t += hr[j] * (wk.w[(size_t)j] - s.q[(size_t)j]);
    wk.y[(size_t)i] = -t;
    for (int j = 0; j < n; ++j) wk.a[(size_t)(i * n + j)] = hr[wk.S[(size_t)j]];
  }
  if (!solve(wk.a, wk.y, n)) return;
  for (int i = 0; i < n; ++i)
    if (std::isfinite(wk.y[(size_t)i])) s.q[(size_t)wk.S[(size_t)i]] = wk.w[(size_t)wk.S[(size_t)i]] - wk.y[(size_t)i];
}

// Columns in order, nearest centroid, error spread over the later columns with row k of u.
void gptq_row(const float* u, int64_t K, int E, Row& s, Work& wk) {
  wk.work = wk.w;
  double* v = wk.work.data();
  for (int64_t k = 0; k < K; ++k) {
    const double x = v[k];
    if (wk.out[(size_t)k]) {
      s.q[(size_t)k] = x;
      continue;
    }
    int best = 0;
    double bd = std::abs(x - s.t[0]);
    for (int e = 1; e < E; ++e) {
      const double d = std::abs(x - s.t[(size_t)e]);
      if (d < bd) { bd = d; best = e; }
    }
    s.codes[(size_t)k] = (uint8_t)best;
    s.q[(size_t)k] = s.t[(size_t)best];
    const float* ur = u + k * K;
    const double err = (x - s.t[(size_t)best]) / ur[k];
    if (err == 0) continue;
    for (int64_t j = k + 1; j < K; ++j) v[j] -= err * ur[j];
  }
}

// Least-squares table for fixed codes and outlier values: t = (Aᵀ h A)⁻¹ Aᵀ h r, r = w on the
// dense columns and w − q on the outliers (A is zero there).
void refit_row(const float* h, int64_t K, int E, Row& s, Work& wk) {
  wk.m.assign((size_t)E * E, 0.0);
  wk.b.assign((size_t)E, 0.0);
  wk.tmp.resize((size_t)E + 1);
  // r and the bucket of every column (E = outlier)
  wk.d.resize((size_t)K);
  std::vector<int>& bucket = wk.bucket;
  bucket.resize((size_t)K);
  for (int64_t j = 0; j < K; ++j) {
    const bool o = wk.out[(size_t)j];
    wk.d[(size_t)j] = o ? wk.w[(size_t)j] - s.q[(size_t)j] : wk.w[(size_t)j];
    bucket[(size_t)j] = o ? E : s.codes[(size_t)j];
  }
  double trace = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (wk.out[(size_t)k]) continue;
    std::fill(wk.tmp.begin(), wk.tmp.end(), 0.0);
    const float* hr = h + k * K;
    double gk = 0;
    for (int64_t j = 0; j < K; ++j) {
      gk += hr[j] * wk.d[(size_t)j];
      wk.tmp[(size_t)bucket[(size_t)j]] += hr[j];
    }
    const int ck = s.codes[(size_t)k];
    wk.b[(size_t)ck] += gk;
    for (int e = 0; e < E; ++e) wk.m[(size_t)(ck * E + e)] += wk.tmp[(size_t)e];
    trace += hr[k];
  }
  // A tiny ridge toward the current table keeps unused codes where they are.
  const double lam = 1e-9 * (trace > 0 ? trace / (double)K : 1.0);
  for (int e = 0; e < E; ++e) {
    wk.m[(size_t)(e * E + e)] += lam;
    wk.b[(size_t)e] += lam * s.t[(size_t)e];
  }
  if (solve(wk.m, wk.b, E)) {
    for (int e = 0; e < E; ++e)
      if (std::isfinite(wk.b[(size_t)e])) s.t[(size_t)e] = wk.b[(size_t)e];
    for (int64_t k = 0; k < K; ++k)
      if (!wk.out[(size_t)k]) s.q[(size_t)k] = s.t[s.codes[(size_t)k]];
  }
  optimize_outliers(h, K, s, wk);
}

double row_error(const float* h, int64_t K, const Row& s, Work& wk) {
  wk.d.resize((size_t)K);
  for (int64_t k = 0; k < K; ++k) wk.d[(size_t)k] = wk.w[(size_t)k] - s.q[(size_t)k];
  return quad(wk.d.data(), h, K);
}

}  // namespace

void gptq_refit_rows(const Tensor& lut, const Tensor& codes, const Tensor& q, const Tensor& err, const Tensor& w,
                     const Tensor& out, const Tensor& h, const Tensor& u, const Tensor& perm, int rounds) {
  const int64_t N = w.dim(0), K = w.dim(1);
  const int E = (int)lut.dim(1);
  // h and u stay f32: every product and sum with them is formed in double anyway.
  const float* hd = h.ptr<float>();
  const float* ud = u.ptr<float>();
  const int32_t* pm = perm.ptr<int32_t>();
  const float* wp = w.ptr<float>();
  const uint8_t* op = out.ptr<uint8_t>();
  float* lp = lut.ptr<float>();
  uint8_t* cp = codes.ptr<uint8_t>();
  float* qp = q.ptr<float>();
  float* ep = err.ptr<float>();
  parallel_for(N, 4, [&](int64_t b, int64_t e) {
    Work wk;
    wk.w.resize((size_t)K);
    wk.out.resize((size_t)K);
    Row cur{std::vector<uint8_t>((size_t)K), std::vector<double>((size_t)E), std::vector<double>((size_t)K)};
    Row best = cur;
    for (int64_t n = b; n < e; ++n) {
      const int64_t row = n * K;
      for (int64_t i = 0; i < K; ++i) {
        const int64_t k = pm[i];
        wk.w[(size_t)i] = wp[row + k];
        wk.out[(size_t)i] = op[row + k];
        cur.codes[(size_t)i] = cp[row + k];
      }
      for (int c = 0; c < E; ++c) cur.t[(size_t)c] = lp[n * E + c];
      for (int64_t i = 0; i < K; ++i) cur.q[(size_t)i] = wk.out[(size_t)i] ? wk.w[(size_t)i] : cur.t[cur.codes[(size_t)i]];
      const double e0 = row_error(hd, K, cur, wk);
      optimize_outliers(hd, K, cur, wk);
      double bestErr = row_error(hd, K, cur, wk);
      best = cur;
      for (int r = 0; r < rounds; ++r) {
        gptq_row(ud, K, E, cur, wk);
        // The refit can only lower the error of the GPTQ state (that state is feasible for both
        // of its least-squares steps), so only the refitted state is scored.
        refit_row(hd, K, E, cur, wk);
        const double e1 = row_error(hd, K, cur, wk);
        if (e1 < bestErr) { bestErr = e1; best = cur; }
      }
      for (int64_t i = 0; i < K; ++i) {
        const int64_t k = pm[i];
        cp[row + k] = best.codes[(size_t)i];
        qp[row + k] = (float)best.q[(size_t)i];
      }
      for (int c = 0; c < E; ++c) lp[n * E + c] = (float)best.t[(size_t)c];
      ep[2 * n] = (float)e0;
      ep[2 * n + 1] = (float)bestErr;
    }
  });
}

namespace {

// sum over k < n of x[k] y[k], four running sums (a fixed order: the same on every thread)
double dot(const double* x, const double* y, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += x[k] * y[k];
    s1 += x[k + 1] * y[k + 1];
    s2 += x[k + 2] * y[k + 2];
    s3 += x[k + 3] * y[k + 3];
  }
  for (; k < n; ++k) s0 += x[k] * y[k];
  return (s0 + s1) + (s2 + s3);
}

// In-place lower Cholesky factor of m [n,n] (row-major; the upper triangle is left as it was),
// right-looking in column blocks of kBlock: the diagonal block, then the panel below it and the
// trailing update, both over rows in parallel.
void cholesky_in_place(double* m, int64_t n) {
  constexpr int64_t kBlock = 64;
  auto row = [&](int64_t i) { return m + i * n; };
  for (int64_t kb = 0; kb < n; kb += kBlock) {
    const int64_t ke = std::min(n, kb + kBlock);
    for (int64_t i = kb; i < ke; ++i)
      for (int64_t j = kb; j <= i; ++j) {
        const double s = row(i)[j] - dot(row(i) + kb, row(j) + kb, j - kb);
        row(i)[j] = i == j ? std::sqrt(std::max(s, 1e-300)) : s / row(j)[j];
      }
    if (ke == n) break;
    // the panel of every row first: the trailing update of row i reads the panels of rows j <= i
    parallel_for(n - ke, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = ke + b; i < ke + e; ++i) {
        double* ri = row(i);
        for (int64_t j = kb; j < ke; ++j) ri[j] = (ri[j] - dot(ri + kb, row(j) + kb, j - kb)) / row(j)[j];
      }
    });
    parallel_for(n - ke, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = ke + b; i < ke + e; ++i) {
        double* ri = row(i);
        for (int64_t j = ke; j <= i; ++j) ri[j] -= dot(ri + kb, row(j) + kb, ke - kb);
      }
    });
  }
}

// m [n,n] holds a lower triangular factor (from cholesky_in_place; its strict upper triangle is
// free): replaces it by u = J m⁻¹ J (J the reversal), upper. Columns of m⁻¹ in blocks of kCols, one
// block per task: rows i >= j0 in order, x_i[c] = (δ_ic - sum_{c <= k < i} m[i][k] x_k[c]) / m[i][i],
// each row of m read once per block and the block's rows of m⁻¹ in the task's own buffer (a row by
// row inverse reread all of m⁻¹ per row: memory-bound, 2/3 of the time at K = 4096). A finished
// block goes transposed into the free upper triangle (element (r, c), r > c, at (c, r)), which a
// point reflection then puts where u wants it.
void reflected_inverse(double* m, int64_t n) {
  constexpr int64_t kCols = 64;
  std::vector<double> diag((size_t)n);
  parallel_for((n + kCols - 1) / kCols, 1, [&](int64_t b, int64_t e) {
    std::vector<double> x, acc(kCols);
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t j0 = blk * kCols, w = std::min(n, j0 + kCols) - j0;
      x.assign((size_t)((n - j0) * w), 0.0);  // x[(i - j0) w + c] = m⁻¹[i][j0 + c]
      for (int64_t i = j0; i < n; ++i) {
        const double* mi = m + i * n;
        std::fill(acc.begin(), acc.begin() + w, 0.0);
        for (int64_t k = j0; k < i; ++k) {
          const double f = mi[k], *xk = &x[(size_t)((k - j0) * w)];
          const int64_t ce = std::min(w, k - j0 + 1);  // x_k[c] = 0 for j0 + c > k
          for (int64_t c = 0; c < ce; ++c) acc[(size_t)c] += f * xk[c];
        }
        const double d = 1.0 / mi[i];
        double* xi = &x[(size_t)((i - j0) * w)];
        for (int64_t c = 0, ce = std::min(w, i - j0 + 1); c < ce; ++c) xi[c] = ((i == j0 + c ? 1.0 : 0.0) - acc[(size_t)c]) * d;
      }
      for (int64_t c = 0; c < w; ++c) {
        diag[(size_t)(j0 + c)] = x[(size_t)(c * w + c)];
        double* up = m + (j0 + c) * n;
        for (int64_t r = j0 + c + 1; r < n; ++r) up[r] = x[(size_t)((r - j0) * w + c)];
      }
    }
  });
  // u[i][j] (i < j) = m⁻¹[n-1-i][n-1-j], stored at (n-1-j, n-1-i): swap each such pair once (from its
  // element of lower index); the diagonal from diag; zeros below it.
  parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double* ri = m + i * n;
      for (int64_t j = i + 1; j < n; ++j) {
        const int64_t p = i * n + j, q = (n - 1 - j) * n + (n - 1 - i);
        if (p < q) std::swap(ri[j], m[q]);
      }
      ri[i] = diag[(size_t)(n - 1 - i)];
      std::fill(ri, ri + i, 0.0);
    }
  });
}

}  // namespace

void gptq_factor(const double* h, int64_t K, double damp, bool act_order, int32_t* perm, double* a, double* u) {
  double mean = 0;
  for (int64_t k = 0; k < K; ++k) mean += h[k * K + k];
  mean /= (double)K;
  if (!(mean != 0) || std::isnan(mean)) mean = 1;  // (the reference's `sum / K || 1`)
  std::iota(perm, perm + K, 0);
  if (act_order) {
    auto key = [&](int32_t c) { const double d = h[c * K + c]; return std::isnan(d) ? -INFINITY : d; };
    std::stable_sort(perm, perm + K, [&](int32_t x, int32_t y) { return key(x) > key(y); });
  }
  parallel_for(K, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < K; ++j) a[i * K + j] = h[(int64_t)perm[i] * K + perm[j]];
  });
  for (int64_t k = 0; k < K; ++k)
    if (!(a[k * K + k] > 0)) {
      for (int64_t j = 0; j < K; ++j) a[k * K + j] = a[j * K + k] = 0;
      a[k * K + k] = mean;
    }
  for (int64_t k = 0; k < K; ++k) a[k * K + k] += damp * mean;
  // u <- a reversed (u[i][j] = a[K-1-i][K-1-j]) and its lower Cholesky factor m; then v = J m J is
  // upper with a = v vᵀ, and u = v⁻¹ = J m⁻¹ J.
  parallel_for(K, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < K; ++j) u[i * K + j] = a[(K - 1 - i) * K + (K - 1 - j)];
  });
  cholesky_in_place(u, K);
  reflected_inverse(u, K);
}

}  // namespace sqz::cpu
