#include "kvquant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "core/parallel.h"
#include "vec.h"

namespace sqz::cpu {
namespace {

using kvq::Cache;
using kvq::Calib;

struct Rec {
  uint8_t* kc;
  uint8_t* vc;
  uint8_t* meta;
};

Rec record(const Cache& c, const int32_t* pt, int64_t max_pages, int64_t b, int64_t pos, int64_t h) {
  const int64_t page = pt[b * max_pages + pos / c.page_size];
  const int64_t slot = (page * c.page_size + pos % c.page_size) * c.kv_heads + h;
  const int64_t cb = kvq::code_bytes(c.head_dim, c.bits), mb = kvq::meta_bytes(c.nk, c.nv, c.mode);
  return {c.k_codes.ptr<uint8_t>() + slot * cb, c.v_codes.ptr<uint8_t>() + slot * cb,
          c.meta.ptr<uint8_t>() + slot * mb};
}

// Sink store row of sequence b of a call (-1: none usable).
int64_t sink_row(const Cache& c, int64_t b) {
  const int64_t r = c.sink_rows.storage ? c.sink_rows.ptr<int32_t>()[b] : b;
  return r >= 0 && r < c.sink_k.dim(0) ? r : -1;
}

// Picks the n best channels by score (ties to the lower channel); chosen[] marks them.
void top_n(const float* score, int d, int n, int* idx, std::vector<char>& chosen) {
  std::fill(chosen.begin(), chosen.end(), 0);
  for (int r = 0; r < n; ++r) {
    int best = -1;
    for (int i = 0; i < d; ++i) {
      if (chosen[i]) continue;
      if (best < 0 || kvq::beats(score[i], i, score[best], best)) best = i;
    }
    idx[r] = best;
    chosen[best] = 1;
  }
}

// Per-token quantization of one vector (values; keys in the per-token ablation): the n entries
// largest in magnitude become outliers (idx, chosen), the others set the range, rounded to fp16 as
// it is stored, and codes[element(i)] is the codebook entry nearest x[i] in that range.
template <class Element>
std::pair<float, float> quantize_per_token(const float* x, int d, int n, const float* cb, int ncb, float* score, int* idx,
                                           std::vector<char>& chosen, int* codes, Element element) {
  for (int i = 0; i < d; ++i) score[i] = std::fabs(x[i]);
  top_n(score, d, n, idx, chosen);
  float mn = std::numeric_limits<float>::infinity(), mx = -mn;
  for (int i = 0; i < d; ++i)
    if (!chosen[i]) { mn = std::fmin(mn, x[i]); mx = std::fmax(mx, x[i]); }
  const float lo = half_to_float(float_to_half(mn)), hi = half_to_float(float_to_half(mx));
  for (int i = 0; i < d; ++i) codes[element(i)] = kvq::nearest_code(kvq::normalize(x[i], lo, hi), cb, ncb);
  return {lo, hi};
}

void put_half(uint8_t* p, float v) {
  uint16_t h = float_to_half(v);
  std::memcpy(p, &h, 2);
}
float get_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

void pack(uint8_t* row, int64_t bytes, const int* codes, int d, int bits) {
  std::memset(row, 0, bytes);
  for (int e = 0; e < d; ++e) {
    int bit = e * bits;
    unsigned w = (unsigned)codes[e] << (bit & 7);
    row[bit >> 3] |= (uint8_t)(w & 0xff);
    if ((bit & 7) + bits > 8) row[(bit >> 3) + 1] |= (uint8_t)(w >> 8);
  }
}

// A record's exact outliers over its dequantized key (kout) and value (vout; either may be null),
// channels clamped into the vector.
void put_outliers(const Cache& c, const Rec& r, float* kout, float* vout) {
  const int d = (int)c.head_dim;
  const uint8_t* kval = r.meta + 4;
  const uint8_t* vval = kval + 2 * c.nk;
  const uint8_t* kidx = vval + 2 * c.nv;
  const uint8_t* vidx = kidx + c.nk;
  if (kout)
    for (int s = 0; s < c.nk; ++s) kout[std::min<int>(kidx[s], d - 1)] = get_half(kval + 2 * s);
  if (vout)
    for (int s = 0; s < c.nv; ++s) vout[std::min<int>(vidx[s], d - 1)] = get_half(vval + 2 * s);
}

// Dequantizes one record: keys (pre-RoPE) and values, natural channel order.
void unpack(const Cache& c, const float* lo, const float* hi, const float* kcb, const float* vcb, const Rec& r,
            float* kout, float* vout) {
  const int d = (int)c.head_dim;
  if (c.mode & kvq::KeyPerToken) {
    const uint8_t* kr = r.meta + kvq::key_range_offset(c.nk, c.nv);
    const float klo = get_half(kr), khi = get_half(kr + 2);
    for (int ch = 0; ch < d; ++ch) kout[ch] = kvq::dequant(klo, khi, kvq::book_entry(kcb[kvq::get_code(r.kc, kvq::key_element(ch, d), c.bits)]));
  } else {
    for (int ch = 0; ch < d; ++ch)
      kout[ch] = kvq::dequant(lo[ch], hi[ch], kvq::book_entry(kcb[kvq::get_code(r.kc, kvq::key_element(ch, d), c.bits)]));
  }
  const float vlo = get_half(r.meta), vhi = get_half(r.meta + 2);
  for (int ch = 0; ch < d; ++ch) vout[ch] = kvq::dequant(vlo, vhi, kvq::book_entry(vcb[kvq::get_code(r.vc, ch, c.bits)]));
  put_outliers(c, r, kout, vout);
}

// Codes of a packed row, element order (the per-token-key ablation's keys), read a byte (2, 4 bits)
// or three bytes (3 bits: 8 codes) at a time; the generic bit reader takes what is left.
void row_codes(const uint8_t* row, int d, int bits, uint8_t* codes) {
  int e = 0;
  if (bits == 4) {
    for (; e + 2 <= d; e += 2) { codes[e] = row[e >> 1] & 15; codes[e + 1] = row[e >> 1] >> 4; }
  } else if (bits == 2) {
    for (; e + 4 <= d; e += 4) {
      const unsigned b = row[e >> 2];
      codes[e] = b & 3; codes[e + 1] = (b >> 2) & 3; codes[e + 2] = (b >> 4) & 3; codes[e + 3] = b >> 6;
    }
  } else if (bits == 3) {
    for (; e + 8 <= d; e += 8) {
      const uint8_t* p = row + 3 * (e >> 3);
      const unsigned w = p[0] | (unsigned)p[1] << 8 | (unsigned)p[2] << 16;
      for (int k = 0; k < 8; ++k) codes[e + k] = (w >> (3 * k)) & 7;
    }
  }
  for (; e < d; ++e) codes[e] = (uint8_t)kvq::get_code(row, e, bits);
}

// The dequantized entries of every kv head through tables, made once per call: the same arithmetic
// as unpack, each (channel, code) or (token, code) value computed once instead of once per element.
struct Tables {
  int d = 0, ncb = 0;
  std::vector<float> kcb, vcb;  // codebook entries at fp16 precision
  std::vector<float> key;       // [kv head][channel][code]: lo + (hi - lo) * 0.5 * (cb + 1) (mode 0)
  Tables(const Cache& c, const float* lo, const float* hi, const float* kcb_, const float* vcb_)
      : d((int)c.head_dim), ncb(1 << c.bits), kcb(ncb), vcb(ncb) {
    for (int e = 0; e < ncb; ++e) { kcb[e] = kvq::book_entry(kcb_[e]); vcb[e] = kvq::book_entry(vcb_[e]); }
    if (c.mode & kvq::KeyPerToken) return;
    const int64_t n = c.kv_heads * d;  // channels of every head, lo/hi laid out alike
    key.resize((size_t)(n * ncb));
    for (int64_t ch = 0; ch < n; ++ch)
      for (int e = 0; e < ncb; ++e) key[(size_t)(ch * ncb + e)] = kvq::dequant(lo[ch], hi[ch], kcb[e]);
  }
};

// unpack() through the tables (the same values, bit for bit), the key and the value apart. `codes`
// (d bytes) and `tok` (2^bits floats) are the caller's scratch. The codes of the common cases are read
// straight from their bytes as they are looked up: a row_codes pass first made the op 1.2-1.5x slower
// (2,048 tokens, 8 heads x 128: 2.15-2.34 against 1.52-1.88 ms, alternating builds).
void unpack_key_fast(const Cache& c, const Tables& t, int64_t h, const Rec& r, uint8_t* codes, float* tok, float* kout) {
  const int d = t.d, ncb = t.ncb;
  if (c.mode & kvq::KeyPerToken) {
    row_codes(r.kc, d, c.bits, codes);
    const uint8_t* kr = r.meta + kvq::key_range_offset(c.nk, c.nv);
    const float klo = get_half(kr), khi = get_half(kr + 2);
    for (int e = 0; e < ncb; ++e) tok[e] = kvq::dequant(klo, khi, t.kcb[e]);
    for (int ch = 0; ch < d; ++ch) kout[ch] = tok[codes[kvq::key_element(ch, d)]];
    put_outliers(c, r, kout, nullptr);
    return;
  }
  // stream element 2i is channel i, 2i + 1 channel i + d/2
  const int half = d / 2;
  const float* lo_tab = t.key.data() + (size_t)(h * d * ncb);
  const float* hi_tab = lo_tab + (size_t)half * ncb;
  int i = 0;
  if (c.bits == 4) {  // byte i: channel i in the low nibble, channel i + d/2 in the high one
    for (; i < half; ++i) {
      const unsigned b = r.kc[i];
      kout[i] = lo_tab[i * 16 + (b & 15)];
      kout[i + half] = hi_tab[i * 16 + (b >> 4)];
    }
  } else if (c.bits == 2) {  // byte i/2, bits 4(i%2)..: channel i, then channel i + d/2
    for (; i < half; ++i) {
      const unsigned b = (unsigned)r.kc[i >> 1] >> (4 * (i & 1));
      kout[i] = lo_tab[i * 4 + (b & 3)];
      kout[i + half] = hi_tab[i * 4 + ((b >> 2) & 3)];
    }
  } else {  // 3-bit: 8 codes in 3 bytes (elements 8g..8g+7: channels 4g..4g+3 and their partners)
    for (; 8 * (i / 4) + 8 <= d && i + 4 <= half; i += 4) {
      const uint8_t* p = r.kc + 3 * (i / 4);
      const unsigned w = p[0] | (unsigned)p[1] << 8 | (unsigned)p[2] << 16;
      for (int k = 0; k < 4; ++k) {
        kout[i + k] = lo_tab[(i + k) * 8 + ((w >> (6 * k)) & 7)];
        kout[i + k + half] = hi_tab[(i + k) * 8 + ((w >> (6 * k + 3)) & 7)];
      }
    }
  }
  for (; i < half; ++i) {  // what the byte readers leave (head dims not a multiple of 8)
    kout[i] = lo_tab[i * ncb + kvq::get_code(r.kc, 2 * i, c.bits)];
    kout[i + half] = hi_tab[i * ncb + kvq::get_code(r.kc, 2 * i + 1, c.bits)];
  }
  put_outliers(c, r, kout, nullptr);
}

void unpack_value_fast(const Cache& c, const Tables& t, const Rec& r, float* tok, float* vout) {
  const int d = t.d, ncb = t.ncb;
  const float vlo = get_half(r.meta), vhi = get_half(r.meta + 2);
  for (int e = 0; e < ncb; ++e) tok[e] = kvq::dequant(vlo, vhi, t.vcb[e]);
  int ch = 0;
  if (c.bits == 4) {
    for (; ch + 2 <= d; ch += 2) {
      const unsigned b = r.vc[ch >> 1];
      vout[ch] = tok[b & 15];
      vout[ch + 1] = tok[b >> 4];
    }
  } else if (c.bits == 2) {
    for (; ch + 4 <= d; ch += 4) {
      const unsigned b = r.vc[ch >> 2];
      vout[ch] = tok[b & 3];
      vout[ch + 1] = tok[(b >> 2) & 3];
      vout[ch + 2] = tok[(b >> 4) & 3];
      vout[ch + 3] = tok[b >> 6];
    }
  } else {  // 3-bit: 8 codes in 3 bytes
    for (; ch + 8 <= d; ch += 8) {
      const uint8_t* p = r.vc + 3 * (ch / 8);
      const unsigned w = p[0] | (unsigned)p[1] << 8 | (unsigned)p[2] << 16;
      for (int k = 0; k < 8; ++k) vout[ch + k] = tok[(w >> (3 * k)) & 7];
    }
  }
  for (; ch < d; ++ch) vout[ch] = tok[kvq::get_code(r.vc, ch, c.bits)];
  put_outliers(c, r, nullptr, vout);
}

// cos/sin of (position t, pair i), (float)t * freq[i], as [t][cos of every pair, sin of every pair],
// kept between calls: every layer and every
// decode step asks for the same table, one position longer each step. It grows to the next power of
// two of the positions asked for (at most kMaxRopeTable entries), and a call holds the version it
// read, so a longer one made meanwhile never moves its data.
constexpr int64_t kMaxRopeTable = int64_t(1) << 22;
std::shared_ptr<const std::vector<float>> rope_table(const float* freq, int64_t half, int64_t len) {
  struct Cached {
    std::vector<float> freq;
    int64_t len = 0;
    std::shared_ptr<const std::vector<float>> table;
  };
  static std::mutex mu;
  static Cached cached;
  std::lock_guard<std::mutex> lock(mu);
  const bool same = (int64_t)cached.freq.size() == half && std::equal(cached.freq.begin(), cached.freq.end(), freq);
  if (same && cached.len >= len) return cached.table;
  int64_t cap = 1;
  while (cap < len) cap <<= 1;
  if (cap * half > kMaxRopeTable) cap = len;
  auto table = std::make_shared<std::vector<float>>((size_t)(cap * half * 2));
  int64_t from = 0;
  if (same && cached.table) {  // keep what was computed
    std::copy(cached.table->begin(), cached.table->end(), table->begin());
    from = cached.len;
  }
  float* tp = table->data();
  parallel_for(cap - from, 64, [&](int64_t a, int64_t b) {
    for (int64_t t = from + a; t < from + b; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const float ang = (float)t * freq[i];
        tp[(size_t)(t * half * 2 + i)] = std::cos(ang);
        tp[(size_t)(t * half * 2 + half + i)] = std::sin(ang);
      }
  });
  cached.freq.assign(freq, freq + half);
  cached.len = cap;
  cached.table = table;
  return cached.table;
}

std::vector<int64_t> row_sequences(const Tensor& cu_q, int64_t n_rows) {
  const int32_t* cu = cu_q.ptr<int32_t>();
  const int64_t B = cu_q.dim(0) - 1;
  std::vector<int64_t> seq(n_rows, -1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = cu[b]; r < cu[b + 1]; ++r)
      if (r >= 0 && r < n_rows) seq[r] = b;
  return seq;
}

}  // namespace

namespace {

// Rows to append: element i of head h of row n of k lives at k[n * stride + h * D + i], of v at
// v[n * stride + h * D + i].
struct Rows {
  const void* k;
  const void* v;
  DType dtype;
  int64_t n, stride;
  const int32_t* positions = nullptr;  // with inv_freq: rotate keys (post-RoPE mode)
  const float* inv_freq = nullptr;
};

// RoPE of one head vector in place, rounded to dtype dt (the numerics of ropeAppend).
void rotate_rounded(float* x, int64_t D, float pos, const float* f, DType dt) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = pos * f[i];
    const float cs = std::cos(a), sn = std::sin(a);
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cs - x2 * sn;
    x[i + half] = x2 * cs + x1 * sn;
  }
  std::vector<char> tmp((size_t)D * dtype_size(dt));
  convert_from_float(x, tmp.data(), dt, (size_t)D);
  convert_to_float(tmp.data(), dt, x, (size_t)D);
}

void append_rows(const Cache& c, const Calib& cal, const Rows& src, const Tensor& page_table, const Tensor& seq_lens,
                 const Tensor& cu_q) {
  const int64_t N = src.n, H = c.kv_heads, D = c.head_dim, max_pages = page_table.dim(1);
  const int32_t* pt = page_table.ptr<int32_t>();
  const int32_t* lens = seq_lens.ptr<int32_t>();
  const int32_t* cu = cu_q.ptr<int32_t>();
  const std::vector<int64_t> seq = row_sequences(cu_q, N);
  const float* klo = cal.key_lo.ptr<float>();
  const float* khi = cal.key_hi.ptr<float>();
  const float* kcb = cal.key_cb.ptr<float>();
  const float* vcb = cal.val_cb.ptr<float>();
  const int ncb = 1 << c.bits;
  const bool per_token = (c.mode & kvq::KeyPerToken) != 0;
  const int64_t cbytes = kvq::code_bytes(D, c.bits), mbytes = kvq::meta_bytes(c.nk, c.nv, c.mode);
  const int64_t pages = c.k_codes.dim(0);
  parallel_for(N * H, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> kx(D), vx(D), score(D);
    std::vector<int> codes(D), kidx(c.nk + 1), vidx(c.nv + 1);
    std::vector<char> chosen(D);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / H, h = it % H, b = seq[n];
      if (b < 0) continue;
      const int64_t pos = lens[b] - (cu[b + 1] - cu[b]) + (n - cu[b]);
      if (pos < 0 || pos / c.page_size >= max_pages) continue;
      const int64_t page = pt[b * max_pages + pos / c.page_size];
      if (page < 0 || page >= pages) continue;
      for (int64_t i = 0; i < D; ++i) {
        kx[i] = load_as_float(src.k, src.dtype, n * src.stride + h * D + i);
        vx[i] = load_as_float(src.v, src.dtype, n * src.stride + h * D + i);
      }
      if (src.inv_freq) rotate_rounded(kx.data(), D, (float)src.positions[n], src.inv_freq, src.dtype);
      const int64_t srow = pos < c.sink ? sink_row(c, b) : -1;
      if (srow >= 0) {
        for (int64_t i = 0; i < D; ++i) {
          const int64_t o = ((srow * c.sink + pos) * H + h) * D + i;
          c.sink_k.ptr<uint16_t>()[o] = float_to_half(kx[i]);
          c.sink_v.ptr<uint16_t>()[o] = float_to_half(vx[i]);
        }
      }
      Rec r = record(c, pt, max_pages, b, pos, h);
      std::memset(r.meta, 0, mbytes);
      if (per_token) {
        // keys: per token-head vector, like values
        const auto [lo16, hi16] = quantize_per_token(kx.data(), (int)D, c.nk, kcb, ncb, score.data(), kidx.data(), chosen,
                                                     codes.data(), [&](int i) { return kvq::key_element(i, (int)D); });
        uint8_t* kr = r.meta + kvq::key_range_offset(c.nk, c.nv);
        put_half(kr, lo16);
        put_half(kr + 2, hi16);
      } else {
        // keys: per channel against the calibrated bounds
        const float* lo = klo + h * D;
        const float* hi = khi + h * D;
        for (int i = 0; i < D; ++i) {
          const float x = kvq::normalize(kx[i], lo[i], hi[i]);
          const int code = kvq::nearest_code(x, kcb, ncb);
          score[i] = kvq::key_loss(kx[i], lo[i], hi[i], kvq::book_entry(kcb[code]));
          codes[kvq::key_element(i, (int)D)] = code;
        }
        top_n(score.data(), (int)D, c.nk, kidx.data(), chosen);
      }
      pack(r.kc, cbytes, codes.data(), (int)D, c.bits);
      // values: per token, min/max without the outliers
      const auto [vlo, vhi] = quantize_per_token(vx.data(), (int)D, c.nv, vcb, ncb, score.data(), vidx.data(), chosen,
                                                 codes.data(), [](int i) { return i; });
      pack(r.vc, cbytes, codes.data(), (int)D, c.bits);
      put_half(r.meta, vlo);
      put_half(r.meta + 2, vhi);
      uint8_t* kval = r.meta + 4;
      uint8_t* vval = kval + 2 * c.nk;
      uint8_t* ki = vval + 2 * c.nv;
      uint8_t* vi = ki + c.nk;
      for (int s = 0; s < c.nk; ++s) { put_half(kval + 2 * s, kx[kidx[s]]); ki[s] = (uint8_t)kidx[s]; }
      for (int s = 0; s < c.nv; ++s) { put_half(vval + 2 * s, vx[vidx[s]]); vi[s] = (uint8_t)vidx[s]; }
    }
  });
}

}  // namespace

void kvq_append(const Cache& c, const Calib& cal, const Tensor& k, const Tensor& v, const Tensor& page_table,
                const Tensor& seq_lens, const Tensor& cu_q) {
  append_rows(c, cal, Rows{k.data(), v.data(), k.dtype, k.dim(0), c.kv_heads * c.head_dim}, page_table, seq_lens, cu_q);
}

void kvq_rope_append(const Tensor* q_out, const Cache& c, const Calib& cal, const Tensor& qkv, const Tensor& positions,
                     const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q,
                     bool rotate_keys) {
  const int64_t N = qkv.dim(0), H = c.kv_heads, D = c.head_dim, width = qkv.dim(1), Hq = width / D - 2 * H;
  const int32_t* pos = positions.ptr<int32_t>();
  const float* f = inv_freq.ptr<float>();
  if (q_out) {
    const Tensor qo = *q_out;
    parallel_for(N * Hq, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> x(D);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t n = it / Hq, h = it % Hq;
        for (int64_t i = 0; i < D; ++i) x[i] = load_as_float(qkv.data(), qkv.dtype, n * width + h * D + i);
        rotate_rounded(x.data(), D, (float)pos[n], f, qkv.dtype);
        for (int64_t i = 0; i < D; ++i) store_from_float(qo.data(), qo.dtype, (n * Hq + h) * D + i, x[i]);
      }
    });
  }
  const size_t es = dtype_size(qkv.dtype);
  Rows src{static_cast<const char*>(qkv.data()) + Hq * D * es, static_cast<const char*>(qkv.data()) + (Hq + H) * D * es,
           qkv.dtype, N, width};
  if (rotate_keys) {
    src.positions = pos;
    src.inv_freq = f;
  }
  append_rows(c, cal, src, page_table, seq_lens, cu_q);
}

void kvq_dequantize(const Tensor& k_out, const Tensor& v_out, const Cache& c, const Calib& cal,
                    const Tensor& page_table, int64_t seq, int64_t sink_row_index) {
  const int64_t L = k_out.dim(0), H = c.kv_heads, D = c.head_dim, max_pages = page_table.dim(1);
  const int32_t* pt = page_table.ptr<int32_t>();
  parallel_for(L * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> kb(D), vb(D);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t t = it / H, h = it % H;
      const int64_t srow = t < c.sink && sink_row_index >= 0 && sink_row_index < c.sink_k.dim(0) ? sink_row_index : -1;
      if (srow >= 0) {
        for (int64_t i = 0; i < D; ++i) {
          const int64_t o = ((srow * c.sink + t) * H + h) * D + i;
          kb[i] = half_to_float(c.sink_k.ptr<uint16_t>()[o]);
          vb[i] = half_to_float(c.sink_v.ptr<uint16_t>()[o]);
        }
      } else {
        unpack(c, cal.key_lo.ptr<float>() + h * D, cal.key_hi.ptr<float>() + h * D, cal.key_cb.ptr<float>(),
               cal.val_cb.ptr<float>(), record(c, pt, max_pages, seq, t, h), kb.data(), vb.data());
      }
      for (int64_t i = 0; i < D; ++i) {
        store_from_float(k_out.data(), k_out.dtype, it * D + i, kb[i]);
        store_from_float(v_out.data(), v_out.dtype, it * D + i, vb[i]);
      }
    }
  });
}

void kvq_attention(const Tensor& out, const Tensor& q, const Cache& c, const Calib& cal, const Tensor& page_table,
                   const Tensor& seq_lens, const Tensor& cu_q, const Tensor& inv_freq, float scale) {
  const int64_t N = q.dim(0), Hq = q.dim(1), H = c.kv_heads, D = c.head_dim, g = Hq / H, half = D / 2;
  const int64_t max_pages = page_table.dim(1);
  const int32_t* pt = page_table.ptr<int32_t>();
  const int32_t* lens = seq_lens.ptr<int32_t>();
  const int32_t* cu = cu_q.ptr<int32_t>();
  const float* freq = inv_freq.ptr<float>();
  const std::vector<int64_t> seq = row_sequences(cu_q, N);
  // cos/sin of every (position, pair), shared with the calls before where that table is small.
  int64_t max_len = 0;
  for (int64_t n = 0; n < N; ++n)
    if (seq[n] >= 0) {
      const int64_t b = seq[n];
      max_len = std::max<int64_t>(max_len, lens[b] - (cu[b + 1] - cu[b]) + (n - cu[b]) + 1);
    }
  std::shared_ptr<const std::vector<float>> held;
  if (max_len > 0 && max_len * half <= kMaxRopeTable) held = rope_table(freq, half, max_len);
  const float* table = held ? held->data() : nullptr;
  const vec::Loops& V = vec::loops();
  const Tables tabs(c, cal.key_lo.ptr<float>(), cal.key_hi.ptr<float>(), cal.key_cb.ptr<float>(), cal.val_cb.ptr<float>());
  parallel_for(N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf((size_t)(g * D)), sc, acc((size_t)(g * D)), kb(D), vb(D), krow(D), tok(tabs.ncb);
    std::vector<uint8_t> codes(D);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / H, h = it % H, b = seq[n];
      const int64_t pos = b < 0 ? -1 : lens[b] - (cu[b + 1] - cu[b]) + (n - cu[b]);
      const int64_t L = pos + 1;
      if (L <= 0) {  // no keys: zero output
        for (int64_t j = 0; j < g; ++j)
          for (int64_t i = 0; i < D; ++i) store_from_float(out.data(), out.dtype, (n * Hq + h * g + j) * D + i, 0.f);
        continue;
      }
      // Two passes over the records, one row at a time (no [L, D] copies of the keys and values):
      // the rotated keys give every query head's scores and their maxima, then the values are
      // summed with the softmax weights, each head's sums in token order.
      const int64_t srow = sink_row(c, b);
      const bool has_sink = srow >= 0;
      sc.resize((size_t)(g * L));
      for (int64_t j = 0; j < g; ++j)
        for (int64_t i = 0; i < D; ++i) qf[(size_t)(j * D + i)] = load_as_float(q.data(), q.dtype, (n * Hq + h * g + j) * D + i);
      std::vector<float> m((size_t)g, -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < L; ++t) {
        if (t < c.sink && has_sink) {
          for (int64_t i = 0; i < D; ++i) kb[i] = half_to_float(c.sink_k.ptr<uint16_t>()[((srow * c.sink + t) * H + h) * D + i]);
        } else {
          unpack_key_fast(c, tabs, h, record(c, pt, max_pages, b, t, h), codes.data(), tok.data(), kb.data());
        }
        float* kr = krow.data();
        if (table) {  // contiguous cos and sin rows: the loop vectorises (the same products and sums)
          const float* cs = table + (size_t)(t * half * 2);
          const float* sn = cs + half;
          for (int64_t i = 0; i < half; ++i) {
            kr[i] = kb[i] * cs[i] - kb[i + half] * sn[i];
            kr[i + half] = kb[i + half] * cs[i] + kb[i] * sn[i];
          }
        } else {
          for (int64_t i = 0; i < half; ++i) {
            const float ang = (float)t * freq[i];
            const float cs = std::cos(ang), sn = std::sin(ang);
            kr[i] = kb[i] * cs - kb[i + half] * sn;
            kr[i + half] = kb[i + half] * cs + kb[i] * sn;
          }
        }
        for (int64_t j = 0; j < g; ++j) {
          const float sj = V.dot(&qf[(size_t)(j * D)], kr, D) * scale;
          sc[(size_t)(j * L + t)] = sj;
          m[(size_t)j] = std::fmax(m[(size_t)j], sj);
        }
      }
      std::vector<float> l((size_t)g, 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        if (t < c.sink && has_sink) {
          for (int64_t i = 0; i < D; ++i) vb[i] = half_to_float(c.sink_v.ptr<uint16_t>()[((srow * c.sink + t) * H + h) * D + i]);
        } else {
          unpack_value_fast(c, tabs, record(c, pt, max_pages, b, t, h), tok.data(), vb.data());
        }
        for (int64_t j = 0; j < g; ++j) {
          const float p = std::exp(sc[(size_t)(j * L + t)] - m[(size_t)j]);
          l[(size_t)j] += p;
          V.axpy(&acc[(size_t)(j * D)], p, vb.data(), D);
        }
      }
      for (int64_t j = 0; j < g; ++j)
        for (int64_t i = 0; i < D; ++i)
          store_from_float(out.data(), out.dtype, (n * Hq + h * g + j) * D + i, acc[(size_t)(j * D + i)] / l[(size_t)j]);
    }
  });
}

}  // namespace sqz::cpu
