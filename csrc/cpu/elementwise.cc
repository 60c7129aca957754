#include "elementwise.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "core/parallel.h"
#include "kernels/common/random.h"

namespace sqz::cpu {
namespace {

// Rows are converted to fp32 scratch once, worked on, and converted back: one dtype switch
// per row instead of per element, and the inner loops vectorise.
struct RowBuf {
  std::vector<float> v;
  float* get(size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};

const char* row_ptr(const Tensor& t, int64_t row, int64_t width) {
  return static_cast<const char*>(t.data()) + (size_t)(row * width) * dtype_size(t.dtype);
}
char* row_ptr_mut(const Tensor& t, int64_t row, int64_t width) {
  return static_cast<char*>(t.data()) + (size_t)(row * width) * dtype_size(t.dtype);
}

// Rows of `out` from `src` picked by idx; an index outside [0, rows) gives a zero row.
void gather(const Tensor& out, const Tensor& src, const Tensor& idx) {
  const int64_t n = idx.numel(), rows = src.dim(0), h = out.numel() / (n ? n : 1);
  const int32_t* id = idx.ptr<int32_t>();
  parallel_for(n, 16, [&](int64_t b, int64_t e) {
    RowBuf buf;
    for (int64_t i = b; i < e; ++i) {
      int64_t r = id[i];
      char* dst = row_ptr_mut(out, i, h);
      if (r < 0 || r >= rows) {
        std::memset(dst, 0, (size_t)h * dtype_size(out.dtype));  // +0.0 in every float dtype
      } else if (out.dtype == src.dtype) {
        std::memcpy(dst, row_ptr(src, r, h), (size_t)h * dtype_size(out.dtype));
      } else {
        float* f = buf.get(h);
        convert_to_float(row_ptr(src, r, h), src.dtype, f, h);
        convert_from_float(f, dst, out.dtype, h);
      }
    }
  });
}

// y = x * rsqrt(mean(x^2) + eps) * w in fp32, rounded once into out's dtype.
void norm_row(const float* x, const float* w, float* y, int64_t h, float eps) {
  float ss = 0.f;
  for (int64_t j = 0; j < h; ++j) ss += x[j] * x[j];
  const float inv = 1.0f / std::sqrt(ss / (float)h + eps);
  for (int64_t j = 0; j < h; ++j) y[j] = x[j] * inv * w[j];
}

std::vector<float> to_float_vec(const Tensor& t) {
  std::vector<float> v(t.numel());
  convert_to_float(t.data(), t.dtype, v.data(), v.size());
  return v;
}

// Flat elementwise loops over chunks, through fp32.
template <class F>
void chunked(int64_t n, F&& f) {
  parallel_for(n, 1 << 14, [&](int64_t b, int64_t e) {
    RowBuf ba, bb;
    constexpr int64_t C = 4096;
    for (int64_t s = b; s < e; s += C) f(s, std::min(C, e - s), ba, bb);
  });
}

}  // namespace

void embedding(const Tensor& out, const Tensor& ids, const Tensor& table) { gather(out, table, ids); }
void gather_rows(const Tensor& out, const Tensor& x, const Tensor& index) { gather(out, x, index); }

void rms_norm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps) {
  const int64_t h = x.dim(-1), t = x.numel() / h;
  const std::vector<float> w = to_float_vec(weight);
  parallel_for(t, 4, [&](int64_t b, int64_t e) {
    RowBuf bx, by;
    float* fx = bx.get(h);
    float* fy = by.get(h);
    for (int64_t r = b; r < e; ++r) {
      convert_to_float(row_ptr(x, r, h), x.dtype, fx, h);
      norm_row(fx, w.data(), fy, h, eps);
      convert_from_float(fy, row_ptr_mut(out, r, h), out.dtype, h);
    }
  });
}

void add_rms_norm(const Tensor& residual, const Tensor& x, const Tensor& out, const Tensor& weight, float eps) {
  const int64_t h = x.dim(-1), t = x.numel() / h;
  const std::vector<float> w = to_float_vec(weight);
  parallel_for(t, 4, [&](int64_t b, int64_t e) {
    RowBuf br, bx, by;
    float* fr = br.get(h);
    float* fx = bx.get(h);
    float* fy = by.get(h);
    for (int64_t r = b; r < e; ++r) {
      char* rp = row_ptr_mut(residual, r, h);
      convert_to_float(rp, residual.dtype, fr, h);
      convert_to_float(row_ptr(x, r, h), x.dtype, fx, h);
      for (int64_t j = 0; j < h; ++j) fr[j] += fx[j];
      // The norm reads the residual as stored (rounded to its dtype), as the model does.
      convert_from_float(fr, rp, residual.dtype, h);
      convert_to_float(rp, residual.dtype, fr, h);
      norm_row(fr, w.data(), fy, h, eps);
      convert_from_float(fy, row_ptr_mut(out, r, h), out.dtype, h);
    }
  });
}

void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq) {
  const int64_t t = x.dim(0), heads = x.dim(1), d = x.dim(2), half = d / 2;
  const int32_t* pos = positions.ptr<int32_t>();
  const float* f = inv_freq.ptr<float>();
  parallel_for(t, 1, [&](int64_t b, int64_t e) {
    RowBuf bc, bs, bx;
    float* c = bc.get(half);
    float* s = bs.get(half);
    float* v = bx.get(d);
    for (int64_t r = b; r < e; ++r) {
      // fp32 angle, then fp32 cos/sin: what transformers computes (positions reach 1M, so
      // the angle's rounding matters and must match the CUDA kernel's).
      const float p = (float)pos[r];
      for (int64_t i = 0; i < half; ++i) {
        const float a = p * f[i];
        c[i] = std::cos(a);
        s[i] = std::sin(a);
      }
      for (int64_t hh = 0; hh < heads; ++hh) {
        char* xp = row_ptr_mut(x, r * heads + hh, d);
        convert_to_float(xp, x.dtype, v, d);
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i], x2 = v[i + half];
          v[i] = x1 * c[i] - x2 * s[i];
          v[i + half] = x2 * c[i] + x1 * s[i];
        }
        convert_from_float(v, xp, x.dtype, d);
      }
    }
  });
}

void silu_mul(const Tensor& out, const Tensor& gate_up) {
  const int64_t i2 = gate_up.dim(-1), inter = i2 / 2, t = gate_up.numel() / i2;
  parallel_for(t, 4, [&](int64_t b, int64_t e) {
    RowBuf bg, by;
    float* g = bg.get(i2);
    float* y = by.get(inter);
    for (int64_t r = b; r < e; ++r) {
      convert_to_float(row_ptr(gate_up, r, i2), gate_up.dtype, g, i2);
      for (int64_t j = 0; j < inter; ++j) {
        const float a = g[j];
        y[j] = a / (1.0f + std::exp(-a)) * g[inter + j];
      }
      convert_from_float(y, row_ptr_mut(out, r, inter), out.dtype, inter);
    }
  });
}

void add(const Tensor& out, const Tensor& a, const Tensor& b) {
  const size_t ea = dtype_size(a.dtype), eb = dtype_size(b.dtype), eo = dtype_size(out.dtype);
  if (b.numel() != out.numel()) {
    // b is one row repeated over out's rows (a bias): read it once, add it to every row.
    const int64_t h = b.numel(), rows = out.numel() / h;
    std::vector<float> fb((size_t)h);
    convert_to_float(b.data(), b.dtype, fb.data(), h);
    parallel_for(rows, 4, [&](int64_t r0, int64_t r1) {
      RowBuf buf;
      float* fa = buf.get(h);
      for (int64_t r = r0; r < r1; ++r) {
        convert_to_float(row_ptr(a, r, h), a.dtype, fa, h);
        for (int64_t j = 0; j < h; ++j) fa[j] += fb[(size_t)j];
        convert_from_float(fa, row_ptr_mut(out, r, h), out.dtype, h);
      }
    });
    return;
  }
  chunked(out.numel(), [&](int64_t s, int64_t n, RowBuf& x, RowBuf& y) {
    float* fa = x.get(n);
    float* fb = y.get(n);
    convert_to_float(static_cast<const char*>(a.data()) + s * ea, a.dtype, fa, n);
    convert_to_float(static_cast<const char*>(b.data()) + s * eb, b.dtype, fb, n);
    for (int64_t i = 0; i < n; ++i) fa[i] += fb[i];
    convert_from_float(fa, static_cast<char*>(out.data()) + s * eo, out.dtype, n);
  });
}

void cast(const Tensor& out, const Tensor& x) {
  if (out.dtype == x.dtype) {
    std::memmove(out.data(), x.data(), x.nbytes());
    return;
  }
  const size_t ex = dtype_size(x.dtype), eo = dtype_size(out.dtype);
  chunked(out.numel(), [&](int64_t s, int64_t n, RowBuf& bx, RowBuf&) {
    float* f = bx.get(n);
    convert_to_float(static_cast<const char*>(x.data()) + s * ex, x.dtype, f, n);
    convert_from_float(f, static_cast<char*>(out.data()) + s * eo, out.dtype, n);
  });
}

namespace {
template <class T>
void fill_as(const Tensor& t, T v) {
  T* p = t.ptr<T>();
  parallel_for(t.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) p[i] = v;
  });
}
}  // namespace

void fill(const Tensor& t, double value) {
  switch (t.dtype) {
    case DType::F32: fill_as<float>(t, (float)value); break;
    case DType::F16: fill_as<uint16_t>(t, float_to_half((float)value)); break;
    case DType::BF16: fill_as<uint16_t>(t, float_to_bf16((float)value)); break;
    case DType::I32: fill_as<int32_t>(t, (int32_t)value); break;
    case DType::U32: fill_as<uint32_t>(t, (uint32_t)value); break;
    case DType::I8: fill_as<int8_t>(t, (int8_t)value); break;
    case DType::U8: fill_as<uint8_t>(t, (uint8_t)value); break;
  }
}

void fill_random(const Tensor& t, uint64_t seed, float mean, float std) {
  const DType dt = t.dtype;
  void* p = t.data();
  parallel_for(t.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      // Box-Muller on two 24-bit uniforms of element i's own hash (the CUDA kernel does
      // exactly this per element).
      const uint64_t h = rnd::hash2(seed, (uint64_t)i);
      const float u1 = rnd::uniform24_open0(h), u2 = rnd::uniform24(h);
      const float n = std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853071795864f * u2);
      store_from_float(p, dt, (size_t)i, mean + std * n);
    }
  });
}

void fill_random_int(const Tensor& t, uint64_t seed) {
  const size_t es = dtype_size(t.dtype);
  char* p = static_cast<char*>(t.data());
  parallel_for(t.numel(), 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint64_t h = rnd::hash2(seed, (uint64_t)i);
      if (es == 4) {
        const uint32_t v = (uint32_t)(h >> 32);
        std::memcpy(p + i * 4, &v, 4);
      } else {
        p[i] = (char)(uint8_t)(h >> 56);
      }
    }
  });
}

}  // namespace sqz::cpu
