// argmax and sample on the CPU. The order of candidates is (logit descending, index
// ascending); probability mass is integer (see kernels/common/random.h), so top-k, top-p
// and the draw are exact and the CUDA kernel, which finds the same cut points by radix
// search instead of sorting, picks the same token.
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/parallel.h"
#include "elementwise.h"
#include "kernels/common/random.h"

namespace sqz::cpu {
namespace {

int32_t argmax_row(const float* l, int64_t v) {
  uint32_t best = rnd::order_key(l[0]);
  int64_t bi = 0;
  for (int64_t j = 1; j < v; ++j) {
    const uint32_t k = rnd::order_key(l[j]);
    if (k > best) best = k, bi = j;  // strict: ties keep the lower index
  }
  return (int32_t)bi;
}

int32_t sample_row(const float* l, int64_t v, float temp, int32_t top_k, float top_p, uint32_t* rng) {
  const uint64_t seed = rng[0], counter = rng[1];
  rng[1] = (uint32_t)(counter + 1);
  const int32_t greedy = argmax_row(l, v);
  const float lmax = l[greedy];
  if (!(temp > 0.f) || !std::isfinite(lmax)) return greedy;

  std::vector<uint32_t> key(v);
  std::vector<uint64_t> q(v);
  for (int64_t j = 0; j < v; ++j) {
    key[j] = rnd::order_key(l[j]);
    const float e = std::exp((l[j] - lmax) / temp);
    q[j] = key[j] == 0 ? 0 : (uint64_t)((double)e * rnd::kMassScale);
  }
  const int64_t k = (top_k <= 0 || top_k >= v) ? v : top_k;
  std::vector<int32_t> order(v);
  for (int64_t j = 0; j < v; ++j) order[j] = (int32_t)j;
  auto before = [&](int32_t a, int32_t b) { return key[a] != key[b] ? key[a] > key[b] : a < b; };
  if (k < v) {
    std::partial_sort(order.begin(), order.begin() + k, order.end(), before);
  } else {
    std::sort(order.begin(), order.end(), before);
  }
  uint64_t mass = 0;
  for (int64_t j = 0; j < k; ++j) mass += q[order[j]];
  int64_t n = k;  // kept prefix length
  if (top_p < 1.f) {
    // Smallest prefix whose mass >= top_p of the kept mass, in integers (double is exact
    // enough and rounds the same on the GPU).
    uint64_t target = (uint64_t)std::ceil((double)top_p * (double)mass);
    target = std::min(std::max(target, (uint64_t)1), mass);
    uint64_t cum = 0;
    for (int64_t j = 0; j < k; ++j) {
      cum += q[order[j]];
      if (cum >= target) { n = j + 1; break; }
    }
    mass = cum;
  }
  const uint32_t u = (uint32_t)(rnd::hash2(seed, counter) >> 32);
  const uint64_t r = rnd::scale_draw(mass, u);  // in [0, mass)
  uint64_t cum = 0;
  for (int64_t j = 0; j < n; ++j) {
    cum += q[order[j]];
    if (cum > r) return order[j];
  }
  return order[n - 1];  // not reached: r < mass, the cum after the last kept token
}

void logits_row(const Tensor& logits, int64_t b, int64_t v, std::vector<float>& buf) {
  buf.resize(v);
  convert_to_float(static_cast<const char*>(logits.data()) + (size_t)(b * v) * dtype_size(logits.dtype),
                   logits.dtype, buf.data(), v);
}

}  // namespace

void argmax(const Tensor& out, const Tensor& logits) {
  const int64_t bsz = out.numel(), v = logits.dim(-1);
  int32_t* o = out.ptr<int32_t>();
  parallel_for(bsz, 1, [&](int64_t b, int64_t e) {
    std::vector<float> row;
    for (int64_t i = b; i < e; ++i) {
      logits_row(logits, i, v, row);
      o[i] = argmax_row(row.data(), v);
    }
  });
}

void sample(const Tensor& out, const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
            const Tensor& top_p, const Tensor& rng) {
  const int64_t bsz = out.numel(), v = logits.dim(-1);
  int32_t* o = out.ptr<int32_t>();
  const float* t = temperature.ptr<float>();
  const int32_t* k = top_k.ptr<int32_t>();
  const float* p = top_p.ptr<float>();
  uint32_t* r = rng.ptr<uint32_t>();
  parallel_for(bsz, 1, [&](int64_t b, int64_t e) {
    std::vector<float> row;
    for (int64_t i = b; i < e; ++i) {
      logits_row(logits, i, v, row);
      o[i] = sample_row(row.data(), v, t[i], k[i], p[i], r + 2 * i);
    }
  });
}

}  // namespace sqz::cpu
