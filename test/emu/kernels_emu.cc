// Runs the LoRA and Squeezed Attention CUDA kernels in the emulator (cuda_emu.h) on random inputs
// against plain float64 references; prints one line per case and "emu: N passed, M failed".
#include "cuda_emu.h"

#include <cstdio>
#include <random>
#include <type_traits>

#include "kernels/lora/lora.cuh"
#include "kernels/sparse_attn/squeezed.cuh"


static int passed = 0, failed = 0;
static void report(const char* name, double err, double tol) {
  const bool ok = err <= tol;
  (ok ? passed : failed)++;
  std::printf("%s %s: rel err %.3g (tol %.1g)\n", ok ? "ok  " : "FAIL", name, err, tol);
}
static double rel(const std::vector<float>& a, const std::vector<double>& b) {
  double n = 0, d = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    n += (a[i] - b[i]) * (a[i] - b[i]);
    d += b[i] * b[i];
  }
  return std::sqrt(n / std::max(d, 1e-30));
}

// One case of the two LoRA kernels in element type E (float or __half), VEC picking the 16-byte paths.
template <class E, bool VEC>
static void lora_case(std::mt19937& r, int T, int K, int N) {
  std::normal_distribution<float> nd;
  const int S = 4, R = 40;
  const int desc[S * 2] = {0, 3, 3, 16, 19, 0, 32, 9};  // slot 3's range runs past the pool: skipped
  const float scale[S] = {0.5f, 2.f, 1.f, 3.f};
  std::vector<E> x(T * K), y(T * N), A(R * K), Bt(R * N);
  for (auto* v : {&x, &y, &A, &Bt}) for (auto& e : *v) e = E(nd(r));
  std::vector<int> slots(T);
  for (int t = 0; t < T; ++t) slots[t] = (t % 6) - 1;  // -1 .. 4: none, four slots, one out of range
  std::vector<double> want(T * N);
  for (int i = 0; i < T * N; ++i) want[i] = (float)y[i];
  for (int t = 0; t < T; ++t) {
    const int s = slots[t];
    if (s < 0 || s >= S || desc[2 * s + 1] <= 0 || desc[2 * s] + desc[2 * s + 1] > R) continue;
    for (int j = 0; j < desc[2 * s + 1]; ++j) {
      double d = 0;
      for (int k = 0; k < K; ++k) d += (double)(float)A[(desc[2 * s] + j) * K + k] * (float)x[t * K + k];
      for (int n = 0; n < N; ++n) want[t * N + n] += scale[s] * d * (float)Bt[(desc[2 * s] + j) * N + n];
    }
  }
  using namespace sqz::cuda::lora_kernels;
  std::vector<E> got = y;
  const int64_t vstride = R;
  std::vector<float> v(T * vstride, NAN);  // poisoned: the expand reads only products the shrink wrote
  emu::run(dim3(T, (vstride + kShrinkRows - 1) / kShrinkRows), dim3(kThreads),
           [&] { shrink_kernel<E, VEC>(v.data(), x.data(), slots.data(), A.data(), desc, scale, K, R, S, vstride); });
  emu::run(dim3(T, (N + kExpandOut - 1) / kExpandOut), dim3(kThreads),
           [&] { expand_kernel<E, VEC>(got.data(), v.data(), slots.data(), Bt.data(), desc, N, R, S, vstride); });
  std::vector<float> gf(got.begin(), got.end());
  // f16: y is rounded once at the end (2^-11 relative), the products are fp32
  const double tol = sizeof(E) == 2 ? 2e-3 : 1e-5;
  char name[96];
  std::snprintf(name, sizeof name, "lora %s %s T=%d K=%d N=%d", sizeof(E) == 2 ? "f16" : "f32", VEC ? "vector" : "scalar", T, K, N);
  report(name, rel(gf, want), tol);
}

// dup > 0: cluster c's centroid is cluster c % dup's (exact score ties: the lower cluster goes first)
static void squeezed_case(std::mt19937& r, int B, int Hq, int Hkv, int D, int Pc, int C, int topC, std::initializer_list<int> splits = {3},
                          int dup = 0) {
  std::normal_distribution<float> nd;
  const int top2 = topC / 2 + 1;  // the second context's clusters attended
  const int ps = 8, tail = 37, L = Pc + tail, maxp = (L + ps - 1) / ps, pages = B * maxp, G = Hq / Hkv;
  std::vector<float> q(B * Hq * D), k((size_t)pages * ps * Hkv * D), v(k.size()), cen((size_t)Hkv * C * D);
  for (auto* a : {&q, &k, &v, &cen}) for (auto& e : *a) e = nd(r);
  if (dup > 0)
    for (int g = 0; g < Hkv; ++g)
      for (int c = dup; c < C; ++c)
        std::copy_n(&cen[((size_t)g * C + c % dup) * D], D, &cen[((size_t)g * C + c) * D]);
  std::vector<int> pt(B * maxp), lens(B), pre(B), cs(Hkv * (C + 1)), ct(Hkv * Pc);
  for (int i = 0; i < B * maxp; ++i) pt[i] = (i * 7 + 3) % pages;
  for (int b = 0; b < B; ++b) {
    lens[b] = L - 5 * b;
    pre[b] = b == B - 1 ? 0 : Pc;  // the last sequence attends densely
  }
  for (int g = 0; g < Hkv; ++g) {  // random cluster sizes, tokens shuffled
    std::vector<int> perm(Pc);
    for (int i = 0; i < Pc; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), r);
    for (int i = 0; i < Pc; ++i) ct[g * Pc + i] = perm[i];
    std::vector<int> cuts(C - 1);
    for (auto& c : cuts) c = (int)(r() % (Pc + 1));
    std::sort(cuts.begin(), cuts.end());
    cs[g * (C + 1)] = 0;
    for (int c = 1; c < C; ++c) cs[g * (C + 1) + c] = cuts[c - 1];
    cs[g * (C + 1) + C] = Pc;
  }
  const float scale = 1.f / std::sqrt((float)D);
  std::vector<double> want((size_t)B * Hq * D, 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int g = h / G, len = lens[b], P = std::min(pre[b], len), top = b % 2 ? top2 : topC;
      std::vector<int> vis;
      if (P > 0) {
        std::vector<std::pair<double, int>> sc(C);
        for (int c = 0; c < C; ++c) {
          double s = 0;
          for (int d = 0; d < D; ++d) s += (double)q[(b * Hq + h) * D + d] * cen[((size_t)g * C + c) * D + d];
          sc[c] = {-s, c};
        }
        std::sort(sc.begin(), sc.end());
        for (int i = 0; i < std::min(top, C); ++i) {
          const int c = sc[i].second;
          for (int e = cs[g * (C + 1) + c]; e < cs[g * (C + 1) + c + 1]; ++e) if (ct[g * Pc + e] < P) vis.push_back(ct[g * Pc + e]);
        }
      }
      for (int t = P; t < len; ++t) vis.push_back(t);
      auto at = [&](int t) { return (((size_t)pt[b * maxp + t / ps] * ps + t % ps) * Hkv + g) * D; };
      std::vector<double> s(vis.size());
      double m = -INFINITY, sum = 0;
      for (size_t i = 0; i < vis.size(); ++i) {
        double x = 0;
        for (int d = 0; d < D; ++d) x += (double)q[(b * Hq + h) * D + d] * k[at(vis[i]) + d];
        s[i] = x * scale;
        m = std::max(m, s[i]);
      }
      for (size_t i = 0; i < vis.size(); ++i) {
        const double p = std::exp(s[i] - m);
        sum += p;
        for (int d = 0; d < D; ++d) want[(b * Hq + h) * D + d] += p * v[at(vis[i]) + d];
      }
      for (int d = 0; d < D; ++d) want[(b * Hq + h) * D + d] /= sum > 0 ? sum : 1;
    }
  using namespace sqz::cuda::squeezed_kernels;
  Args a{};
  // two contexts over the same arrays, attending topC and topC / 2 + 1 clusters; odd sequences take
  // the second, the last one no prefix (dense)
  const int table[12] = {0, 0, 0, C, Pc, topC, 0, 0, 0, C, Pc, top2};
  std::vector<int> cof(B);
  for (int b = 0; b < B; ++b) cof[b] = b % 2;
  a.pt = pt.data(); a.lens = lens.data(); a.pre = pre.data(); a.cen = cen.data(); a.cs = cs.data(); a.ct = ct.data();
  a.cof = cof.data(); a.table = table; a.n_contexts = 2;
  a.cen_len = (int64_t)cen.size(); a.cs_len = (int64_t)cs.size(); a.ct_len = (int64_t)ct.size();
  a.pages = pages; a.ps = ps; a.Hkv = Hkv; a.maxp = maxp; a.G = G; a.Hq = Hq; a.D = D;
  a.max_clusters = C;
  a.scale = scale;
  // attend: the per-head kernel, and the grouped one (one block per kv head), its 16-byte path where D % 8 == 0
  const int GP = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
  // select once (its flags do not depend on the attend variant or the splits; each attend gets a copy)
  std::vector<unsigned char> selected((size_t)B * Hq * a.max_clusters, 7);  // poisoned: select must write every flag it reads
  a.flags = selected.data();
  emu::run(dim3(Hq, B), dim3(kSelThreads), [&] { select_kernel<float>(q.data(), a); });
  for (const int variant : {0, 1, 2}) {
    if (variant == 2 && D % 8 != 0) continue;
    for (const int S : splits) {
      a.S = S;
      std::vector<unsigned char> flags = selected;
      std::vector<float> part((size_t)B * Hq * S * (D + 2), NAN);
      a.flags = flags.data();
      a.part = part.data();
      std::vector<float> got((size_t)B * Hq * D, NAN);
      if (variant == 0) {
        emu::run(dim3(Hq, B, S), dim3(kThreads), [&] { attend_kernel<float>(q.data(), k.data(), v.data(), a); });
      } else {
        auto grouped = [&](auto gp) {
          constexpr int kGP = decltype(gp)::value;
          emu::run(dim3(Hkv, B, S), dim3(kThreads), [&] {
            if (variant == 2) attend_group_kernel<float, kGP, true>(q.data(), k.data(), v.data(), a);
            else attend_group_kernel<float, kGP, false>(q.data(), k.data(), v.data(), a);
          });
        };
        if (GP == 1) grouped(std::integral_constant<int, 1>{});
        else if (GP == 2) grouped(std::integral_constant<int, 2>{});
        else if (GP == 4) grouped(std::integral_constant<int, 4>{});
        else grouped(std::integral_constant<int, 8>{});
      }
      emu::run(dim3(Hq, B), dim3(kThreads), [&] { combine_kernel<float>(got.data(), a); });
      char name[200];
      std::snprintf(name, sizeof name, "squeezed %s B=%d Hq=%d Hkv=%d D=%d context %d, %d clusters, top %d, %d splits",
                    variant == 0 ? "per-head" : variant == 1 ? "grouped" : "grouped 16-byte", B, Hq, Hkv, D, Pc, C, topC, S);
      report(name, rel(got, want), 1e-5);
    }
  }
}

int main() {
  std::mt19937 r(12345);
  lora_case<float, false>(r, 7, 64, 48);
  lora_case<float, false>(r, 3, 257, 1500);
  lora_case<float, true>(r, 7, 64, 48);
  lora_case<float, true>(r, 3, 264, 1504);
  lora_case<__half, true>(r, 13, 1032, 520);
  lora_case<__half, false>(r, 5, 101, 37);
  squeezed_case(r, 3, 4, 2, 40, 61, 7, 3, {1, 3});
  squeezed_case(r, 2, 8, 2, 64, 200, 33, 9);
  squeezed_case(r, 2, 2, 1, 130, 50, 50, 50);
  squeezed_case(r, 2, 4, 4, 16, 20, 5, 0);
  squeezed_case(r, 2, 12, 4, 64, 90, 9, 4, {2});   // G = 3 (padded to 4 heads)
  squeezed_case(r, 1, 8, 1, 256, 70, 6, 2, {2});   // G = 8, D = 256: one token per warp load
  squeezed_case(r, 2, 8, 2, 64, 200, 33, 10, {2}, 4);  // tied scores: 4 distinct centroids, the cut inside a tie
  std::printf("emu: %d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
