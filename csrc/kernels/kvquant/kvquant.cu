// KVQuant paged cache kernels: quantize-and-append, split-KV decode attention over the
// packed cache (dequantize + RoPE on the fly, outliers, fp16 sink), and unpacking.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/cuda_stream.h"
#include "core/error.h"
#include "kvquant.h"

namespace sqz::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 32;  // tokens dequantized into shared memory at a time

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float half_bits(const uint8_t* p) {
  return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

struct Geo {
  uint8_t* kc;
  uint8_t* vc;
  uint8_t* meta;
  uint16_t* sink_k;
  uint16_t* sink_v;
  const float* key_lo;
  const float* key_hi;
  const float* key_cb;
  const float* val_cb;
  const int* pt;
  const int* lens;
  const int* cu;
  const int* sink_rows;  // null: row b
  int sink_row_fixed;    // >= 0: every sequence uses this row (kvq_dequantize)
  int B, max_pages, page_size, H, D, bits, nk, nv, sink, cbytes, mbytes, pages;
};

Geo make_geo(const kvq::Cache& c, const kvq::Calib& cal, const Tensor& pt, const Tensor* lens, const Tensor* cu) {
  Geo g;
  g.kc = c.k_codes.ptr<uint8_t>();
  g.vc = c.v_codes.ptr<uint8_t>();
  g.meta = c.meta.ptr<uint8_t>();
  g.sink_k = c.sink > 0 ? c.sink_k.ptr<uint16_t>() : nullptr;
  g.sink_v = c.sink > 0 ? c.sink_v.ptr<uint16_t>() : nullptr;
  g.key_lo = cal.key_lo.ptr<float>();
  g.key_hi = cal.key_hi.ptr<float>();
  g.key_cb = cal.key_cb.ptr<float>();
  g.val_cb = cal.val_cb.ptr<float>();
  g.pt = pt.ptr<int>();
  g.lens = lens ? lens->ptr<int>() : nullptr;
  g.cu = cu ? cu->ptr<int>() : nullptr;
  g.sink_rows = c.sink_rows.storage ? c.sink_rows.ptr<int>() : nullptr;
  g.sink_row_fixed = -1;
  g.pages = (int)c.k_codes.dim(0);
  g.B = (int)pt.dim(0);
  g.max_pages = (int)pt.dim(1);
  g.page_size = (int)c.page_size;
  g.H = (int)c.kv_heads;
  g.D = (int)c.head_dim;
  g.bits = c.bits;
  g.nk = c.nk;
  g.nv = c.nv;
  g.sink = c.sink;
  g.cbytes = (int)kvq::code_bytes(c.head_dim, c.bits);
  g.mbytes = (int)kvq::meta_bytes(c.nk, c.nv);
  return g;
}

// Sink store row of sequence b of the call.
__device__ __forceinline__ int sink_row(const Geo& g, int b) {
  return g.sink_row_fixed >= 0 ? g.sink_row_fixed : (g.sink_rows ? g.sink_rows[b] : b);
}

__device__ __forceinline__ long long slot_of(const Geo& g, int b, int pos, int h) {
  const long long page = g.pt[(long long)b * g.max_pages + pos / g.page_size];
  return (page * g.page_size + pos % g.page_size) * g.H + h;
}

// Sequence of query row n (-1 if none) and its position; one thread.
__device__ void row_position(const Geo& g, int n, int* b_out, int* pos_out) {
  int b = -1;
  for (int i = 0; i < g.B; ++i)
    if (n >= g.cu[i] && n < g.cu[i + 1]) { b = i; break; }
  *b_out = b;
  *pos_out = b < 0 ? -1 : g.lens[b] - (g.cu[b + 1] - g.cu[b]) + (n - g.cu[b]);
}

// Best unchosen channel by (score, lower index), block-wide; every thread gets the result.
__device__ int block_argmax(const float* score, const char* chosen, int d, int* red_i) {
  float bs = -INFINITY;
  int bi = -1;
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    if (!chosen[i] && (bi < 0 || kvq::beats(score[i], i, bs, bi))) { bs = score[i]; bi = i; }
  for (int o = 16; o > 0; o >>= 1) {
    float os = __shfl_xor_sync(0xffffffffu, bs, o);
    int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi >= 0 && (bi < 0 || kvq::beats(os, oi, bs, bi))) { bs = os; bi = oi; }
  }
  __shared__ float red_s[32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) { red_s[warp] = bs; red_i[warp] = bi; }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = red_s[0];
    int i = red_i[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
      if (red_i[w] >= 0 && (i < 0 || kvq::beats(red_s[w], red_i[w], s, i))) { s = red_s[w]; i = red_i[w]; }
    red_i[32] = i;
  }
  __syncthreads();
  const int r = red_i[32];
  __syncthreads();
  return r;
}

__device__ void pack_row(uint8_t* row, const uint8_t* codes, int d, int bits, int nbytes) {
  for (int j = threadIdx.x; j < nbytes; j += blockDim.x) {
    unsigned byte = 0;
    const int e0 = (8 * j) / bits, e1 = min(d - 1, (8 * j + 7) / bits);
    for (int e = e0; e <= e1; ++e) {
      const int sh = e * bits - 8 * j;
      byte |= sh >= 0 ? ((unsigned)codes[e] << sh) : ((unsigned)codes[e] >> (-sh));
    }
    row[j] = (uint8_t)(byte & 0xffu);
  }
}

// Rows to append: head h of row n of k at k[n * stride + h * D], of v likewise. With q_out, the
// G query heads of kv head h (at q[n * stride + (h * G + j) * D]) are rotated into q_out; with
// rotate, keys are rotated before they are quantized (post-RoPE mode). Rotation: fp32 angle
// pos * invFreq, sincosf, products rounded separately, result rounded to T (ropeAppend's).
template <class T> struct Src {
  const T* k;
  const T* v;
  long long stride;
  const T* q;
  T* q_out;
  int G;
  const int* pos;
  const float* inv_freq;
  int rotate;
};

template <class T>
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c, float s, float* y1, float* y2) {
  *y1 = to_f(from_f<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s))));
  *y2 = to_f(from_f<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s))));
}

template <class T>
__global__ void __launch_bounds__(kThreads) append_kernel(Geo g, Src<T> src) {
  __shared__ float kx[256], vx[256], score[256], cs[256];
  __shared__ uint8_t codes[256];
  __shared__ char chosen[256];
  __shared__ int red_i[33], kidx[16], vidx[16], bp[2];
  const int n = blockIdx.x, h = blockIdx.y, D = g.D, tid = threadIdx.x, half = D / 2;
  if (tid == 0) row_position(g, n, &bp[0], &bp[1]);
  if (src.q_out || src.rotate) {
    const float ps = (float)src.pos[n];
    for (int i = tid; i < half; i += blockDim.x) {
      const float a = ps * src.inv_freq[i];
      float sn, cn;
      sincosf(a, &sn, &cn);
      cs[i] = cn;
      cs[half + i] = sn;
    }
  }
  __syncthreads();
  if (src.q_out)
    for (int e = tid; e < src.G * half; e += blockDim.x) {
      const int j = e / half, i = e % half;
      const T* x = src.q + (long long)n * src.stride + (long long)(h * src.G + j) * D;
      float y1, y2;
      rotate_pair<T>(to_f(x[i]), to_f(x[i + half]), cs[i], cs[half + i], &y1, &y2);
      T* o = src.q_out + ((long long)n * g.H * src.G + h * src.G + j) * D;
      o[i] = from_f<T>(y1);
      o[i + half] = from_f<T>(y2);
    }
  const int b = bp[0], pos = bp[1];
  if (b < 0 || pos < 0 || pos / g.page_size >= g.max_pages) return;
  const int page = g.pt[(long long)b * g.max_pages + pos / g.page_size];
  if (page < 0 || page >= g.pages) return;
  const long long base = (long long)n * src.stride + (long long)h * D;
  if (src.rotate) {
    for (int i = tid; i < half; i += blockDim.x)
      rotate_pair<T>(to_f(src.k[base + i]), to_f(src.k[base + i + half]), cs[i], cs[half + i], &kx[i], &kx[i + half]);
  } else {
    for (int i = tid; i < D; i += blockDim.x) kx[i] = to_f(src.k[base + i]);
  }
  for (int i = tid; i < D; i += blockDim.x) {
    vx[i] = to_f(src.v[base + i]);
    chosen[i] = 0;
  }
  __syncthreads();
  const int srow = sink_row(g, b);
  if (pos < g.sink && srow >= 0)
    for (int i = tid; i < D; i += blockDim.x) {
      const long long o = (((long long)srow * g.sink + pos) * g.H + h) * D + i;
      g.sink_k[o] = __half_as_ushort(__float2half_rn(kx[i]));
      g.sink_v[o] = __half_as_ushort(__float2half_rn(vx[i]));
    }
  const long long slot = slot_of(g, b, pos, h);
  uint8_t* kc = g.kc + slot * g.cbytes;
  uint8_t* vc = g.vc + slot * g.cbytes;
  uint8_t* meta = g.meta + slot * g.mbytes;
  const int ncb = 1 << g.bits;
  // keys
  const float* lo = g.key_lo + (long long)h * D;
  const float* hi = g.key_hi + (long long)h * D;
  for (int i = tid; i < D; i += blockDim.x) {
    const float x = kvq::normalize(kx[i], lo[i], hi[i]);
    score[i] = fabsf(x);
    codes[kvq::key_element(i, D)] = (uint8_t)kvq::nearest_code(x, g.key_cb, ncb);
  }
  __syncthreads();
  for (int r = 0; r < g.nk; ++r) {
    const int i = block_argmax(score, chosen, D, red_i);
    if (tid == 0) { kidx[r] = i; chosen[i] = 1; }
    __syncthreads();
  }
  pack_row(kc, codes, D, g.bits, g.cbytes);
  __syncthreads();
  // values
  for (int i = tid; i < D; i += blockDim.x) { score[i] = fabsf(vx[i]); chosen[i] = 0; }
  __syncthreads();
  for (int r = 0; r < g.nv; ++r) {
    const int i = block_argmax(score, chosen, D, red_i);
    if (tid == 0) { vidx[r] = i; chosen[i] = 1; }
    __syncthreads();
  }
  float mn = INFINITY, mx = -INFINITY;
  for (int i = tid; i < D; i += blockDim.x)
    if (!chosen[i]) { mn = fminf(mn, vx[i]); mx = fmaxf(mx, vx[i]); }
  for (int o = 16; o > 0; o >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  __shared__ float mn_s[32], mx_s[32];
  if ((tid & 31) == 0) { mn_s[tid >> 5] = mn; mx_s[tid >> 5] = mx; }
  __syncthreads();
  mn = mn_s[0];
  mx = mx_s[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) { mn = fminf(mn, mn_s[w]); mx = fmaxf(mx, mx_s[w]); }
  const __half lo16 = __float2half_rn(mn), hi16 = __float2half_rn(mx);
  const float vlo = __half2float(lo16), vhi = __half2float(hi16);
  for (int i = tid; i < D; i += blockDim.x)
    codes[i] = (uint8_t)kvq::nearest_code(kvq::normalize(vx[i], vlo, vhi), g.val_cb, ncb);
  __syncthreads();
  pack_row(vc, codes, D, g.bits, g.cbytes);
  // metadata
  for (int j = tid; j < g.mbytes; j += blockDim.x) {
    uint8_t byte = 0;
    unsigned short hv = 0;
    int field = -1;  // which fp16 this byte belongs to
    if (j < 4) { hv = __half_as_ushort(j < 2 ? lo16 : hi16); field = j & 1; }
    else if (j < 4 + 2 * g.nk) { hv = __half_as_ushort(__float2half_rn(kx[kidx[(j - 4) >> 1]])); field = j & 1; }
    else if (j < 4 + 2 * (g.nk + g.nv)) {
      hv = __half_as_ushort(__float2half_rn(vx[vidx[(j - 4 - 2 * g.nk) >> 1]]));
      field = j & 1;
    } else if (j < 4 + 2 * (g.nk + g.nv) + g.nk) byte = (uint8_t)kidx[j - 4 - 2 * (g.nk + g.nv)];
    else if (j < 4 + 3 * (g.nk + g.nv)) byte = (uint8_t)vidx[j - 4 - 2 * (g.nk + g.nv) - g.nk];
    if (field >= 0) byte = (uint8_t)(field == 0 ? (hv & 0xff) : (hv >> 8));
    meta[j] = byte;
  }
}

// Dequantizes tokens [t0, t0 + count) of (b, h) into kdst/vdst rows of `stride` floats
// (keys pre-RoPE). Block-wide; ends with a barrier.
__device__ void dequant_tokens(const Geo& g, int b, int h, int t0, int count, float* kdst, float* vdst, int stride) {
  const int D = g.D;
  const float* lo = g.key_lo + (long long)h * D;
  const float* hi = g.key_hi + (long long)h * D;
  for (int e = threadIdx.x; e < count * D; e += blockDim.x) {
    const int t = e / D, c = e % D, pos = t0 + t;
    float kv, vv;
    if (pos < g.sink) {
      const long long o = (((long long)sink_row(g, b) * g.sink + pos) * g.H + h) * D + c;
      kv = __half2float(__ushort_as_half(g.sink_k[o]));
      vv = __half2float(__ushort_as_half(g.sink_v[o]));
    } else {
      const long long slot = slot_of(g, b, pos, h);
      const uint8_t* meta = g.meta + slot * g.mbytes;
      kv = kvq::dequant(lo[c], hi[c], g.key_cb[kvq::get_code(g.kc + slot * g.cbytes, kvq::key_element(c, D), g.bits)]);
      vv = kvq::dequant(half_bits(meta), half_bits(meta + 2), g.val_cb[kvq::get_code(g.vc + slot * g.cbytes, c, g.bits)]);
    }
    kdst[t * stride + c] = kv;
    vdst[t * stride + c] = vv;
  }
  __syncthreads();
  const int ns = g.nk + g.nv;
  for (int e = threadIdx.x; e < count * ns; e += blockDim.x) {
    const int t = e / ns, s = e % ns, pos = t0 + t;
    if (pos < g.sink) continue;
    const uint8_t* meta = g.meta + slot_of(g, b, pos, h) * g.mbytes;
    const uint8_t* idx = meta + 4 + 2 * ns;
    const float val = half_bits(meta + 4 + 2 * s);
    const int c = min((int)idx[s], D - 1);  // a corrupted index never writes outside the row
    if (s < g.nk) kdst[t * stride + c] = val;
    else vdst[t * stride + c] = val;
  }
  __syncthreads();
}

template <class T>
__global__ void dequant_kernel(Geo g, int seq, T* __restrict__ ko, T* __restrict__ vo) {
  __shared__ float ks[256], vs[256];
  const int t = blockIdx.x, h = blockIdx.y;
  dequant_tokens(g, seq, h, t, 1, ks, vs, g.D);
  const long long base = ((long long)t * g.H + h) * g.D;
  for (int c = threadIdx.x; c < g.D; c += blockDim.x) {
    ko[base + c] = from_f<T>(ks[c]);
    vo[base + c] = from_f<T>(vs[c]);
  }
}

// One block per (kv head, query row, split): partial softmax state of its g query heads
// over the split's tokens. part: [rows, Hq, splits, D + 2] (acc..., m, l).
template <class T>
__global__ void __launch_bounds__(kThreads) attn_split_kernel(Geo g, const T* __restrict__ q, const float* __restrict__ inv_freq,
                                                              float scale, int hq_total, int chunk, int splits,
                                                              float* __restrict__ part) {
  extern __shared__ float sm[];
  const int h = blockIdx.x, n = blockIdx.y, split = blockIdx.z, D = g.D, tid = threadIdx.x;
  const int G = hq_total / g.H, ks = D + 1;
  float* q_s = sm;                    // [G][D]
  float* k_s = q_s + G * D;           // [kTile][D + 1]
  float* v_s = k_s + kTile * ks;      // [kTile][D + 1]
  float* p_s = v_s + kTile * ks;      // [G][kTile]
  float* acc_s = p_s + G * kTile;     // [G][D]
  float* m_s = acc_s + G * D;         // [G]
  float* l_s = m_s + G;               // [G]
  float* a_s = l_s + G;               // [G]
  __shared__ int bp[2];
  if (tid == 0) row_position(g, n, &bp[0], &bp[1]);
  for (int e = tid; e < G * D; e += blockDim.x) {
    const int j = e / D, c = e % D;
    q_s[e] = to_f(q[((long long)n * hq_total + h * G + j) * D + c]) * scale;
    acc_s[e] = 0.f;
  }
  for (int j = tid; j < G; j += blockDim.x) { m_s[j] = -INFINITY; l_s[j] = 0.f; }
  __syncthreads();
  const int b = bp[0], L = bp[1] + 1;
  const int t_begin = split * chunk, t_end = min(L, t_begin + chunk);
  const int half = D / 2;
  for (int t0 = t_begin; t0 < t_end; t0 += kTile) {
    const int cnt = min(kTile, t_end - t0);
    dequant_tokens(g, b, h, t0, cnt, k_s, v_s, ks);
    // RoPE on the keys at their positions
    for (int e = tid; e < cnt * half; e += blockDim.x) {
      const int t = e / half, i = e % half;
      float sn, cs;
      sincosf((float)(t0 + t) * inv_freq[i], &sn, &cs);
      float* kr = k_s + t * ks;
      const float a = kr[i], bb = kr[i + half];
      kr[i] = a * cs - bb * sn;
      kr[i + half] = bb * cs + a * sn;
    }
    __syncthreads();
    // scores (q pre-scaled)
    for (int e = tid; e < G * kTile; e += blockDim.x) {
      const int j = e / kTile, t = e % kTile;
      float s = -INFINITY;
      if (t < cnt) {
        s = 0.f;
        const float* qq = q_s + j * D;
        const float* kr = k_s + t * ks;
        for (int i = 0; i < D; ++i) s = fmaf(qq[i], kr[i], s);
      }
      p_s[e] = s;
    }
    __syncthreads();
    // online softmax update per head
    for (int j = tid; j < G; j += blockDim.x) {
      float mx = m_s[j];
      for (int t = 0; t < cnt; ++t) mx = fmaxf(mx, p_s[j * kTile + t]);
      const float alpha = expf(m_s[j] - mx);
      float sum = 0.f;
      for (int t = 0; t < kTile; ++t) {
        const float p = t < cnt ? expf(p_s[j * kTile + t] - mx) : 0.f;
        p_s[j * kTile + t] = p;
        sum += p;
      }
      l_s[j] = l_s[j] * alpha + sum;
      m_s[j] = mx;
      a_s[j] = alpha;
    }
    __syncthreads();
    for (int e = tid; e < G * D; e += blockDim.x) {
      const int j = e / D, c = e % D;
      float acc = acc_s[e] * a_s[j];
      const float* pp = p_s + j * kTile;
      for (int t = 0; t < cnt; ++t) acc = fmaf(pp[t], v_s[t * ks + c], acc);
      acc_s[e] = acc;
    }
    __syncthreads();
  }
  for (int e = tid; e < G * (D + 2); e += blockDim.x) {
    const int j = e / (D + 2), c = e % (D + 2);
    const float val = c < D ? acc_s[j * D + c] : (c == D ? m_s[j] : l_s[j]);
    part[(((long long)n * hq_total + h * G + j) * splits + split) * (D + 2) + c] = val;
  }
}

template <class T>
__global__ void attn_combine_kernel(const float* __restrict__ part, int splits, int D, T* __restrict__ out) {
  const long long row = blockIdx.x;  // n * Hq + head
  const float* p = part + row * splits * (D + 2);
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, p[s * (D + 2) + D]);
  float den = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float m = p[s * (D + 2) + D];
    if (m != -INFINITY) den += p[s * (D + 2) + D + 1] * expf(m - M);
  }
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float num = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float m = p[s * (D + 2) + D];
      if (m != -INFINITY) num += p[s * (D + 2) + c] * expf(m - M);
    }
    out[row * D + c] = from_f<T>(den > 0.f ? num / den : 0.f);
  }
}

// Grow-only workspace for split partials, one per device (sized before graph capture by a
// first call of the same shape).
struct Workspace {
  std::mutex mu;
  void* ptr[64] = {};
  size_t bytes[64] = {};
};
Workspace& workspace() {
  static Workspace w;
  return w;
}
float* partials(int dev, size_t bytes, cudaStream_t stream) {
  Workspace& w = workspace();
  std::lock_guard<std::mutex> lock(w.mu);
  if (dev < 0 || dev >= 64) fail("ERR_DEVICE", "kvqAttention: device index out of range");
  if (w.bytes[dev] < bytes) {
    if (w.ptr[dev]) {
      cuda_check(cudaStreamSynchronize(stream), "kvqAttention workspace");
      cuda_free(dev, w.ptr[dev], w.bytes[dev]);
    }
    size_t nb = bytes + bytes / 2;
    w.ptr[dev] = cuda_alloc(dev, nb);
    w.bytes[dev] = nb;
  }
  return static_cast<float*>(w.ptr[dev]);
}

int sm_count(int dev) {
  static int counts[64] = {};
  if (dev >= 0 && dev < 64 && counts[dev] == 0) {
    int c = 0;
    cuda_check(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev), "kvqAttention");
    counts[dev] = c > 0 ? c : 132;
  }
  return dev >= 0 && dev < 64 ? counts[dev] : 132;
}

// Raises a kernel's dynamic shared memory limit once (to the device's opt-in maximum), so no
// attribute call happens while a graph is being captured after the first eager launch.
void allow_smem(const void* fn, size_t bytes) {
  static std::mutex mu;
  static std::vector<std::pair<const void*, size_t>> done;
  std::lock_guard<std::mutex> lock(mu);
  for (auto& d : done)
    if (d.first == fn && d.second >= bytes) return;
  int dev = 0, optin = 0;
  cuda_check(cudaGetDevice(&dev), "kvqAttention");
  cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "kvqAttention");
  cudaFuncAttributes fa{};
  cuda_check(cudaFuncGetAttributes(&fa, fn), "kvqAttention");
  // the dynamic limit excludes the kernel's static shared memory
  const size_t limit = (size_t)optin > fa.sharedSizeBytes ? (size_t)optin - fa.sharedSizeBytes : 0;
  if (limit < bytes) fail("ERR_UNSUPPORTED", "kvqAttention: needs " + std::to_string(bytes) + " bytes of shared memory per block");
  const cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)limit);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: keep it from being reported by a later launch check
    cuda_check(e, "kvqAttention (shared memory limit)");
  }
  done.emplace_back(fn, limit);
}

// ---------------------------------------------------------------------------------------
// Fast split-KV decode. Block = (chunk of kChunk tokens, query row, group of kv heads).
// Once per block: the slot of every token and a cos/sin table of its positions (sincosf of
// the fp32 angle t*invFreq[i], as the CPU computes it), shared by all heads of the block.
// Per kv head the chunk's packed key/value/meta rows are staged into shared memory with
// cp.async (double-buffered across heads). NLP lanes serve one token, each lane owns 16
// stream elements (8 RoPE pairs of keys, 16 value channels); all query heads of the kv head
// (up to kGC at a time) are served from the same codes. Pass 1: scores; pass 2: exact
// softmax over the chunk (no rescaling); pass 3: values, accumulated in registers as
// sum p*(A + S*cb) = sum p*A + sum (p*S)*cb. Outliers are applied as exact corrections.
namespace fast {
constexpr int kWarps = 4, kGC = 4, kChunk = 64;
template <int D> struct Cfg {
  static constexpr int NL = D / 16;
  static constexpr int NLP = NL <= 4 ? 4 : (NL <= 8 ? 8 : 16);
  static constexpr int TPW = 32 / NLP;
  static constexpr int TPI = kWarps * TPW;
};
__device__ __forceinline__ void cp16(void* s, const void* g) {
  const unsigned sa = (unsigned)__cvta_generic_to_shared(s);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(g));
}
__device__ __forceinline__ void cp4(void* s, const void* g) {
  const unsigned sa = (unsigned)__cvta_generic_to_shared(s);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(sa), "l"(g));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ float sh_half(const uint8_t* p) {
  return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}
// The 16 codes of lane `sub` (stream elements 16*sub .. 16*sub+15) from a staged row.
template <int BITS> __device__ __forceinline__ unsigned long long lane_bits(const uint8_t* row, int sub) {
  if constexpr (BITS == 4) {
    const uint2 w = *reinterpret_cast<const uint2*>(row + 8 * sub);
    return (unsigned long long)w.x | ((unsigned long long)w.y << 32);
  } else if constexpr (BITS == 2) {
    return *reinterpret_cast<const unsigned*>(row + 4 * sub);
  } else {
    const int bit = 48 * sub, w = bit >> 5;
    const unsigned* r = reinterpret_cast<const unsigned*>(row);
    const unsigned long long v = (unsigned long long)r[w] | ((unsigned long long)r[w + 1] << 32);
    return v >> (bit & 31);
  }
}
template <int D, int BITS> struct CodeBytes { static constexpr int value = ((D * BITS + 7) / 8 + 15) / 16 * 16; };

template <class T, int D, int BITS>
__global__ void __launch_bounds__(kWarps * 32) split_kernel(Geo g, const T* __restrict__ q, const float* __restrict__ inv_freq,
                                                            float scale, int hq_total, int splits, int heads_per_block,
                                                            float* __restrict__ part) {
  using C = Cfg<D>;
  constexpr int CB = CodeBytes<D, BITS>::value, HALF = D / 2, MASK = (1 << BITS) - 1;
  extern __shared__ __align__(16) uint8_t smem[];
  float2* cs = reinterpret_cast<float2*>(smem);                    // [kChunk][HALF]
  float* sc = reinterpret_cast<float*>(cs + kChunk * HALF);        // [kGC][kChunk]
  float* red = sc + kGC * kChunk;                                   // [kWarps][kGC][D]
  float* qs = red + kWarps * kGC * D;                               // [kGC][D]
  float* cbk = qs + kGC * D;                                        // [16]
  float* cbv = cbk + 16;                                            // [16]
  float* ml = cbv + 16;                                             // [2][kGC]
  int* slotb = reinterpret_cast<int*>(ml + 2 * kGC);                // [kChunk]
  uint8_t* stage = reinterpret_cast<uint8_t*>(slotb + kChunk);      // 2 x [kb | vb | mb]
  const int MB = g.mbytes, SB = 2 * kChunk * CB + kChunk * MB;
  const int split = blockIdx.x, n = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = lane % C::NLP, j = lane / C::NLP;
  const int G = hq_total / g.H;
  const int h_begin = blockIdx.z * heads_per_block, h_end = min(g.H, h_begin + heads_per_block);
  __shared__ int bp[2];
  if (tid == 0) row_position(g, n, &bp[0], &bp[1]);
  __syncthreads();
  const int b = bp[0], L = bp[1] + 1, t0 = split * kChunk;
  const int cnt = b < 0 ? 0 : max(0, min(kChunk, L - t0));
  if (cnt == 0) {
    for (int h = h_begin; h < h_end; ++h)
      for (int e = tid; e < G * (D + 2); e += blockDim.x) {
        const int gg = e / (D + 2), c = e % (D + 2);
        part[(((long long)n * hq_total + h * G + gg) * splits + split) * (D + 2) + c] = c == D ? -INFINITY : 0.f;
      }
    return;
  }
  for (int tt = tid; tt < cnt; tt += blockDim.x) {
    const int t = t0 + tt;
    slotb[tt] = (int)(((long long)g.pt[(long long)b * g.max_pages + t / g.page_size] * g.page_size + t % g.page_size) * g.H);
  }
  for (int e = tid; e < cnt * HALF; e += blockDim.x) {
    const int tt = e / HALF, i = e % HALF;
    float s, c;
    sincosf(__fmul_rn((float)(t0 + tt), inv_freq[i]), &s, &c);
    cs[e] = make_float2(c, s);
  }
  if (tid < 16) {
    cbk[tid] = tid <= MASK ? g.key_cb[tid] : 0.f;
    cbv[tid] = tid <= MASK ? g.val_cb[tid] : 0.f;
  }
  for (int e = tid; e < kWarps * kGC * D; e += blockDim.x) red[e] = 0.f;
  __syncthreads();
  auto issue = [&](int h, int buf) {
    uint8_t* kb = stage + buf * SB;
    uint8_t* vb = kb + kChunk * CB;
    uint8_t* mb = vb + kChunk * CB;
    constexpr int P = CB / 16;
    for (int e = tid; e < cnt * P; e += blockDim.x) {
      const int tt = e / P, o = (e % P) * 16;
      const long long slot = (long long)slotb[tt] + h;
      cp16(kb + tt * CB + o, g.kc + slot * CB + o);
      cp16(vb + tt * CB + o, g.vc + slot * CB + o);
    }
    const int PM = MB / 4;
    for (int e = tid; e < cnt * PM; e += blockDim.x) {
      const int tt = e / PM, o = (e % PM) * 4;
      cp4(mb + tt * MB + o, g.meta + ((long long)slotb[tt] + h) * MB + o);
    }
    cp_commit();
  };
  issue(h_begin, 0);
  for (int h = h_begin; h < h_end; ++h) {
    const int buf = (h - h_begin) & 1;
    if (h + 1 < h_end) { issue(h + 1, buf ^ 1); cp_wait<1>(); }
    else cp_wait<0>();
    __syncthreads();
    const uint8_t* kb = stage + buf * SB;
    const uint8_t* vb = kb + kChunk * CB;
    const uint8_t* mb = vb + kChunk * CB;
    const float* lo = g.key_lo + (long long)h * D;
    const float* hi = g.key_hi + (long long)h * D;
    for (int g0 = 0; g0 < G; g0 += kGC) {
      const int gc = min(kGC, G - g0);
      for (int e = tid; e < kGC * D; e += blockDim.x) {
        const int gg = e / D, c = e % D;
        qs[e] = gg < gc ? to_f(q[((long long)n * hq_total + h * G + g0 + gg) * D + c]) * scale : 0.f;
      }
      __syncthreads();
      // ---- pass 1: scores
      {
        float ka[16], ks[16], qv[kGC][16];
#pragma unroll
        for (int e = 0; e < 16; ++e) {
          const int p = 8 * sub + (e >> 1), ch = min(D - 1, (e & 1) ? p + HALF : p);
          const float l = lo[ch], hh = hi[ch];
          ks[e] = 0.5f * (hh - l);
          ka[e] = l + ks[e];
#pragma unroll
          for (int gg = 0; gg < kGC; ++gg) qv[gg][e] = qs[gg * D + ch];
        }
        for (int base = warp * C::TPW; base < cnt; base += C::TPI) {
          const int tt = base + j, t = t0 + tt;
          const bool valid = tt < cnt && sub < C::NL;
          float dot[kGC];
#pragma unroll
          for (int gg = 0; gg < kGC; ++gg) dot[gg] = 0.f;
          if (valid) {
            float kk[16];
            if (t < g.sink) {
              const uint16_t* sk = g.sink_k + (((long long)sink_row(g, b) * g.sink + t) * g.H + h) * D;
#pragma unroll
              for (int e = 0; e < 16; ++e) {
                const int p = 8 * sub + (e >> 1);
                kk[e] = __half2float(__ushort_as_half(sk[(e & 1) ? p + HALF : p]));
              }
            } else {
              const unsigned long long bits = lane_bits<BITS>(kb + tt * CB, sub);
#pragma unroll
              for (int e = 0; e < 16; ++e) kk[e] = fmaf(ks[e], cbk[(bits >> (BITS * e)) & MASK], ka[e]);
            }
            const float2* cst = cs + tt * HALF + 8 * sub;
#pragma unroll
            for (int p = 0; p < 8; ++p) {
              const float2 r = cst[p];
              const float x = kk[2 * p], y = kk[2 * p + 1];
              const float xr = x * r.x - y * r.y, yr = y * r.x + x * r.y;
#pragma unroll
              for (int gg = 0; gg < kGC; ++gg) dot[gg] = fmaf(qv[gg][2 * p], xr, fmaf(qv[gg][2 * p + 1], yr, dot[gg]));
            }
          }
#pragma unroll
          for (int o = 1; o < C::NLP; o <<= 1)
#pragma unroll
            for (int gg = 0; gg < kGC; ++gg) dot[gg] += __shfl_xor_sync(0xffffffffu, dot[gg], o);
          if (sub == 0 && tt < cnt) {
            if (t >= g.sink) {
              const uint8_t* m = mb + tt * MB;
              const int ns = g.nk + g.nv;
              for (int s = 0; s < g.nk; ++s) {
                const int c = min((int)m[4 + 2 * ns + s], D - 1);
                const int code = kvq::get_code(kb + tt * CB, kvq::key_element(c, D), BITS);
                const float sc_ = 0.5f * (hi[c] - lo[c]);
                const float delta = sh_half(m + 4 + 2 * s) - fmaf(sc_, cbk[code], lo[c] + sc_);
                const int i = c < HALF ? c : c - HALF;
                const float2 r = cs[tt * HALF + i];
#pragma unroll
                for (int gg = 0; gg < kGC; ++gg) {
                  const float qi = qs[gg * D + i], qj = qs[gg * D + i + HALF];
                  dot[gg] += c < HALF ? delta * (qi * r.x + qj * r.y) : delta * (qj * r.x - qi * r.y);
                }
              }
            }
#pragma unroll
            for (int gg = 0; gg < kGC; ++gg) sc[gg * kChunk + tt] = dot[gg];
          }
        }
      }
      __syncthreads();
      // ---- pass 2: softmax over the chunk, one warp per head
      if (warp < gc) {
        float mx = -INFINITY;
        for (int tt = lane; tt < cnt; tt += 32) mx = fmaxf(mx, sc[warp * kChunk + tt]);
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.f;
        for (int tt = lane; tt < cnt; tt += 32) {
          const float p = expf(sc[warp * kChunk + tt] - mx);
          sc[warp * kChunk + tt] = p;
          sum += p;
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) { ml[warp] = mx; ml[kGC + warp] = sum; }
      }
      __syncthreads();
      // ---- pass 3: values
      {
        float acc[kGC][16], pa[kGC];
#pragma unroll
        for (int gg = 0; gg < kGC; ++gg) {
          pa[gg] = 0.f;
#pragma unroll
          for (int e = 0; e < 16; ++e) acc[gg][e] = 0.f;
        }
        for (int base = warp * C::TPW; base < cnt; base += C::TPI) {
          const int tt = base + j, t = t0 + tt;
          const bool live = tt < cnt;
          float w[kGC];
#pragma unroll
          for (int gg = 0; gg < kGC; ++gg) w[gg] = live ? sc[gg * kChunk + tt] : 0.f;
          float A = 0.f, S = 0.f;
          if (live && t >= g.sink) {
            const float vlo = sh_half(mb + tt * MB), vhi = sh_half(mb + tt * MB + 2);
            S = 0.5f * (vhi - vlo);
            A = vlo + S;
          }
          if (live && sub < C::NL) {
            if (t < g.sink) {
              const uint16_t* sv = g.sink_v + (((long long)sink_row(g, b) * g.sink + t) * g.H + h) * D + 16 * sub;
#pragma unroll
              for (int e = 0; e < 16; ++e) {
                const float v = __half2float(__ushort_as_half(sv[e]));
#pragma unroll
                for (int gg = 0; gg < kGC; ++gg) acc[gg][e] = fmaf(w[gg], v, acc[gg][e]);
              }
            } else {
              const unsigned long long bits = lane_bits<BITS>(vb + tt * CB, sub);
              float ws[kGC];
#pragma unroll
              for (int gg = 0; gg < kGC; ++gg) { pa[gg] = fmaf(w[gg], A, pa[gg]); ws[gg] = w[gg] * S; }
#pragma unroll
              for (int e = 0; e < 16; ++e) {
                const float cv = cbv[(bits >> (BITS * e)) & MASK];
#pragma unroll
                for (int gg = 0; gg < kGC; ++gg) acc[gg][e] = fmaf(ws[gg], cv, acc[gg][e]);
              }
            }
          }
          // value outliers: exact corrections, one token group of the warp at a time
          if (g.nv > 0)
            for (int jj = 0; jj < C::TPW; ++jj) {
              if (j == jj && sub == 0 && live && t >= g.sink) {
                const uint8_t* m = mb + tt * MB;
                const int ns = g.nk + g.nv;
                for (int s = 0; s < g.nv; ++s) {
                  const int c = min((int)m[4 + 2 * ns + g.nk + s], D - 1);
                  const int code = kvq::get_code(vb + tt * CB, c, BITS);
                  const float delta = sh_half(m + 4 + 2 * (g.nk + s)) - fmaf(S, cbv[code], A);
                  for (int gg = 0; gg < gc; ++gg) red[(warp * kGC + gg) * D + c] += w[gg] * delta;
                }
              }
              __syncwarp();
            }
        }
        // reduce the token groups of the warp, then add into the warp's row
#pragma unroll
        for (int o = C::NLP; o < 32; o <<= 1)
#pragma unroll
          for (int gg = 0; gg < kGC; ++gg) {
            pa[gg] += __shfl_xor_sync(0xffffffffu, pa[gg], o);
#pragma unroll
            for (int e = 0; e < 16; ++e) acc[gg][e] += __shfl_xor_sync(0xffffffffu, acc[gg][e], o);
          }
        if (j == 0 && sub < C::NL)
#pragma unroll
          for (int gg = 0; gg < kGC; ++gg)
#pragma unroll
            for (int e = 0; e < 16; ++e) red[(warp * kGC + gg) * D + 16 * sub + e] += acc[gg][e] + pa[gg];
      }
      __syncthreads();
      for (int e = tid; e < gc * (D + 2); e += blockDim.x) {
        const int gg = e / (D + 2), c = e % (D + 2);
        float val;
        if (c < D) {
          val = 0.f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) {
            val += red[(w * kGC + gg) * D + c];
            red[(w * kGC + gg) * D + c] = 0.f;
          }
        } else {
          val = ml[(c - D) * kGC + gg];
        }
        part[(((long long)n * hq_total + h * G + g0 + gg) * splits + split) * (D + 2) + c] = val;
      }
      __syncthreads();
    }
  }
}

// Deterministic combine: block = (query row-head, 32 channels); warps take splits modulo 8.
template <class T>
__global__ void combine_kernel(const float* __restrict__ part, int splits, int D, T* __restrict__ out) {
  extern __shared__ float wsm[];  // [splits] weights, then [8][32] partial sums, [8] dens
  float* red = wsm + splits;
  float* dred = red + 8 * 32;
  __shared__ float Ms;
  const long long row = blockIdx.x;
  const float* p = part + row * splits * (D + 2);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float M = -INFINITY;
  for (int s = tid; s < splits; s += blockDim.x) M = fmaxf(M, p[(long long)s * (D + 2) + D]);
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  if (lane == 0) dred[warp] = M;
  __syncthreads();
  if (tid == 0) {
    float m = dred[0];
    for (int w = 1; w < 8; ++w) m = fmaxf(m, dred[w]);
    Ms = m;
  }
  __syncthreads();
  M = Ms;
  float den = 0.f;
  for (int s = tid; s < splits; s += blockDim.x) {
    const float m = p[(long long)s * (D + 2) + D];
    const float w = m == -INFINITY ? 0.f : expf(m - M);
    wsm[s] = w;
    den = fmaf(p[(long long)s * (D + 2) + D + 1], w, den);
  }
  for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
  __syncthreads();
  if (lane == 0) dred[warp] = den;
  const int c = blockIdx.y * 32 + lane;
  float num = 0.f;
  if (c < D)
    for (int s = warp; s < splits; s += 8) num = fmaf(p[(long long)s * (D + 2) + c], wsm[s], num);
  red[warp * 32 + lane] = num;
  __syncthreads();
  if (warp == 0 && c < D) {
    float tot = 0.f, dt = 0.f;
    for (int w = 0; w < 8; ++w) { tot += red[w * 32 + lane]; dt += dred[w]; }
    out[row * D + c] = from_f<T>(dt > 0.f ? tot / dt : 0.f);
  }
}

template <class T, int D, int BITS>
void launch(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& inv_freq, float scale, int max_seq_len,
            float* work, cudaStream_t stream, int dev, int sms) {
  const int N = (int)q.dim(0), Hq = (int)q.dim(1);
  const int splits = (max_seq_len + kChunk - 1) / kChunk;
  const long long base_blocks = (long long)splits * N;
  int groups = (int)std::min<long long>(g.H, std::max<long long>(1, (3LL * sms + base_blocks - 1) / base_blocks));
  const int hpb = (g.H + groups - 1) / groups;
  groups = (g.H + hpb - 1) / hpb;
  float* part = work ? work : partials(dev, (size_t)N * Hq * splits * (D + 2) * sizeof(float), stream);
  constexpr int CB = CodeBytes<D, BITS>::value;
  const size_t smem = sizeof(float2) * kChunk * (D / 2) + sizeof(float) * (kGC * kChunk + kWarps * kGC * D + kGC * D + 32 + 2 * kGC) +
                      sizeof(int) * kChunk + 2 * ((size_t)2 * kChunk * CB + (size_t)kChunk * g.mbytes) + 16;
  auto kernel = split_kernel<T, D, BITS>;
  allow_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<dim3(splits, N, groups), kWarps * 32, smem, stream>>>(g, static_cast<const T*>(q.data()), inv_freq.ptr<float>(), scale,
                                                                 Hq, splits, hpb, part);
  const size_t csmem = sizeof(float) * ((size_t)splits + 8 * 32 + 8);
  auto ck = combine_kernel<T>;
  if (csmem > 48 * 1024) allow_smem(reinterpret_cast<const void*>(ck), csmem);
  ck<<<dim3(N * Hq, (D + 31) / 32), 256, csmem, stream>>>(part, splits, D, static_cast<T*>(out.data()));
}

template <class T, int D>
void launch_bits(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, int L, float* w, cudaStream_t s, int dev, int sms) {
  if (g.bits == 2) launch<T, D, 2>(out, q, g, f, scale, L, w, s, dev, sms);
  else if (g.bits == 3) launch<T, D, 3>(out, q, g, f, scale, L, w, s, dev, sms);
  else launch<T, D, 4>(out, q, g, f, scale, L, w, s, dev, sms);
}
template <class T>
bool dispatch(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, int L, float* w, cudaStream_t s) {
  const int dev = q.device.index, sms = sm_count(dev);
  if ((int)q.dim(0) == 0) return true;
  switch (g.D) {
    case 64: launch_bits<T, 64>(out, q, g, f, scale, L, w, s, dev, sms); return true;
    case 80: launch_bits<T, 80>(out, q, g, f, scale, L, w, s, dev, sms); return true;
    case 96: launch_bits<T, 96>(out, q, g, f, scale, L, w, s, dev, sms); return true;
    case 128: launch_bits<T, 128>(out, q, g, f, scale, L, w, s, dev, sms); return true;
    case 256: launch_bits<T, 256>(out, q, g, f, scale, L, w, s, dev, sms); return true;
    default: return false;
  }
}
}  // namespace fast

// ---------------------------------------------------------------------------------------
// Flash-decoding over the packed cache (the default kernel).
// Grid = (splits, query rows, kv-head groups). A split covers `sub` consecutive chunks of
// kCH tokens of one row's sequence for a group of kv heads. Per chunk the block computes the
// cos/sin of every (token, RoPE pair) once, shared by all heads of the group; then each warp
// takes work items (kv head, pass over up to GC of its query heads) in turn and streams the
// chunk's packed keys, values and metadata straight from global memory (8/6/4-byte loads per
// lane, the next token's loads issued before the current one is used). NLP lanes serve one
// token, each lane 16 stream elements (8 RoPE pairs of keys, 16 value channels). A pair table
// maps the 2*BITS bits of a key pair (or of two value channels) to both codebook values.
// Online softmax with one running max per warp and query head (rescaled only when it grows);
// values accumulate as sum p*A + sum (p*S)*cb; outliers are exact corrections (keys: into the
// lane's partial dot; values: into shared rows per warp and token group, summed in a fixed
// order, so the results are deterministic). An item's state (acc, m, l) waits in shared memory between chunks; at
// the end each split's partials go to `part` and combine_kernel merges them in a fixed order.
namespace flash {
constexpr int kW = 8, kCH = 64, kStateBytes = 48 * 1024;  // D=256, GC=4 stays under the opt-in limit
template <int D> struct Cfg {
  static constexpr int NL = D / 16;  // lanes with data per token
  static constexpr int NLP = NL <= 4 ? 4 : (NL <= 8 ? 8 : 16);
  static constexpr int TPW = 32 / NLP;  // tokens per warp step
};

struct Plan {
  int groups, hpb, splits, sub, gc, npass;
};

inline int group_chunk(int G) { return G % 4 == 0 ? 4 : (G % 2 == 0 ? 2 : 1); }

Plan plan(int sms, int N, int H, int G, int D, int max_seq_len) {
  Plan p;
  p.gc = group_chunk(G);
  p.npass = G / p.gc;
  const int chunks = std::max(1, (max_seq_len + kCH - 1) / kCH);
  const long long target = 2LL * sms;
  // heads per block: all of them unless the state does not fit or the grid would be too small
  int max_hpb = std::max(1, kStateBytes / (p.npass * p.gc * (D + 2) * 4));
  int groups = (H + std::min(H, max_hpb) - 1) / std::min(H, max_hpb);
  if ((long long)N * chunks * groups < target)
    groups = (int)std::min<long long>(H, std::max<long long>(groups, (target + (long long)N * chunks - 1) / ((long long)N * chunks)));
  p.hpb = (H + groups - 1) / groups;
  p.groups = (H + p.hpb - 1) / p.hpb;
  const long long per = (long long)N * p.groups;
  int splits = (int)std::min<long long>(chunks, std::max<long long>(1, (target + per - 1) / per));
  p.sub = (chunks + splits - 1) / splits;
  p.splits = (chunks + p.sub - 1) / p.sub;
  return p;
}

// The 16 codes of lane `sub` (stream elements 16*sub .. 16*sub+15) from a global row.
template <int BITS> __device__ __forceinline__ unsigned long long lane_codes(const uint8_t* row, int sub) {
  if constexpr (BITS == 4) {
    const uint2 w = __ldg(reinterpret_cast<const uint2*>(row) + sub);
    return (unsigned long long)w.x | ((unsigned long long)w.y << 32);
  } else if constexpr (BITS == 2) {
    return __ldg(reinterpret_cast<const unsigned*>(row) + sub);
  } else {
    const int bit = 48 * sub, w = bit >> 5;
    const unsigned* r = reinterpret_cast<const unsigned*>(row);
    const unsigned long long v = (unsigned long long)__ldg(r + w) | ((unsigned long long)__ldg(r + w + 1) << 32);
    return v >> (bit & 31);
  }
}
__device__ __forceinline__ float ghalf(const uint8_t* p) {
  return __half2float(__ushort_as_half((unsigned short)(__ldg(p) | (__ldg(p + 1) << 8))));
}
__device__ __forceinline__ int gcode(const uint8_t* row, int e, int bits) {
  const int bit = e * bits, byte = bit >> 3, sh = bit & 7;
  unsigned w = __ldg(row + byte);
  if (sh + bits > 8) w |= (unsigned)__ldg(row + byte + 1) << 8;
  return (int)((w >> sh) & ((1u << bits) - 1u));
}

template <int D, int BITS, int GC>
struct Smem {
  static constexpr int HALF = D / 2, PT = 1 << (2 * BITS);
  static constexpr size_t cs = sizeof(float2) * kCH * HALF;
  static constexpr size_t tables = sizeof(float2) * 2 * PT;
  static constexpr size_t qw = sizeof(float2) * kW * HALF * GC;
  static constexpr size_t red = sizeof(float) * kW * Cfg<D>::TPW * GC * D;
  static constexpr size_t slots = sizeof(int) * kCH;
  static size_t bytes(int items) { return cs + tables + qw + red + slots + sizeof(float) * (size_t)items * GC * (D + 2); }
};

template <class T, int D, int BITS, int GC>
__global__ void __launch_bounds__(kW * 32, GC >= 4 ? 1 : 2)
flash_kernel(Geo g, const T* __restrict__ q, const float* __restrict__ inv_freq, float scale, int hq_total, Plan pl,
             float* __restrict__ part) {
  using C = Cfg<D>;
  using S = Smem<D, BITS, GC>;
  constexpr int HALF = D / 2, CB = fast::CodeBytes<D, BITS>::value, PBITS = 2 * BITS, PMASK = (1 << PBITS) - 1;
  extern __shared__ __align__(16) uint8_t smem[];
  float2* cs = reinterpret_cast<float2*>(smem);                     // [kCH][HALF]
  float2* kpt = reinterpret_cast<float2*>(smem + S::cs);            // [PT]
  float2* vpt = kpt + S::PT;                                        // [PT]
  float2* qw = reinterpret_cast<float2*>(smem + S::cs + S::tables);  // [kW][HALF][GC]
  float* red = reinterpret_cast<float*>(smem + S::cs + S::tables + S::qw);  // [kW][TPW][GC][D]
  int* slot_s = reinterpret_cast<int*>(smem + S::cs + S::tables + S::qw + S::red);  // [kCH]
  float* st = reinterpret_cast<float*>(smem + S::cs + S::tables + S::qw + S::red + S::slots);  // [items][GC][D+2]

  const int split = blockIdx.x, n = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = lane % C::NLP, j = lane / C::NLP;
  const bool has = sub < C::NL;
  const int G = hq_total / g.H;
  const int h_begin = blockIdx.z * pl.hpb, h_end = min(g.H, h_begin + pl.hpb);
  const int items = (h_end - h_begin) * pl.npass;
  __shared__ int bp[2];
  if (tid == 0) row_position(g, n, &bp[0], &bp[1]);
  for (int e = tid; e < items * GC * (D + 2); e += blockDim.x) {
    const int c = e % (D + 2);
    st[e] = c == D ? -INFINITY : 0.f;
  }
  for (int e = tid; e < S::PT; e += blockDim.x) {
    kpt[e] = make_float2(g.key_cb[e & ((1 << BITS) - 1)], g.key_cb[e >> BITS]);
    vpt[e] = make_float2(g.val_cb[e & ((1 << BITS) - 1)], g.val_cb[e >> BITS]);
  }
  __syncthreads();
  const int b = bp[0], L = bp[1] + 1;
  const int srow = b >= 0 ? sink_row(g, b) : 0;
  const int nk = g.nk, nv = g.nv, ns = nk + nv, MB = g.mbytes;
  for (int c = 0; c < pl.sub && b >= 0; ++c) {
    const int t0 = (split * pl.sub + c) * kCH;
    const int cnt = max(0, min(kCH, L - t0));
    if (cnt == 0) break;
    for (int tt = tid; tt < cnt; tt += blockDim.x) {
      const int t = t0 + tt;
      slot_s[tt] = (int)(((long long)g.pt[(long long)b * g.max_pages + t / g.page_size] * g.page_size + t % g.page_size) * g.H);
    }
    for (int e = tid; e < cnt * HALF; e += blockDim.x) {
      const int tt = e / HALF, i = e % HALF;
      float s_, c_;
      sincosf(__fmul_rn((float)(t0 + tt), inv_freq[i]), &s_, &c_);
      cs[e] = make_float2(c_, s_);
    }
    __syncthreads();
    for (int it = warp; it < items; it += kW) {
      const int h = h_begin + it / pl.npass, g0 = (it % pl.npass) * GC;
      const int gc = min(GC, G - g0);
      float2* qwr = qw + (size_t)warp * HALF * GC;
      float* rw = red + (size_t)warp * C::TPW * GC * D;  // one row per token group and query head
      float* sti = st + (size_t)it * GC * (D + 2);
      for (int e = lane; e < HALF * GC; e += 32) {
        const int i = e / GC, gg = e % GC;
        float2 v = make_float2(0.f, 0.f);
        if (gg < gc) {
          const T* qq = q + ((long long)n * hq_total + h * G + g0 + gg) * D;
          v = make_float2(to_f(qq[i]) * scale, to_f(qq[i + HALF]) * scale);
        }
        qwr[e] = v;
      }
      for (int e = lane; e < C::TPW * GC * D; e += 32) rw[e] = 0.f;
      // lane's key bounds: pairs 8*sub .. 8*sub+7, channels i and i + HALF
      float ka[16], ksc[16];
      {
        const float* lo = g.key_lo + (long long)h * D;
        const float* hi = g.key_hi + (long long)h * D;
#pragma unroll
        for (int e = 0; e < 16; ++e) {
          const int p = min(HALF - 1, 8 * sub + (e >> 1)), ch = (e & 1) ? p + HALF : p;
          const float l_ = __ldg(lo + ch), s_ = 0.5f * (__ldg(hi + ch) - l_);
          ksc[e] = s_;
          ka[e] = l_ + s_;
        }
      }
      float m[GC], l[GC], pa[GC], acc[GC][16];
#pragma unroll
      for (int gg = 0; gg < GC; ++gg) {
        m[gg] = sti[gg * (D + 2) + D];
        l[gg] = j == 0 ? sti[gg * (D + 2) + D + 1] : 0.f;
        pa[gg] = 0.f;
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[gg][e] = (j == 0 && has) ? sti[gg * (D + 2) + 16 * sub + e] : 0.f;
      }
      __syncwarp();
      // loads of one token for this lane
      auto slot_of_tt = [&](int tt) -> long long { return (long long)slot_s[tt] + h; };
      unsigned long long kb_n = 0, vb_n = 0;
      unsigned mw_n = 0;
      auto load = [&](int tt, unsigned long long& kb, unsigned long long& vb, unsigned& mw) {
        if (tt < cnt && has && t0 + tt >= g.sink) {
          const long long sl = slot_of_tt(tt);
          kb = lane_codes<BITS>(g.kc + sl * CB, sub);
          vb = lane_codes<BITS>(g.vc + sl * CB, sub);
          mw = __ldg(reinterpret_cast<const unsigned*>(g.meta + sl * MB));
        }
      };
      load(j, kb_n, vb_n, mw_n);
      for (int base = 0; base < cnt; base += C::TPW) {
        const int tt = base + j, t = t0 + tt;
        const bool tv = tt < cnt;
        const unsigned long long kb = kb_n, vb = vb_n;
        const unsigned mw = mw_n;
        load(tt + C::TPW, kb_n, vb_n, mw_n);
        const long long sl = tv ? slot_of_tt(tt) : 0;
        const bool sink = t < g.sink;
        float d[GC];
#pragma unroll
        for (int gg = 0; gg < GC; ++gg) d[gg] = 0.f;
        if (tv && has) {
          float kk[16];
          if (sink) {
            const uint16_t* sk = g.sink_k + (((long long)srow * g.sink + t) * g.H + h) * D;
            const uint4 a = *reinterpret_cast<const uint4*>(sk + 8 * sub), bb = *reinterpret_cast<const uint4*>(sk + HALF + 8 * sub);
            const __half* ah = reinterpret_cast<const __half*>(&a);
            const __half* bh = reinterpret_cast<const __half*>(&bb);
#pragma unroll
            for (int p = 0; p < 8; ++p) { kk[2 * p] = __half2float(ah[p]); kk[2 * p + 1] = __half2float(bh[p]); }
          } else {
#pragma unroll
            for (int p = 0; p < 8; ++p) {
              const float2 cb = kpt[(unsigned)(kb >> (PBITS * p)) & PMASK];
              kk[2 * p] = fmaf(ksc[2 * p], cb.x, ka[2 * p]);
              kk[2 * p + 1] = fmaf(ksc[2 * p + 1], cb.y, ka[2 * p + 1]);
            }
          }
          const float2* cst = cs + tt * HALF + 8 * sub;
#pragma unroll
          for (int p = 0; p < 8; ++p) {
            const float2 r = cst[p];
            const float x = kk[2 * p] * r.x - kk[2 * p + 1] * r.y, y = kk[2 * p + 1] * r.x + kk[2 * p] * r.y;
            const float2* qp = qwr + (8 * sub + p) * GC;
#pragma unroll
            for (int gg = 0; gg < GC; ++gg) {
              const float2 qq = qp[gg];
              d[gg] = fmaf(qq.x, x, fmaf(qq.y, y, d[gg]));
            }
          }
        }
        // key outliers: exact corrections, slot s by lane s of the token's group
        if (tv && has && !sink)
          for (int s = sub; s < nk; s += C::NL) {
            const uint8_t* me = g.meta + sl * MB;
            const int ch = min((int)__ldg(me + 4 + 2 * ns + s), D - 1);
            const int code = gcode(g.kc + sl * CB, kvq::key_element(ch, D), BITS);
            const float lo_ = __ldg(g.key_lo + (long long)h * D + ch), sc_ = 0.5f * (__ldg(g.key_hi + (long long)h * D + ch) - lo_);
            const float delta = ghalf(me + 4 + 2 * s) - fmaf(sc_, g.key_cb[code], lo_ + sc_);
            const int i = ch < HALF ? ch : ch - HALF;
            const float2 r = cs[tt * HALF + i];
#pragma unroll
            for (int gg = 0; gg < GC; ++gg) {
              const float2 qq = qwr[i * GC + gg];
              d[gg] += ch < HALF ? delta * (qq.x * r.x + qq.y * r.y) : delta * (qq.y * r.x - qq.x * r.y);
            }
          }
#pragma unroll
        for (int o = 1; o < C::NLP; o <<= 1)
#pragma unroll
          for (int gg = 0; gg < GC; ++gg) d[gg] += __shfl_xor_sync(0xffffffffu, d[gg], o);
        // online softmax: one running max per warp and query head
        float p[GC];
#pragma unroll
        for (int gg = 0; gg < GC; ++gg) {
          const float sc = tv ? d[gg] : -INFINITY;
          float mx = sc;
#pragma unroll
          for (int o = C::NLP; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
          if (mx > m[gg]) {  // warp-uniform
            const float alpha = m[gg] == -INFINITY ? 0.f : __expf(m[gg] - mx);
            l[gg] *= alpha;
            pa[gg] *= alpha;
#pragma unroll
            for (int e = 0; e < 16; ++e) acc[gg][e] *= alpha;
            for (int e = lane; e < C::TPW * D; e += 32) rw[((e / D) * GC + gg) * D + e % D] *= alpha;
            __syncwarp();
            m[gg] = mx;
          }
          p[gg] = tv ? __expf(sc - m[gg]) : 0.f;
          l[gg] += p[gg];
        }
        // values
        float A = 0.f, Sv = 0.f;
        if (tv && !sink) {
          const unsigned short lo16 = (unsigned short)(mw & 0xffffu), hi16 = (unsigned short)(mw >> 16);
          const float vlo = __half2float(__ushort_as_half(lo16)), vhi = __half2float(__ushort_as_half(hi16));
          Sv = 0.5f * (vhi - vlo);
          A = vlo + Sv;
        }
        if (tv && has) {
          if (sink) {
            const uint16_t* sv = g.sink_v + (((long long)srow * g.sink + t) * g.H + h) * D + 16 * sub;
            const uint4 a = *reinterpret_cast<const uint4*>(sv), bb = *reinterpret_cast<const uint4*>(sv + 8);
            const __half* ah = reinterpret_cast<const __half*>(&a);
            const __half* bh = reinterpret_cast<const __half*>(&bb);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              const float v0 = __half2float(ah[e]), v1 = __half2float(bh[e]);
#pragma unroll
              for (int gg = 0; gg < GC; ++gg) {
                acc[gg][e] = fmaf(p[gg], v0, acc[gg][e]);
                acc[gg][8 + e] = fmaf(p[gg], v1, acc[gg][8 + e]);
              }
            }
          } else {
            float w[GC];
#pragma unroll
            for (int gg = 0; gg < GC; ++gg) { pa[gg] = fmaf(p[gg], A, pa[gg]); w[gg] = p[gg] * Sv; }
#pragma unroll
            for (int pp = 0; pp < 8; ++pp) {
              const float2 cb = vpt[(unsigned)(vb >> (PBITS * pp)) & PMASK];
#pragma unroll
              for (int gg = 0; gg < GC; ++gg) {
                acc[gg][2 * pp] = fmaf(w[gg], cb.x, acc[gg][2 * pp]);
                acc[gg][2 * pp + 1] = fmaf(w[gg], cb.y, acc[gg][2 * pp + 1]);
              }
            }
          }
        }
        // value outliers: corrections into the token group's shared rows (the slots of one token
        // are distinct channels, so no two lanes add to one entry)
        if (nv > 0) {
          if (tv && has && !sink)
            for (int s = sub; s < nv; s += C::NL) {
              const uint8_t* me = g.meta + sl * MB;
              const int ch = min((int)__ldg(me + 4 + 2 * ns + nk + s), D - 1);
              const int code = gcode(g.vc + sl * CB, ch, BITS);
              const float delta = ghalf(me + 4 + 2 * (nk + s)) - fmaf(Sv, g.val_cb[code], A);
#pragma unroll
              for (int gg = 0; gg < GC; ++gg) rw[(j * GC + gg) * D + ch] += p[gg] * delta;
            }
          __syncwarp();
        }
      }
      // merge the warp's token groups; save the item's state
#pragma unroll
      for (int o = C::NLP; o < 32; o <<= 1)
#pragma unroll
        for (int gg = 0; gg < GC; ++gg) {
          l[gg] += __shfl_xor_sync(0xffffffffu, l[gg], o);
          pa[gg] += __shfl_xor_sync(0xffffffffu, pa[gg], o);
#pragma unroll
          for (int e = 0; e < 16; ++e) acc[gg][e] += __shfl_xor_sync(0xffffffffu, acc[gg][e], o);
        }
      __syncwarp();
      if (j == 0 && has)
#pragma unroll
        for (int gg = 0; gg < GC; ++gg)
#pragma unroll
          for (int e = 0; e < 16; ++e) {
            float r = 0.f;
#pragma unroll
            for (int jj = 0; jj < C::TPW; ++jj) r += rw[(jj * GC + gg) * D + 16 * sub + e];
            sti[gg * (D + 2) + 16 * sub + e] = acc[gg][e] + pa[gg] + r;
          }
      if (lane == 0)
#pragma unroll
        for (int gg = 0; gg < GC; ++gg) { sti[gg * (D + 2) + D] = m[gg]; sti[gg * (D + 2) + D + 1] = l[gg]; }
      __syncwarp();
    }
    __syncthreads();
  }
  __syncthreads();
  for (int e = tid; e < items * GC * (D + 2); e += blockDim.x) {
    const int it = e / (GC * (D + 2)), r = e % (GC * (D + 2)), gg = r / (D + 2), c = r % (D + 2);
    const int h = h_begin + it / pl.npass, g0 = (it % pl.npass) * GC;
    if (g0 + gg >= G) continue;
    part[(((long long)n * hq_total + h * G + g0 + gg) * pl.splits + split) * (D + 2) + c] = st[e];
  }
}

template <class T, int D, int BITS, int GC>
void launch(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& inv_freq, float scale, const Plan& pl,
            float* part, cudaStream_t stream) {
  const int N = (int)q.dim(0), Hq = (int)q.dim(1);
  const int items = pl.hpb * pl.npass;
  const size_t smem = Smem<D, BITS, GC>::bytes(items);
  auto kernel = flash_kernel<T, D, BITS, GC>;
  allow_smem(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<dim3(pl.splits, N, pl.groups), kW * 32, smem, stream>>>(g, static_cast<const T*>(q.data()), inv_freq.ptr<float>(),
                                                                   scale, Hq, pl, part);
  const size_t csmem = sizeof(float) * ((size_t)pl.splits + 8 * 32 + 8);
  auto ck = fast::combine_kernel<T>;
  if (csmem > 48 * 1024) allow_smem(reinterpret_cast<const void*>(ck), csmem);
  ck<<<dim3(N * Hq, (D + 31) / 32), 256, csmem, stream>>>(part, pl.splits, D, static_cast<T*>(out.data()));
}

template <class T, int D, int BITS>
void launch_gc(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, const Plan& pl, float* part,
               cudaStream_t s) {
  if (pl.gc == 4) launch<T, D, BITS, 4>(out, q, g, f, scale, pl, part, s);
  else if (pl.gc == 2) launch<T, D, BITS, 2>(out, q, g, f, scale, pl, part, s);
  else launch<T, D, BITS, 1>(out, q, g, f, scale, pl, part, s);
}
template <class T, int D>
void launch_bits(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, const Plan& pl, float* part,
                 cudaStream_t s) {
  if (g.bits == 2) launch_gc<T, D, 2>(out, q, g, f, scale, pl, part, s);
  else if (g.bits == 3) launch_gc<T, D, 3>(out, q, g, f, scale, pl, part, s);
  else launch_gc<T, D, 4>(out, q, g, f, scale, pl, part, s);
}
template <class T>
bool dispatch(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, int L, float* work, cudaStream_t s) {
  const int N = (int)q.dim(0), Hq = (int)q.dim(1), dev = q.device.index;
  if (N == 0) return true;
  const Plan pl = plan(sm_count(dev), N, g.H, Hq / g.H, g.D, L);
  float* part = work ? work : partials(dev, (size_t)N * Hq * pl.splits * (g.D + 2) * sizeof(float), s);
  switch (g.D) {
    case 64: launch_bits<T, 64>(out, q, g, f, scale, pl, part, s); return true;
    case 80: launch_bits<T, 80>(out, q, g, f, scale, pl, part, s); return true;
    case 96: launch_bits<T, 96>(out, q, g, f, scale, pl, part, s); return true;
    case 128: launch_bits<T, 128>(out, q, g, f, scale, pl, part, s); return true;
    case 256: launch_bits<T, 256>(out, q, g, f, scale, pl, part, s); return true;
    default: return false;
  }
}
int64_t workspace_floats(int sms, int64_t N, int64_t Hq, int64_t H, int64_t D, int max_seq_len) {
  if (N == 0) return 0;
  const Plan pl = plan(sms, (int)N, (int)H, (int)(Hq / H), (int)D, max_seq_len);
  return N * Hq * pl.splits * (D + 2);
}
}  // namespace flash

template <class T>
void launch_attention(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& inv_freq, float scale,
                      int max_seq_len, cudaStream_t stream) {
  const int N = (int)q.dim(0), Hq = (int)q.dim(1), G = Hq / g.H, D = g.D;
  if (N == 0) return;
  const int dev = q.device.index;
  const int tiles = (max_seq_len + kTile - 1) / kTile;
  const long long blocks = (long long)g.H * N;
  int splits = (int)std::max<long long>(1, (2LL * sm_count(dev) + blocks - 1) / blocks);
  splits = std::min(splits, tiles);
  // long sequences: at most 16 tiles per split so one block does not serialise a 128K context
  splits = std::max(splits, (tiles + 15) / 16);
  splits = std::min(splits, 4096);
  const int chunk = ((tiles + splits - 1) / splits) * kTile;
  splits = (max_seq_len + chunk - 1) / chunk;
  float* part = partials(dev, (size_t)N * Hq * splits * (D + 2) * sizeof(float), stream);
  const size_t smem = sizeof(float) * ((size_t)2 * G * D + 2 * kTile * (D + 1) + (size_t)G * kTile + 3 * G);
  auto kernel = attn_split_kernel<T>;
  if (smem > 48 * 1024)
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "kvqAttention");
  dim3 grid(g.H, N, splits);
  kernel<<<grid, kThreads, smem, stream>>>(g, static_cast<const T*>(q.data()), inv_freq.ptr<float>(), scale, Hq,
                                           chunk, splits, part);
  attn_combine_kernel<T><<<N * Hq, std::min(D, 256), 0, stream>>>(part, splits, D, static_cast<T*>(out.data()));
}

}  // namespace

void kvq_append(const kvq::Cache& c, const kvq::Calib& cal, const Tensor& k, const Tensor& v, const Tensor& page_table,
                const Tensor& seq_lens, const Tensor& cu_q, cudaStream_t stream) {
  const int N = (int)k.dim(0);
  if (N == 0) return;
  Geo g = make_geo(c, cal, page_table, &seq_lens, &cu_q);
  dim3 grid(N, g.H);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Src<T> src{static_cast<const T*>(k.data()), static_cast<const T*>(v.data()), (long long)g.H * g.D, nullptr, nullptr, 0,
               nullptr, nullptr, 0};
    append_kernel<T><<<grid, kThreads, 0, stream>>>(g, src);
  };
  if (k.dtype == DType::F16) run(__half{});
  else run(__nv_bfloat16{});
}

void kvq_rope_append(const Tensor* q_out, const kvq::Cache& c, const kvq::Calib& cal, const Tensor& qkv,
                     const Tensor& positions, const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens,
                     const Tensor& cu_q, bool rotate_keys, cudaStream_t stream) {
  const int N = (int)qkv.dim(0);
  if (N == 0) return;
  Geo g = make_geo(c, cal, page_table, &seq_lens, &cu_q);
  const long long width = qkv.dim(1);
  const int Hq = (int)(width / g.D) - 2 * g.H;
  dim3 grid(N, g.H);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(qkv.data());
    Src<T> src{base + (long long)Hq * g.D, base + (long long)(Hq + g.H) * g.D, width, base,
               q_out ? static_cast<T*>(q_out->data()) : nullptr, Hq / g.H, positions.ptr<int>(), inv_freq.ptr<float>(),
               rotate_keys ? 1 : 0};
    append_kernel<T><<<grid, kThreads, 0, stream>>>(g, src);
  };
  if (qkv.dtype == DType::F16) run(__half{});
  else run(__nv_bfloat16{});
}

int64_t kvq_attention_workspace_floats(int dev, int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                                       int max_seq_len) {
  // room for both kernels (the legacy one is kept for comparison runs)
  const int64_t legacy = rows * q_heads * std::max<int64_t>((max_seq_len + fast::kChunk - 1) / fast::kChunk, 1) * (head_dim + 2);
  return std::max(legacy, flash::workspace_floats(sm_count(dev), rows, q_heads, kv_heads, head_dim, max_seq_len));
}

void kvq_attention(const Tensor& out, const Tensor& q, const kvq::Cache& c, const kvq::Calib& cal,
                   const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q, const Tensor& inv_freq,
                   float scale, int max_q, int max_seq_len, float* work, int64_t work_floats, int variant,
                   cudaStream_t stream) {
  (void)max_q;
  (void)work_floats;
  Geo g = make_geo(c, cal, page_table, &seq_lens, &cu_q);
  if (variant == 0) {
    const bool done = q.dtype == DType::F16
                          ? flash::dispatch<__half>(out, q, g, inv_freq, scale, max_seq_len, work, stream)
                          : flash::dispatch<__nv_bfloat16>(out, q, g, inv_freq, scale, max_seq_len, work, stream);
    if (done) return;
  }
  const bool done = q.dtype == DType::F16
                        ? fast::dispatch<__half>(out, q, g, inv_freq, scale, max_seq_len, work, stream)
                        : fast::dispatch<__nv_bfloat16>(out, q, g, inv_freq, scale, max_seq_len, work, stream);
  if (done) return;
  if (q.dtype == DType::F16) launch_attention<__half>(out, q, g, inv_freq, scale, max_seq_len, stream);
  else launch_attention<__nv_bfloat16>(out, q, g, inv_freq, scale, max_seq_len, stream);
}

void kvq_dequantize(const Tensor& k_out, const Tensor& v_out, const kvq::Cache& c, const kvq::Calib& cal,
                    const Tensor& page_table, int64_t seq, int64_t sink_row, cudaStream_t stream) {
  const int L = (int)k_out.dim(0);
  if (L == 0) return;
  Geo g = make_geo(c, cal, page_table, nullptr, nullptr);
  g.sink_row_fixed = (int)sink_row;
  dim3 grid(L, g.H);
  if (k_out.dtype == DType::F16)
    dequant_kernel<__half><<<grid, kThreads, 0, stream>>>(g, (int)seq, static_cast<__half*>(k_out.data()),
                                                          static_cast<__half*>(v_out.data()));
  else
    dequant_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(g, (int)seq, static_cast<__nv_bfloat16*>(k_out.data()),
                                                                 static_cast<__nv_bfloat16*>(v_out.data()));
}

}  // namespace sqz::cuda
