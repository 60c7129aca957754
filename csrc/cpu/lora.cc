#include "lora.h"

#include <vector>

#include "core/parallel.h"
#include "vec.h"

namespace sqz::cpu {

void lora_apply(const Tensor& y, const Tensor& x, const Tensor& slots, const Tensor& a, const Tensor& bt,
                const Tensor& desc, const Tensor& scale) {
  const int64_t T = x.dim(0), K = x.dim(1), N = y.dim(1), R = a.dim(0), S = desc.dim(0);
  if (T == 0 || N == 0) return;
  const int32_t* sl = slots.ptr<int32_t>();
  const int32_t* d = desc.ptr<int32_t>();
  const float* sc = scale.ptr<float>();
  const size_t xs = dtype_size(x.dtype), ys = dtype_size(y.dtype), as = dtype_size(a.dtype), bs = dtype_size(bt.dtype);
  const vec::Loops& L = vec::loops();
  parallel_for(T, 1, [&](int64_t b, int64_t e) {
    std::vector<float> fx(K), fy(N), row(K > N ? K : N), tmp;
    for (int64_t t = b; t < e; ++t) {
      const int32_t s = sl[t];
      if (s < 0 || s >= S) continue;
      const int64_t off = d[2 * s], rank = d[2 * s + 1];
      if (off < 0 || rank <= 0 || rank > kLoraMaxRank || off + rank > R) continue;
      convert_to_float(static_cast<const char*>(x.data()) + (size_t)(t * K) * xs, x.dtype, fx.data(), (size_t)K);
      tmp.assign((size_t)rank, 0.f);
      for (int64_t j = 0; j < rank; ++j) {
        convert_to_float(static_cast<const char*>(a.data()) + (size_t)((off + j) * K) * as, a.dtype, row.data(), (size_t)K);
        tmp[(size_t)j] = L.dot(row.data(), fx.data(), K) * sc[s];
      }
      char* yr = static_cast<char*>(y.data()) + (size_t)(t * N) * ys;
      convert_to_float(yr, y.dtype, fy.data(), (size_t)N);
      for (int64_t j = 0; j < rank; ++j) {
        convert_to_float(static_cast<const char*>(bt.data()) + (size_t)((off + j) * N) * bs, bt.dtype, row.data(), (size_t)N);
        L.axpy(fy.data(), tmp[(size_t)j], row.data(), N);
      }
      convert_from_float(fy.data(), yr, y.dtype, (size_t)N);
    }
  });
}

}  // namespace sqz::cpu
