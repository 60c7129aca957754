// KVQuant paged cache kernels: quantize-and-append, split-KV decode attention over the
// packed cache (dequantize + RoPE on the fly, outliers, fp16 sink), and unpacking.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/cuda_stream.h"
#include "core/error.h"
#include "core/env.h"
#include "kernels/common/bulk_copy.cuh"
#include "kernels/common/dynamic_smem.cuh"
#include "kernels/common/grow_scratch.h"
#include "kernels/common/hopper.h"
#include "kernels/common/launch_config.h"
#include "kernels/common/pdl.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/tensor_map.h"
#include "kvquant.h"

namespace sqz::cuda {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
// fp16 at p (2-byte aligned: every metadata field is, a record being a multiple of 4 bytes).
__device__ __forceinline__ float half_bits(const uint8_t* p) {
  return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
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
  int page_shift;  // log2(page_size) where it is a power of two, else -1
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
  g.page_shift = -1;
  for (int s = 0; s < 31; ++s)
    if (g.page_size == 1 << s) g.page_shift = s;
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
// Element offset of (sink row srow, token t < sink, kv head h, channel 0) in the fp16 side store
// [rows][sink][H][D].
__device__ __forceinline__ long long sink_at(const Geo& g, int srow, int t, int h) {
  return (((long long)srow * g.sink + t) * g.H + h) * g.D;
}

// Page-table column of a position: a shift where the page size is a power of two (the usual case;
// a division by a runtime value is ~30 instructions, paid per token in the attention kernels).
__device__ __forceinline__ int page_col(const Geo& g, int pos) {
  return g.page_shift >= 0 ? pos >> g.page_shift : pos / g.page_size;
}
// Record of (position, kv head) in a page already looked up (the planes kernel reads pages ahead).
__device__ __forceinline__ long long slot_in_page(const Geo& g, long long page, int pos, int h) {
  return (page * g.page_size + (pos - page_col(g, pos) * g.page_size)) * g.H + h;
}
__device__ __forceinline__ long long slot_of(const Geo& g, int b, int pos, int h) {
  return slot_in_page(g, g.pt[(long long)b * g.max_pages + page_col(g, pos)], pos, h);
}

// Sequence of query row n and its position, block-wide: thread t tests sequences t, t + blockDim.x,
// ... with their cu and length read together, and the one holding the row writes (b, position) to
// bp[0], bp[1]. Returns whether this thread found it; the caller's first barrier is
// __syncthreads_or of that, and the row has no sequence (b = -1) where it is false. (One thread
// walking the sequences put dependent global loads in front of that barrier in every block.)
__device__ __forceinline__ bool find_row(const Geo& g, int n, int* bp) {
  bool found = false;
  for (int i = threadIdx.x; i < g.B; i += blockDim.x) {
    const int c0 = g.cu[i], c1 = g.cu[i + 1], len = g.lens[i];
    if (n >= c0 && n < c1) {
      bp[0] = i;
      bp[1] = len - (c1 - c0) + (n - c0);
      found = true;
    }
  }
  return found;
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
  const bool row_mine = find_row(g, n, bp);
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
  const bool row_found = __syncthreads_or(row_mine);
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
  const int b = row_found ? bp[0] : -1, pos = row_found ? bp[1] : -1;
  if (b < 0 || pos < 0 || page_col(g, pos) >= g.max_pages) return;
  const int page = g.pt[(long long)b * g.max_pages + page_col(g, pos)];
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
      const long long o = sink_at(g, srow, pos, h) + i;
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
    const int c = kvq::nearest_code(x, g.key_cb, ncb);
    score[i] = kvq::key_loss(kx[i], lo[i], hi[i], kvq::book_entry(g.key_cb[c]));
    codes[kvq::key_element(i, D)] = (uint8_t)c;
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
      const long long o = sink_at(g, sink_row(g, b), pos, h) + c;
      kv = __half2float(__ushort_as_half(g.sink_k[o]));
      vv = __half2float(__ushort_as_half(g.sink_v[o]));
    } else {
      const long long slot = slot_of(g, b, pos, h);
      const uint8_t* meta = g.meta + slot * g.mbytes;
      kv = kvq::dequant(lo[c], hi[c], kvq::book_entry(g.key_cb[kvq::get_code(g.kc + slot * g.cbytes, kvq::key_element(c, D), g.bits)]));
      vv = kvq::dequant(half_bits(meta), half_bits(meta + 2), kvq::book_entry(g.val_cb[kvq::get_code(g.vc + slot * g.cbytes, c, g.bits)]));
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

// The split partials live in grow-only scratch (grow_scratch.h), sized before graph capture by a
// first call of the same shape.
float* partials(int dev, size_t bytes, cudaStream_t stream) {
  return static_cast<float*>(grow_scratch(Scratch::kKvqPartials, dev, bytes, stream, "kvqAttention workspace"));
}

namespace fast {
template <int D, int BITS> struct CodeBytes { static constexpr int value = ((D * BITS + 7) / 8 + 15) / 16 * 16; };

// Deterministic combine: block = (query row-head, 32 channels); warps take splits modulo 8.
template <class T>
__global__ void combine_kernel(const float* __restrict__ part, int splits, int D, T* __restrict__ out) {
  SQZ_DYNAMIC_SMEM(wsm_bytes);
  float* const wsm = reinterpret_cast<float*>(wsm_bytes);  // [splits] weights, then [8][32] partial sums, [8] dens
  float* red = wsm + splits;
  float* dred = red + 8 * 32;
  __shared__ float Ms;
  pdl_wait();  // launched with PDL: the partials are the previous grid's
  pdl_trigger();
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

// Merges `splits` partials (acc[D], m, l) of each of `rows` query row-heads into out [rows, D].
template <class T>
void launch_combine(const float* part, int splits, int rows, int D, T* out, cudaStream_t stream) {
  const size_t smem = sizeof(float) * ((size_t)splits + 8 * 32 + 8);
  if (smem > 48 * 1024) allow_dynamic_smem<combine_kernel<T>>(smem, "kvqAttention");
  launch_pdl(combine_kernel<T>, dim3(rows, (D + 31) / 32), dim3(256), smem, stream, part, splits, D, out);
}

}  // namespace fast

// ---------------------------------------------------------------------------------------
// Flash-decoding over the packed cache with scalar fp32 math (variant 1: kept for comparisons
// and for the shapes tc_kernel does not cover, e.g. more than 16 query heads per kv head).
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
  SQZ_DYNAMIC_SMEM(smem);
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
  const bool row_mine = find_row(g, n, bp);
  for (int e = tid; e < items * GC * (D + 2); e += blockDim.x) {
    const int c = e % (D + 2);
    st[e] = c == D ? -INFINITY : 0.f;
  }
  for (int e = tid; e < S::PT; e += blockDim.x) {
    kpt[e] = make_float2(kvq::book_entry(g.key_cb[e & ((1 << BITS) - 1)]), kvq::book_entry(g.key_cb[e >> BITS]));
    vpt[e] = make_float2(kvq::book_entry(g.val_cb[e & ((1 << BITS) - 1)]), kvq::book_entry(g.val_cb[e >> BITS]));
  }
  const bool row_found = __syncthreads_or(row_mine);
  const int b = row_found ? bp[0] : -1, L = row_found ? bp[1] + 1 : 0;
  const int srow = b >= 0 ? sink_row(g, b) : 0;
  const int nk = g.nk, nv = g.nv, ns = nk + nv, MB = g.mbytes;
  // The splits share the keys of the moment, not of the bound the plan was made for: a graph
  // captured for the longest context (the decoder passes maxContext) still spreads a short one
  // over every split instead of leaving most of them empty.
  const int sub_now = max(1, ((L + kCH - 1) / kCH + pl.splits - 1) / pl.splits);
  for (int c = 0; c < sub_now && b >= 0; ++c) {
    const int t0 = (split * sub_now + c) * kCH;
    const int cnt = max(0, min(kCH, L - t0));
    if (cnt == 0) break;
    for (int tt = tid; tt < cnt; tt += blockDim.x) {
      const int t = t0 + tt;
      slot_s[tt] = (int)slot_of(g, b, t, 0);
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
            const uint16_t* sk = g.sink_k + sink_at(g, srow, t, h);
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
            const float delta = ghalf(me + 4 + 2 * s) - fmaf(sc_, kvq::book_entry(g.key_cb[code]), lo_ + sc_);
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
            const uint16_t* sv = g.sink_v + sink_at(g, srow, t, h) + 16 * sub;
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
              const float delta = ghalf(me + 4 + 2 * (nk + s)) - fmaf(Sv, kvq::book_entry(g.val_cb[code]), A);
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
  allow_dynamic_smem<flash_kernel<T, D, BITS, GC>>(smem, "kvqAttention");
  launch_plain(flash_kernel<T, D, BITS, GC>, dim3(pl.splits, N, pl.groups), dim3(kW * 32), smem, stream, g,
               static_cast<const T*>(q.data()), inv_freq.ptr<float>(), scale, Hq, pl, part);
  fast::launch_combine<T>(part, pl.splits, N * Hq, D, static_cast<T*>(out.data()), stream);
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

// Online softmax in the log2 domain, shared by the tensor-core kernels (tc, planes): folds a
// tile's maximum into the running one and returns the factor that rescales what was summed under
// the old maximum; `grew` collects whether any maximum grew, so a warp can skip rescaling its
// accumulators once the maxima settle.
__device__ __forceinline__ float online_max(float& m_run, float tile_max, bool& grew) {
  const float mn = fmaxf(m_run, tile_max);
  grew |= mn > m_run;
  const float alpha = exp2f(m_run - mn);
  m_run = mn;
  return alpha;
}

// ---------------------------------------------------------------------------------------
// Tensor-core flash-decoding over the packed cache (the default kernel).
//
// Why this shape. At 2 bits a K or V element costs ~0.31 bytes (codes plus metadata); an
// H200 issues ~8 lane-instructions per byte of HBM bandwidth, so a kernel that wants to run
// near the byte floor has ~3-4 lane-instructions per element for everything: unpacking,
// codebook lookup, dequantization, RoPE, q.k, softmax and p.v. Scalar float work per element
// (the previous kernels) costs 10+. Here:
//   * codebook lookup is byte permutes: the fp16 codebook's low bytes sit in one pair of
//     registers and its high bytes in another; a selector with one code per nibble gives four
//     low bytes with one PRMT and four high bytes with another, and one more PRMT interleaves
//     two of them into a half2 (16-entry books: two 8-entry halves and a merge by bit 3).
//     Codes become selector nibbles with a few shifts and masks per 8 codes.
//   * keys are dequantized and rotated in fp32 (a*cb + b per channel, then the RoPE pair with
//     the token's cos/sin), then split into fp16 hi and lo halves staged in two tiles (each with
//     a RoPE pair's partners in separate planes: x plane channel i, y plane channel i + D/2,
//     padded to multiples of 16) and both multiplied with q: a key costs no accuracy beyond its
//     fp32 rotation (a single fp16 rounding of the rotated key measured up to 1.8e-3 relative
//     error against the fp32 reference, 2e-3 being the contract). Values need no dequantization:
//     v = offset_t + scale_t * cb, so the value tile holds the codebook values and P carries
//     p * scale_t (sum p * offset_t is added at the end); a value outlier is staged as
//     (exact - offset) / scale. The value tile shares its memory with the lo keys: values are
//     staged once the scores are done. Codebook entries are fp16 values (kvquant_layout.h), so a
//     value's codebook term carries no rounding of its own (an fp16 rounding per code would be
//     the same for every token and would not average out over a long sequence).
//   * scores and p.v run on mma.sync.m16n8k16 (fp16 in, fp32 accumulate): q (the G <= 16
//     query heads of the kv head, pre-scaled by scale*log2(e)) is the A operand, the rotated
//     key tiles the B operand; for p.v the value tile (transposed by ldmatrix) is the A
//     operand and P^T, which is exactly the score accumulator re-packed to half2, is B.
//   * cos/sin of every (token, pair) is computed once per block and chunk of tokens (fp32 angle
//     t*invFreq as the CPU rounds it, exact reduction to [-pi/4, pi/4] with FMAs, hardware
//     sin/cos there) into an fp32 table shared by all heads of the block.
//   * key outliers replace the dequantized value before rotation: the staged pair is rotated
//     back (within rounding), corrected by the difference and stored again; sink tokens are
//     rotated from the fp16 side store (values with scale 1, offset 0). Both stay off the hot path.
// Data flow. Grid = (splits, query rows, kv-head groups); one warp per kv head. A block walks
// its token range in chunks of kChunk tokens: all threads fill the chunk's cos/sin table, then
// each warp takes the chunk's tiles of 16 tokens. Lanes t and t + 16 own token t of the tile,
// each half of its 16-element blocks: each loads its half of the token's key and value code
// rows and the metadata, and stages its blocks of the rotated key row (hi and lo); then 2
// n-tiles of 8 tokens of scores, the value codebook rows into the value tile, online softmax in
// fp32 (one running max per query head, quad shuffles) and the p.v mma. Two lanes per token
// keep a thread at 128 registers and a block at ~107 KB of shared memory: two blocks of 8 warps
// per SM (one token per lane took ~177 registers and ~178 KB: one block). Each split writes
// (acc, m, l) per query head; fast::combine_kernel merges splits in a fixed order, so results
// are deterministic.
namespace tc {
constexpr int kTok = 16;     // tokens per warp tile (two lanes per token: each stages half its blocks)
constexpr int kChunk = 64;   // tokens per cos/sin table fill
constexpr int kMaxWarps = 8;  // kv heads per block (4 at D = 256: shared memory)
constexpr int max_warps(int D) { return D > 128 ? 4 : kMaxWarps; }
constexpr float kLog2e = 1.4426950408889634f;

template <int D, int BITS> struct Shape {
  static constexpr int HALF = D / 2;
  static constexpr int HP = (HALF + 15) / 16 * 16;                 // padded half plane
  static constexpr int DP = 2 * HP;                                 // staged key row
  static constexpr int RS = DP <= 64 ? 64 : (DP <= 128 ? 128 : 256);  // row stride (halves)
  static constexpr int CB = fast::CodeBytes<D, BITS>::value;
  static constexpr int NW = CB / 4;     // code words per row
  static constexpr int NB = D / 16;     // 16-element blocks per row
  static constexpr int KX = HP / 16;    // k-blocks per plane
  static constexpr int MT = D / 16;     // m-tiles of p.v (channels)
  static constexpr int TW = BITS == 4 ? 4 : 2;  // table words per byte plane
};
// A token's row is staged by two lanes: lane half hf takes the 16-element blocks
// [hf * NBH, hf * NBH + NBH) (blocks past NB only exist for odd NB and land on the key planes'
// padding chunk). Each half loads WH code words from word hf * W0; half 1's blocks start LB
// bits into its first word (3-bit rows with an odd NBH), shifted out after the load so that
// both halves decode their blocks at the same local offsets.
template <int D, int BITS> struct Half {
  static constexpr int NB = D / 16, NBH = (NB + 1) / 2, BB = 16 * BITS;
  static constexpr int W0 = NBH * BB / 32, LB = NBH * BB % 32;
  static constexpr int WH = (LB + NBH * BB + 31) / 32;
  static constexpr int NW = Shape<D, BITS>::NW;
  static constexpr int VW = (W0 % 4 == 0 && WH % 4 == 0) ? 4 : ((W0 % 2 == 0 && WH % 2 == 0) ? 2 : 1);
};

// byte offset of the 16-byte chunk `ch` of row `r` in a swizzled staging tile of stride RS
template <int RS> __device__ __forceinline__ unsigned swz(int r, int ch) {
  return (unsigned)(r * RS * 2 + ((ch ^ (r & 7)) << 4));
}
__device__ __forceinline__ void sts128(unsigned addr, unsigned a, unsigned b, unsigned c, unsigned d) {
  st_shared_v4(addr, a, b, c, d);
}
__device__ __forceinline__ void sts16(unsigned addr, unsigned short v) { st_shared_u16(addr, v); }
__device__ __forceinline__ uint4 lds128(unsigned addr) { return ld_shared_v4(addr); }
__device__ __forceinline__ unsigned h2u(__half2 h) { return *reinterpret_cast<unsigned*>(&h); }
__device__ __forceinline__ __half2 u2h(unsigned u) { return *reinterpret_cast<__half2*>(&u); }
__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned s) { return __byte_perm(a, b, s); }

// A codebook as byte planes: plane word w holds the low (high) bytes of entries 4w .. 4w+3.
template <int TW> struct Book {
  unsigned lo[TW], hi[TW];
};
// Entries are read at fp16 precision (kvq::book_entry), so the fp16 book is exact.
template <int TW> __device__ __forceinline__ Book<TW> make_book(const float* cb, int n) {
  Book<TW> bk;
#pragma unroll
  for (int w = 0; w < TW; ++w) {
    bk.lo[w] = 0;
    bk.hi[w] = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = 4 * w + i;
      const unsigned short u = e < n ? __half_as_ushort(__float2half_rn(kvq::book_entry(cb[e]))) : 0;
      bk.lo[w] |= (unsigned)(u & 0xffu) << (8 * i);
      bk.hi[w] |= (unsigned)(u >> 8) << (8 * i);
    }
  }
  return bk;
}
// Low and high bytes of the entries named by the four nibbles of `sel` (bits 0..15).
template <int TW> __device__ __forceinline__ void lut(const Book<TW>& bk, unsigned sel, unsigned& lo, unsigned& hi) {
  if constexpr (TW == 2) {
    lo = prmt(bk.lo[0], bk.lo[1], sel);
    hi = prmt(bk.hi[0], bk.hi[1], sel);
  } else {
    const unsigned s7 = sel & 0x7777u;                        // index within a half of the book
    const unsigned merge = ((sel >> 1) & 0x4444u) | 0x3210u;  // byte k from the upper half if bit 3
    lo = prmt(prmt(bk.lo[0], bk.lo[1], s7), prmt(bk.lo[2], bk.lo[3], s7), merge);
    hi = prmt(prmt(bk.hi[0], bk.hi[1], s7), prmt(bk.hi[2], bk.hi[3], s7), merge);
  }
}
// 8 packed 3-bit codes (bits 0..23) -> one code per nibble.
__device__ __forceinline__ unsigned nib3(unsigned t) {
  t = (t & 0xfffu) | ((t & 0xfff000u) << 4);
  t = (t & 0x003f003fu) | ((t & 0x0fc00fc0u) << 2);
  return (t & 0x07070707u) | ((t & 0x38383838u) << 1);
}
// Nibble words (8 codes each, in stream order) of 16-element block j of a row of words w.
// 2-bit rows are split into even and odd elements instead (see key_block / value_block).
template <int BITS> __device__ __forceinline__ void block_nibbles(const unsigned* w, int j, unsigned& n0, unsigned& n1) {
  if constexpr (BITS == 4) {
    n0 = w[2 * j];
    n1 = w[2 * j + 1];
  } else {
    const int bit = 48 * j, i0 = bit >> 5, off = bit & 31;
    const unsigned long long v = ((unsigned long long)w[i0 + 1] << 32 | w[i0]) >> off;
    n0 = nib3((unsigned)v & 0xffffffu);
    n1 = nib3((unsigned)(v >> 24) & 0xffffffu);
  }
}
// Channel of staged value column s (2-bit rows stage even elements of each 16 first).
template <int BITS> __device__ __forceinline__ int value_channel(int s) {
  if constexpr (BITS == 2) { const int w = s & 15; return (s & ~15) + (w < 8 ? 2 * w : 2 * (w - 8) + 1); }
  else return s;
}
template <int BITS> __device__ __forceinline__ int value_column(int c) {
  if constexpr (BITS == 2) { const int w = c & 15; return (c & ~15) + ((w & 1) ? 8 + (w >> 1) : (w >> 1)); }
  else return c;
}

// 2-bit: the 8 codes of one nibble stream (one code per nibble, 0..3) as 4 half2 words of
// codebook values, in nibble order.
template <int TW>
__device__ __forceinline__ void lut2_words(const Book<TW>& bk, unsigned codes, unsigned* out) {
  unsigned lo, hi;
  lut(bk, codes, lo, hi);        out[0] = prmt(lo, hi, 0x5140); out[1] = prmt(lo, hi, 0x7362);
  lut(bk, codes >> 16, lo, hi);  out[2] = prmt(lo, hi, 0x5140); out[3] = prmt(lo, hi, 0x7362);
}

// Codebook values of key block j as the x chunk (pairs 8j..8j+7, first channels) and the y
// chunk (their partners), each 4 half2 words.
template <int BITS, int TW>
__device__ __forceinline__ void key_block(const unsigned* w, int j, const Book<TW>& bk, unsigned* x, unsigned* y) {
  if constexpr (BITS == 2) {
    lut2_words(bk, w[j] & 0x33333333u, x);         // x_i codes, one per nibble
    lut2_words(bk, (w[j] >> 2) & 0x33333333u, y);  // y_i codes
  } else {
    unsigned n[2];
    block_nibbles<BITS>(w, j, n[0], n[1]);
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // nibbles (x_i, y_i, x_i+1, y_i+1)
      unsigned lo, hi;
      lut(bk, (q & 1) ? n[q >> 1] >> 16 : n[q >> 1], lo, hi);
      x[q] = prmt(lo, hi, 0x6240);
      y[q] = prmt(lo, hi, 0x7351);
    }
  }
}
// Codebook values of value block j in staging order (two chunks of 8).
template <int BITS, int TW>
__device__ __forceinline__ void value_block(const unsigned* w, int j, const Book<TW>& bk, unsigned* v) {
  if constexpr (BITS == 2) {
    lut2_words(bk, w[j] & 0x33333333u, v);
    lut2_words(bk, (w[j] >> 2) & 0x33333333u, v + 4);
  } else {
    unsigned n[2];
    block_nibbles<BITS>(w, j, n[0], n[1]);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      unsigned lo, hi;
      lut(bk, (q & 1) ? n[q >> 1] >> 16 : n[q >> 1], lo, hi);
      v[2 * q] = prmt(lo, hi, 0x5140);
      v[2 * q + 1] = prmt(lo, hi, 0x7362);
    }
  }
}

// sin and cos of an fp32 angle: exact reduction by multiples of pi/2 (two-part constant with
// FMAs), hardware sin/cos on [-pi/4, pi/4] (absolute error ~1e-6, far below fp16 rounding).
__device__ __forceinline__ void sincos_reduced(float a, float* s, float* c) {
  const float k = rintf(a * 0.636619772f);
  float r = fmaf(-k, 1.57079637e+00f, a);
  r = fmaf(-k, -4.37113883e-08f, r);
  const float sr = __sinf(r), cr = __cosf(r);
  const int qd = (int)k & 3;
  const float ss = (qd & 1) ? cr : sr, cc = (qd & 1) ? sr : cr;
  *s = (qd & 2) ? -ss : ss;
  *c = ((qd + 1) & 2) ? -cc : cc;
}

struct Plan {
  int groups, hpb, splits, sub;
};
// Blocks of 8 warps that fit on an SM at once: two at head_dim <= 128 with up to 8 query heads
// per kv head (128 registers per thread, ~107 KB of shared memory each), else one (twice the
// accumulators, or twice the tiles).
constexpr int min_blocks(int D, int NH) { return D > 128 || NH > 1 ? 1 : 2; }
// Blocks per SM the grid aims at: one wave of what fits. SQUEEZELM_KVQ_BLOCKS_PER_SM overrides
// it for tuning; read per call (a getenv), the same value sizes the workspace.
inline int blocks_per_sm(int D, int G) {
  return std::min(8, std::max(1, env_int("SQUEEZELM_KVQ_BLOCKS_PER_SM", min_blocks(D, G > 8 ? 2 : 1))));
}
// Warps of the resident wave the grid aims at.
inline long long wave_warps(int sms, int D, int G) { return (long long)blocks_per_sm(D, G) * sms * max_warps(D); }
// chunk_tokens: the split granularity (the rotation-plane kernel splits at 32 tokens).
// reserved_splits: splits of other work in the same grid (the rotation-plane kernel's sink split),
// whose blocks the resident wave must also hold.
inline Plan plan(int sms, int N, int H, int G, int D, int max_seq_len, int chunk_tokens = kChunk, int reserved_splits = 0) {
  Plan p;
  const int chunks = std::max(1, (max_seq_len + chunk_tokens - 1) / chunk_tokens);
  // The splits are sized in warps (one per kv head and split): as many as the resident wave
  // holds, each walking as few chunks as that allows (a warp's tiles run one after another).
  // Smaller blocks only where even one chunk per split leaves SMs without a block.
  const long long target_warps = wave_warps(sms, D, G);
  p.hpb = std::min(H, max_warps(D));
  int groups = (H + p.hpb - 1) / p.hpb;
  while (p.hpb > 2 && (long long)N * chunks * groups < sms) {
    p.hpb = (p.hpb + 1) / 2;
    groups = (H + p.hpb - 1) / p.hpb;
  }
  p.hpb = (H + groups - 1) / groups;
  p.groups = groups;
  const long long per = (long long)N * p.groups * p.hpb;  // warps per split
  const int splits =
      (int)std::min<long long>(chunks, std::max<long long>(1, (target_warps + per - 1) / per - reserved_splits));
  p.sub = (chunks + splits - 1) / splits;
  p.splits = (chunks + p.sub - 1) / p.sub;
  return p;
}
// Per warp: key and value staging tiles [kTok][RS] (fp16), key constants a, b of each RoPE pair's
// two channels ([HP][4] fp32), value scale/offset [kTok] float2. Per block: the chunk's cos/sin table
// [kChunk][HP] (cos, sin) pairs in fp32.
template <int D, int BITS> constexpr size_t warp_smem_bytes() {
  using S = Shape<D, BITS>;
  return (size_t)2 * kTok * S::RS * 2 + 16 * S::HP + kTok * 8;
}
template <int D, int BITS> constexpr size_t table_smem_bytes() { return (size_t)kChunk * 8 * Shape<D, BITS>::HP; }
template <int D, int BITS> inline size_t smem_bytes(int warps) {
  return (size_t)warps * warp_smem_bytes<D, BITS>() + table_smem_bytes<D, BITS>();
}
// Byte offset of fp32 column `col` (0 .. 2 HP: cos, sin of pair col / 2) in row `r` of the cos/sin table: 16-byte chunks
// swizzled by the row, so the 8 lanes of a quarter warp (8 rows, one column) hit 8 bank groups.
template <int HP> __device__ __forceinline__ unsigned cs_off(int r, int col) {
  return (unsigned)(r * 8 * HP + ((((col >> 2) ^ (r & 7))) << 4) + (col & 3) * 4);
}
__device__ __forceinline__ void sts32(unsigned addr, float v) { st_shared_f32(addr, v); }
__device__ __forceinline__ float lds32(unsigned addr) { return __uint_as_float(ld_shared_u32(addr)); }
__device__ __forceinline__ float4 lds128f(unsigned addr) {
  const uint4 u = lds128(addr);
  return make_float4(__uint_as_float(u.x), __uint_as_float(u.y), __uint_as_float(u.z), __uint_as_float(u.w));
}
__device__ __forceinline__ unsigned short lds16(unsigned addr) { return ld_shared_u16(addr); }
// Two fp32 values as a half2 `hi` and the half2 of what it misses, `lo` (hi + lo carries ~22
// bits: a key then costs no more accuracy than its fp32 rotation).
__device__ __forceinline__ void split2(float a, float b, unsigned& hi, unsigned& lo) {
  const __half2 h = __floats2half2_rn(a, b);
  const float2 f = __half22float2(h);
  hi = h2u(h);
  lo = h2u(__floats2half2_rn(a - f.x, b - f.y));
}
// Rotates two RoPE pairs in fp32 (x' = x c - y s, y' = y c + x s), as hi/lo half2 words.
__device__ __forceinline__ void rotate2(float x0, float y0, float x1, float y1, float c0, float s0, float c1, float s1,
                                        unsigned& xh, unsigned& xl, unsigned& yh, unsigned& yl) {
  split2(fmaf(x0, c0, -y0 * s0), fmaf(x1, c1, -y1 * s1), xh, xl);
  split2(fmaf(y0, c0, x0 * s0), fmaf(y1, c1, x1 * s1), yh, yl);
}
__device__ __forceinline__ float h2f(unsigned short u) { return __half2float(__ushort_as_half(u)); }

// Raw half rows of one token: the lane's key and value code words, the first metadata word
// (vmin, vmax).
template <int WH> struct Rows {
  unsigned k[WH], v[WH], m;
};
// Words [base, base + WH) of a code row (words past the row's NW read as zero), loaded VW at
// a time.
template <int WH, int VW, int NW>
__device__ __forceinline__ void load_words(const uint8_t* row, int base, unsigned* w) {
#pragma unroll
  for (int i = 0; i < WH; i += VW) {
    const int wi = base + i;
    const bool in = wi < NW;
    if constexpr (VW == 4) {
      const uint4 a = in ? __ldg(reinterpret_cast<const uint4*>(row) + wi / 4) : make_uint4(0, 0, 0, 0);
      w[i] = a.x; w[i + 1] = a.y; w[i + 2] = a.z; w[i + 3] = a.w;
    } else if constexpr (VW == 2) {
      const uint2 a = in ? __ldg(reinterpret_cast<const uint2*>(row) + wi / 2) : make_uint2(0, 0);
      w[i] = a.x; w[i + 1] = a.y;
    } else {
      w[i] = in ? __ldg(reinterpret_cast<const unsigned*>(row) + wi) : 0u;
    }
  }
}
// Drops the first `lb` bits of a word array (half 1 of a row whose blocks start mid-word).
template <int WH> __device__ __forceinline__ void shift_words(unsigned* w, int lb) {
#pragma unroll
  for (int i = 0; i < WH - 1; ++i) w[i] = __funnelshift_r(w[i], w[i + 1], lb);
  w[WH - 1] >>= lb;
}

// PF: the next tile's rows are loaded into registers before the current tile is used.
template <class T, int D, int BITS, int NH, bool PF>
__global__ void __launch_bounds__(max_warps(D) * 32, min_blocks(D, NH))
tc_kernel(Geo g, const T* __restrict__ q, const float* __restrict__ inv_freq, float scale, int hq_total, Plan pl,
          float* __restrict__ part) {
  using S = Shape<D, BITS>;
  using HR = Half<D, BITS>;
  constexpr int HALF = S::HALF, HP = S::HP, RS = S::RS, CB = S::CB, TW = S::TW, NB = S::NB, NBH = HR::NBH, WH = HR::WH;
  SQZ_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tok = lane & 15, hf = lane >> 4;  // the lane's token of a tile and its half of the row
  const int jb = hf * NBH;                     // the half's first block
  const int split = blockIdx.x, n = blockIdx.y;
  const int h = blockIdx.z * pl.hpb + warp;
  const bool active = warp < pl.hpb && h < g.H;
  const int G = hq_total / g.H;
  const unsigned base = smem_u32(smem);
  const unsigned cs_s = base;  // [kChunk][HP] (cos, sin) fp32 pairs (cs_off)
  const unsigned stage = base + (unsigned)table_smem_bytes<D, BITS>() + warp * (unsigned)warp_smem_bytes<D, BITS>();  // keys [kTok][RS]
  const unsigned vstage = stage + kTok * RS * 2;   // values [kTok][RS]
  const unsigned kconst = vstage + kTok * RS * 2;  // fp32 [HP][4]: (a, b) of a pair's x and y channels
  const unsigned vscale = kconst + 16 * HP;        // [kTok] float2: value scale, offset per token
  const int r = lane >> 2, c4 = lane & 3;

  __shared__ int bp[2];
  // the key and value books (shared by all heads), read from here right before each use: 12-24
  // registers fewer held through the token loop
  __shared__ __align__(16) unsigned books[2][2][TW];
  const bool row_mine = find_row(g, n, bp);
  if (tid < 2) {
    const Book<TW> bk = make_book<TW>(tid == 0 ? g.key_cb : g.val_cb, 1 << BITS);
#pragma unroll
    for (int w = 0; w < TW; ++w) { books[tid][0][w] = bk.lo[w]; books[tid][1][w] = bk.hi[w]; }
  }
  const bool row_found = __syncthreads_or(row_mine);
  auto book = [&](int i) {
    Book<TW> bk;
    const unsigned a = smem_u32(&books[i][0][0]);
    if constexpr (TW == 2) {
      const uint4 u = lds128(a);
      bk.lo[0] = u.x; bk.lo[1] = u.y; bk.hi[0] = u.z; bk.hi[1] = u.w;
    } else {
      const uint4 u = lds128(a), v = lds128(a + 16);
      bk.lo[0] = u.x; bk.lo[1] = u.y; bk.lo[2] = u.z; bk.lo[3] = u.w;
      bk.hi[0] = v.x; bk.hi[1] = v.y; bk.hi[2] = v.z; bk.hi[3] = v.w;
    }
    return bk;
  };
  const int b = row_found ? bp[0] : -1, L = row_found ? bp[1] + 1 : 0;
  // chunks of the current length spread over the planned splits (see flash_kernel)
  const int sub_now = max(1, ((L + kChunk - 1) / kChunk + pl.splits - 1) / pl.splits);
  const int t_begin = split * sub_now * kChunk, t_end = min(L, t_begin + sub_now * kChunk);

  // per-warp constants: key a/b per staged column, q fragments
  unsigned qa[2 * S::KX][4] = {};
  if (active) {
    const float* lo = g.key_lo + (long long)h * D;
    const float* hi = g.key_hi + (long long)h * D;
    for (int col = lane; col < 2 * HP; col += 32) {
      const int i = col < HP ? col : col - HP, ch = col < HP ? i : i + HALF;
      float a_ = 0.f, b_ = 0.f;
      if (i < HALF) {
        const float l_ = lo[ch], s_ = 0.5f * (hi[ch] - l_);
        a_ = s_;
        b_ = l_ + s_;
      }
      sts32(kconst + 16 * i + (col < HP ? 0 : 8), a_);
      sts32(kconst + 16 * i + (col < HP ? 4 : 12), b_);
    }
    // q rows (query heads of this kv head) staged as 16 x [x plane | y plane], then ldmatrix;
    // 8 channels per lane and step (a split walks only a few tiles: this runs once per split)
    const float qs = scale * kLog2e;
    constexpr int QC = 2 * HP / 8;  // 16-byte chunks per staged row
    for (int e = lane; e < 16 * QC; e += 32) {
      const int row = e / QC, ck = e % QC;
      const bool yp = ck >= HP / 8;
      const int i0 = 8 * (yp ? ck - HP / 8 : ck);  // first RoPE pair of the chunk (HALF % 8 == 0)
      unsigned u[4] = {0u, 0u, 0u, 0u};
      if (row < G && i0 < HALF && b >= 0) {
        const uint4 raw = *reinterpret_cast<const uint4*>(q + ((long long)n * hq_total + (long long)h * G + row) * D +
                                                          (yp ? HALF : 0) + i0);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) u[k] = h2u(__floats2half2_rn(to_f(v[2 * k]) * qs, to_f(v[2 * k + 1]) * qs));
      }
      sts128(stage + swz<RS>(row, ck), u[0], u[1], u[2], u[3]);
    }
    __syncwarp();
#pragma unroll
    for (int kb = 0; kb < 2 * S::KX; ++kb) {
      const int row = (lane & 7) + ((lane >> 3) & 1) * 8, ch = 2 * kb + (lane >> 4);
      ldmatrix_x4(stage + swz<RS>(row, ch), qa[kb][0], qa[kb][1], qa[kb][2], qa[kb][3]);
      if constexpr (NH == 1) qa[kb][1] = qa[kb][3] = 0u;  // G <= 8: query rows 8..15 are zero
    }
    __syncwarp();
  }

  float acc[S::MT][NH][4];
#pragma unroll
  for (int mt = 0; mt < S::MT; ++mt)
#pragma unroll
    for (int nh = 0; nh < NH; ++nh)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nh][e] = 0.f;
  float m_run[NH], l_run[NH], pa_run[NH];  // pa: sum of p * value offset (per lane, query-head row)
#pragma unroll
  for (int nh = 0; nh < NH; ++nh) { m_run[nh] = -INFINITY; l_run[nh] = 0.f; pa_run[nh] = 0.f; }

  const int srow = b >= 0 ? sink_row(g, b) : 0;
  const int nk = g.nk, nv = g.nv, ns = nk + nv, MB = g.mbytes;
  long long sl_next = 0;  // slot of the token `load` read last (0 where it read none)
  auto load = [&](int t, Rows<WH>& rw) {
    sl_next = 0;
    if (active && t < t_end && t >= g.sink) {
      const long long sl = slot_of(g, b, t, h);
      sl_next = sl;
      load_words<WH, HR::VW, HR::NW>(g.kc + sl * CB, hf * HR::W0, rw.k);
      load_words<WH, HR::VW, HR::NW>(g.vc + sl * CB, hf * HR::W0, rw.v);
      if constexpr (HR::LB != 0) {
        shift_words<WH>(rw.k, hf * HR::LB);
        shift_words<WH>(rw.v, hf * HR::LB);
      }
      rw.m = __ldg(reinterpret_cast<const unsigned*>(g.meta + sl * MB));
    } else {
#pragma unroll
      for (int i = 0; i < WH; ++i) { rw.k[i] = 0; rw.v[i] = 0; }
      rw.m = 0;
    }
  };

  Rows<WH> cur, nxt;
  load(t_begin + tok, cur);
  for (int t0c = t_begin; t0c < t_end; t0c += kChunk) {
    const int cnt_c = min(kChunk, t_end - t0c);
    // cos/sin table of the chunk (pairs >= HALF are zero)
    __syncthreads();
    for (int e = tid; e < cnt_c * HP; e += blockDim.x) {
      const int tt = e / HP, i = e % HP;
      float sn = 0.f, cn = 0.f;
      if (i < HALF) sincos_reduced(__fmul_rn((float)(t0c + tt), inv_freq[i]), &sn, &cn);
      sts32(cs_s + cs_off<HP>(tt, 2 * i), cn);
      sts32(cs_s + cs_off<HP>(tt, 2 * i + 1), sn);
    }
    __syncthreads();
    if (!active) continue;
    for (int tt0 = 0; tt0 < cnt_c; tt0 += kTok) {
      const int t0 = t0c + tt0, t = t0 + tok;
      const long long sl = sl_next;  // this tile's row was loaded last (sink and past-end: none)
      if constexpr (PF) load(t + kTok, nxt);
      const bool valid = t < t_end, sink = valid && t < g.sink;
      // ---- stage keys, rotated: k = a * cb + b and the RoPE rotation in fp32, then split into
      // fp16 hi (key tile) and lo (the value tile, free until the scores are done), each as
      // x plane | y plane. Sink tokens come exact from the fp16 side store.
      {
        const int tr = tt0 + tok;  // the token's row of the cos/sin table
        const uint16_t* sk = sink ? g.sink_k + sink_at(g, srow, t, h) : nullptr;
        const Book<TW> kbook = book(0);
#pragma unroll
        for (int jl = 0; jl < NBH; ++jl) {
          const int j = jb + jl;  // block of the row: RoPE pairs 8j .. 8j+7
          if (NB % 2 == 1 && j >= NB) {  // the plane padding chunk
            sts128(stage + swz<RS>(tok, j), 0, 0, 0, 0);
            sts128(stage + swz<RS>(tok, HP / 8 + j), 0, 0, 0, 0);
            sts128(vstage + swz<RS>(tok, j), 0, 0, 0, 0);
            sts128(vstage + swz<RS>(tok, HP / 8 + j), 0, 0, 0, 0);
            continue;
          }
          // per pair of RoPE pairs w: dequantize (k = a * cb + b, fp32), rotate, split; the
          // constants of a pair (a, b of x and y) and the (cos, sin) of two pairs are one 16-byte
          // load each, next to their use (few registers live at once)
          unsigned X[4], XL[4], Y[4], YL[4];
          if (!sink) {
            unsigned x[4], y[4];
            key_block<BITS, TW>(cur.k, jl, kbook, x, y);
#pragma unroll
            for (int w = 0; w < 4; ++w) {
              const int i = 8 * j + 2 * w;
              const float4 k0 = lds128f(kconst + 16 * i), k1 = lds128f(kconst + 16 * i + 16);
              const float4 cs = lds128f(cs_s + cs_off<HP>(tr, 2 * i));
              const float2 cx = __half22float2(u2h(x[w])), cy = __half22float2(u2h(y[w]));
              rotate2(fmaf(k0.x, cx.x, k0.y), fmaf(k0.z, cy.x, k0.w), fmaf(k1.x, cx.y, k1.y), fmaf(k1.z, cy.y, k1.w),
                      cs.x, cs.y, cs.z, cs.w, X[w], XL[w], Y[w], YL[w]);
            }
          } else {
            const uint4 a = *reinterpret_cast<const uint4*>(sk + 8 * j), bb = *reinterpret_cast<const uint4*>(sk + HALF + 8 * j);
            const unsigned aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {bb.x, bb.y, bb.z, bb.w};
#pragma unroll
            for (int w = 0; w < 4; ++w) {
              const float4 cs = lds128f(cs_s + cs_off<HP>(tr, 2 * (8 * j + 2 * w)));
              const float2 cx = __half22float2(u2h(aw[w])), cy = __half22float2(u2h(bw[w]));
              rotate2(cx.x, cy.x, cx.y, cy.y, cs.x, cs.y, cs.z, cs.w, X[w], XL[w], Y[w], YL[w]);
            }
          }
          sts128(stage + swz<RS>(tok, j), X[0], X[1], X[2], X[3]);
          sts128(stage + swz<RS>(tok, HP / 8 + j), Y[0], Y[1], Y[2], Y[3]);
          sts128(vstage + swz<RS>(tok, j), XL[0], XL[1], XL[2], XL[3]);
          sts128(vstage + swz<RS>(tok, HP / 8 + j), YL[0], YL[1], YL[2], YL[3]);
        }
        // key outliers: exact values replace the dequantized ones. The staged pair is already
        // rotated, so the pre-RoPE value is recovered by the inverse rotation (within fp16
        // rounding) and the difference is rotated into both halves of the pair. The token's two
        // lanes take its outliers two at a time (any block: both halves are staged by now); when
        // a step's two outliers are the two channels of one pair, lane half 0 does both, in turn.
        __syncwarp();
        const uint8_t* me = g.meta + sl * MB;
        auto key_outlier = [&](int s_, int ch) {
          const bool xh = ch < HALF;
          const int i = xh ? ch : ch - HALF;
          const float ex = half_bits(me + 4 + 2 * s_);
          const unsigned ax_ = swz<RS>(tok, i >> 3) + (i & 7) * 2, ay_ = swz<RS>(tok, (HP + i) >> 3) + (i & 7) * 2;
          const float xr = h2f(lds16(stage + ax_)) + h2f(lds16(vstage + ax_)), yr = h2f(lds16(stage + ay_)) + h2f(lds16(vstage + ay_));
          const float c = lds32(cs_s + cs_off<HP>(tr, 2 * i)), sn = lds32(cs_s + cs_off<HP>(tr, 2 * i + 1));
          float nx, ny;
          if (xh) {
            const float d = ex - fmaf(xr, c, yr * sn);  // x = x' c + y' s
            nx = fmaf(c, d, xr);
            ny = fmaf(sn, d, yr);
          } else {
            const float d = ex - fmaf(yr, c, -xr * sn);  // y = y' c - x' s
            nx = fmaf(-sn, d, xr);
            ny = fmaf(c, d, yr);
          }
          unsigned hi, lo;
          split2(nx, ny, hi, lo);  // (nx, ny) as hi/lo halves: x in the low 16 bits, y in the high
          sts16(stage + ax_, (unsigned short)(hi & 0xffffu));
          sts16(vstage + ax_, (unsigned short)(lo & 0xffffu));
          sts16(stage + ay_, (unsigned short)(hi >> 16));
          sts16(vstage + ay_, (unsigned short)(lo >> 16));
        };
        const bool has = valid && !sink;
        for (int s0 = 0; s0 < nk; s0 += 2) {
          const int c0 = has ? min((int)__ldg(me + 4 + 2 * ns + s0), D - 1) : 0;
          const int c1 = has && s0 + 1 < nk ? min((int)__ldg(me + 4 + 2 * ns + s0 + 1), D - 1) : -1;
          const bool same = c1 >= 0 && (c0 < HALF ? c0 : c0 - HALF) == (c1 < HALF ? c1 : c1 - HALF);
          if (has && (hf == 0 || (c1 >= 0 && !same))) key_outlier(s0 + hf, hf == 0 ? c0 : c1);
          if (__any_sync(0xffffffffu, same)) {
            __syncwarp();
            if (hf == 0 && same) key_outlier(s0 + 1, c1);
          }
          __syncwarp();
        }
      }
      __syncwarp();
      // ---- scores: 2 n-tiles of 8 tokens, rows = query heads
      float sc[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nt][e] = 0.f;
        const int row = 8 * nt + (lane & 7), m = lane >> 3;
#pragma unroll
        for (int kx = 0; kx < S::KX; ++kx) {
          const int ch = 2 * kx + (m & 1) + ((m >> 1) ? HP / 8 : 0);
          unsigned x0, x1, y0, y1, xl0, xl1, yl0, yl1;  // rotated keys, hi and lo
          ldmatrix_x4(stage + swz<RS>(row, ch), x0, x1, y0, y1);
          ldmatrix_x4(vstage + swz<RS>(row, ch), xl0, xl1, yl0, yl1);
          mma_16816<__half>(sc[nt], qa[kx][0], qa[kx][1], qa[kx][2], qa[kx][3], x0, x1);
          mma_16816<__half>(sc[nt], qa[S::KX + kx][0], qa[S::KX + kx][1], qa[S::KX + kx][2], qa[S::KX + kx][3], y0, y1);
          mma_16816<__half>(sc[nt], qa[kx][0], qa[kx][1], qa[kx][2], qa[kx][3], xl0, xl1);
          mma_16816<__half>(sc[nt], qa[S::KX + kx][0], qa[S::KX + kx][1], qa[S::KX + kx][2], qa[S::KX + kx][3], yl0, yl1);
        }
        // mask tokens past the end
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (t0 + 8 * nt + 2 * c4 + (e & 1) >= t_end) sc[nt][e] = -INFINITY;
      }
      __syncwarp();  // the keys are read: both tiles are free
      // ---- stage values: codebook values only (v = offset + scale * cb), fp16, staging order
      {
        const float vlo = h2f((unsigned short)(cur.m & 0xffffu)), vhi = h2f((unsigned short)(cur.m >> 16));
        float sv = 0.5f * (vhi - vlo), av = vlo + sv;
        const Book<TW> vbook = book(1);
#pragma unroll
        for (int jl = 0; jl < NBH; ++jl) {
          const int j = jb + jl;
          if (NB % 2 == 1 && j >= NB) continue;
          unsigned v[8];
          value_block<BITS, TW>(cur.v, jl, vbook, v);
          sts128(vstage + swz<RS>(tok, 2 * j), v[0], v[1], v[2], v[3]);
          sts128(vstage + swz<RS>(tok, 2 * j + 1), v[4], v[5], v[6], v[7]);
        }
        __syncwarp();  // a sink row or an outlier may fall in the block the token's other lane staged
        if (sink) {  // exact fp16 values: scale 1, offset 0
          sv = 1.f;
          av = 0.f;
          const uint16_t* sv_ = g.sink_v + sink_at(g, srow, t, h);
          for (int col = 16 * jb; col < min(D, 16 * (jb + NBH)); ++col) {
            const int ch = value_channel<BITS>(col);
            sts16(vstage + swz<RS>(tok, col >> 3) + (col & 7) * 2, sv_[ch]);
          }
        } else if (valid && nv > 0) {
          // an outlier is staged as (exact - offset) / scale; the scale grows (rarely: a flat
          // vector, or an outlier far outside its range) so that this stays within fp16, the
          // other entries then move by at most scale growth * |cb| <= |outlier - offset| / 2^14
          const uint8_t* me = g.meta + sl * MB;
          for (int s_ = 0; s_ < nv; ++s_) {
            const float ex = __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(me + 4 + 2 * (nk + s_)))));
            sv = fmaxf(sv, fabsf(ex - av) * (1.f / 16384.f));
          }
          sv = fmaxf(sv, 1e-30f);
          const float inv = 1.f / sv;
          for (int s_ = hf; s_ < nv; s_ += 2) {  // the token's two lanes take turns
            const int ch = min((int)__ldg(me + 4 + 2 * ns + nk + s_), D - 1);
            const int col = value_column<BITS>(ch);
            const float ex = __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(me + 4 + 2 * (nk + s_)))));
            sts16(vstage + swz<RS>(tok, col >> 3) + (col & 7) * 2, __half_as_ushort(__float2half_rn((ex - av) * inv)));
          }
        }
        if (hf == 0) st_shared_v2f(vscale + tok * 8, sv, av);
      }
      __syncwarp();
      // ---- online softmax (log2 domain), per query-head row r (+8): the row's max over the
      // quad, p = 2^(s - m); P^T fragments carry p * (the token's value scale), the value
      // offsets are summed separately (pa).
      unsigned pb[NH][2];  // P^T fragments: [head tile][b0/b1]
      float alpha[NH];
      float4 sa[2];  // (scale, offset) of tokens 8nt + 2c4, +1
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint4 u = lds128(vscale + (8 * nt + 2 * c4) * 8);
        sa[nt] = make_float4(__uint_as_float(u.x), __uint_as_float(u.y), __uint_as_float(u.z), __uint_as_float(u.w));
      }
      bool grew = false;
#pragma unroll
      for (int nh = 0; nh < NH; ++nh) {
        float mx = fmaxf(fmaxf(sc[0][2 * nh], sc[0][2 * nh + 1]), fmaxf(sc[1][2 * nh], sc[1][2 * nh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        alpha[nh] = online_max(m_run[nh], mx, grew);
        const float mn = m_run[nh];
        float sum = 0.f, off = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const float p0 = exp2f(sc[nt][2 * nh] - mn), p1 = exp2f(sc[nt][2 * nh + 1] - mn);
          sum += p0 + p1;
          off = fmaf(p0, sa[nt].y, fmaf(p1, sa[nt].w, off));
          pb[nh][nt] = h2u(__floats2half2_rn(p0 * sa[nt].x, p1 * sa[nt].z));
        }
        l_run[nh] = l_run[nh] * alpha[nh] + sum;
        pa_run[nh] = pa_run[nh] * alpha[nh] + off;
      }
      // rescale the accumulators (columns are heads 2*c4, 2*c4+1 (+8)); once the running maxima
      // settle this is skipped for whole tiles
      if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
        for (int nh = 0; nh < NH; ++nh) {
          const float a0 = __shfl_sync(0xffffffffu, alpha[nh], 8 * c4), a1 = __shfl_sync(0xffffffffu, alpha[nh], 8 * c4 + 4);
#pragma unroll
          for (int mt = 0; mt < S::MT; ++mt) {
            acc[mt][nh][0] *= a0; acc[mt][nh][1] *= a1;
            acc[mt][nh][2] *= a0; acc[mt][nh][3] *= a1;
          }
        }
      }
      // ---- out^T[channels x heads] += V^T P^T (one k-block: the tile's 16 tokens)
      {
        const int m = lane >> 3, row = (m >> 1) * 8 + (lane & 7);
#pragma unroll
        for (int mt = 0; mt < S::MT; ++mt) {
          unsigned a[4];
          ldmatrix_x4_trans(vstage + swz<RS>(row, 2 * mt + (m & 1)), a[0], a[1], a[2], a[3]);
#pragma unroll
          for (int nh = 0; nh < NH; ++nh) mma_16816<__half>(acc[mt][nh], a[0], a[1], a[2], a[3], pb[nh][0], pb[nh][1]);
        }
      }
      __syncwarp();
      if constexpr (PF) cur = nxt;
      else load(t + kTok, cur);
    }
  }
  if (!active) return;
  // ---- partials: acc (unnormalised), m (natural log), l
#pragma unroll
  for (int nh = 0; nh < NH; ++nh) {
    l_run[nh] += __shfl_xor_sync(0xffffffffu, l_run[nh], 1);
    l_run[nh] += __shfl_xor_sync(0xffffffffu, l_run[nh], 2);
    pa_run[nh] += __shfl_xor_sync(0xffffffffu, pa_run[nh], 1);
    pa_run[nh] += __shfl_xor_sync(0xffffffffu, pa_run[nh], 2);
  }
  auto part_row = [&](int head) -> float* {
    return part + (((long long)n * hq_total + (long long)h * G + head) * pl.splits + split) * (D + 2);
  };
#pragma unroll
  for (int nh = 0; nh < NH; ++nh) {
    // value offsets of the lane's two head columns (held by the lanes of rows 2*c4, 2*c4 + 1)
    const float off0 = __shfl_sync(0xffffffffu, pa_run[nh], 8 * c4), off1 = __shfl_sync(0xffffffffu, pa_run[nh], 8 * c4 + 4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int head = 8 * nh + 2 * c4 + (e & 1);
      if (head < G)
#pragma unroll
        for (int mt = 0; mt < S::MT; ++mt)
          part_row(head)[value_channel<BITS>(16 * mt + r + 8 * (e >> 1))] = acc[mt][nh][e] + ((e & 1) ? off1 : off0);
    }
    const int head = 8 * nh + r;
    if (c4 == 0 && head < G) {
      part_row(head)[D] = m_run[nh] == -INFINITY ? -INFINITY : m_run[nh] * 0.6931471805599453f;
      part_row(head)[D + 1] = l_run[nh];
    }
  }
}

template <class T, int D, int BITS, int NH, bool PF>
void launch_pf(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& inv_freq, float scale, const Plan& pl,
               float* part, cudaStream_t stream) {
  const int N = (int)q.dim(0), Hq = (int)q.dim(1);
  const size_t smem = smem_bytes<D, BITS>(pl.hpb);
  allow_dynamic_smem<tc_kernel<T, D, BITS, NH, PF>>(smem, "kvqAttention");
  launch_plain(tc_kernel<T, D, BITS, NH, PF>, dim3(pl.splits, N, pl.groups), dim3(pl.hpb * 32), smem, stream, g,
               static_cast<const T*>(q.data()), inv_freq.ptr<float>(), scale, Hq, pl, part);
  fast::launch_combine<T>(part, pl.splits, N * Hq, D, static_cast<T*>(out.data()), stream);
}
// Register prefetch of the next tile where a half row is at most 8 words, except at head_dim 128
// with one head tile: there the registers it holds cost spills, and without it the H200 measured
// 2-7% faster at 32K tokens (2/3/4-bit, 32q/8kv). SQUEEZELM_KVQ_PF=0|1 forces either at head_dim
// 128 (tuning; read per call).
template <class T, int D, int BITS, int NH>
void launch(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, const Plan& pl, float* part,
            cudaStream_t s) {
  constexpr bool kDefault = Half<D, BITS>::WH <= 8 && !(D == 128 && NH == 1);
  if constexpr (D == 128 && NH == 1) {
    const int pf = env_int("SQUEEZELM_KVQ_PF", -1);
    if (pf >= 0 && (pf == 1) != kDefault) return launch_pf<T, D, BITS, NH, !kDefault>(out, q, g, f, scale, pl, part, s);
  }
  launch_pf<T, D, BITS, NH, kDefault>(out, q, g, f, scale, pl, part, s);
}
template <class T, int D, int BITS>
void launch_nh(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, const Plan& pl, float* part,
               cudaStream_t s, int G) {
  if constexpr (D == 256) launch<T, D, BITS, 1>(out, q, g, f, scale, pl, part, s);  // covers(): G <= 8
  else if (G <= 8) launch<T, D, BITS, 1>(out, q, g, f, scale, pl, part, s);
  else launch<T, D, BITS, 2>(out, q, g, f, scale, pl, part, s);
}
template <class T, int D>
void launch_bits(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, const Plan& pl, float* part,
                 cudaStream_t s, int G) {
  if (g.bits == 2) launch_nh<T, D, 2>(out, q, g, f, scale, pl, part, s, G);
  else if (g.bits == 3) launch_nh<T, D, 3>(out, q, g, f, scale, pl, part, s, G);
  else launch_nh<T, D, 4>(out, q, g, f, scale, pl, part, s, G);
}
// Covered: G <= 16 query heads per kv head (<= 8 at D = 256), the head sizes below.
inline bool covers(int D, int G) {
  if (G < 1 || G > 16) return false;
  if (D == 256) return G <= 8;
  return D == 64 || D == 80 || D == 96 || D == 128;
}
template <class T>
bool dispatch(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, int L, float* work,
              int64_t work_floats, cudaStream_t s) {
  const int N = (int)q.dim(0), Hq = (int)q.dim(1), dev = q.device.index, G = Hq / g.H;
  if (!covers(g.D, G)) return false;
  if (N == 0) return true;
  const Plan pl = plan(sm_count(dev), N, g.H, G, g.D, L);
  const int64_t need = (int64_t)N * Hq * pl.splits * (g.D + 2);
  if (work && need > work_floats) fail("ERR_ARG", "kvqAttention: the workspace holds " + std::to_string(work_floats) +
                                                      " floats, this call needs " + std::to_string(need));
  float* part = work ? work : partials(dev, (size_t)need * sizeof(float), s);
  switch (g.D) {
    case 64: launch_bits<T, 64>(out, q, g, f, scale, pl, part, s, G); return true;
    case 80: launch_bits<T, 80>(out, q, g, f, scale, pl, part, s, G); return true;
    case 96: launch_bits<T, 96>(out, q, g, f, scale, pl, part, s, G); return true;
    case 128: launch_bits<T, 128>(out, q, g, f, scale, pl, part, s, G); return true;
    case 256: launch_bits<T, 256>(out, q, g, f, scale, pl, part, s, G); return true;
    default: return false;
  }
}
int64_t workspace_floats(int sms, int64_t N, int64_t Hq, int64_t H, int64_t D, int max_seq_len,
                         int chunk_tokens = kChunk) {
  if (N == 0) return 0;
  const Plan pl = plan(sms, (int)N, (int)H, (int)(Hq / H), (int)D, max_seq_len, chunk_tokens);
  return N * Hq * pl.splits * (D + 2);
}
}  // namespace tc

#include "planes.cuh"

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
    launch_plain(append_kernel<T>, grid, dim3(kThreads), 0, stream, g, src);
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
    launch_plain(append_kernel<T>, grid, dim3(kThreads), 0, stream, g, src);
  };
  if (qkv.dtype == DType::F16) run(__half{});
  else run(__nv_bfloat16{});
}

int64_t kvq_attention_workspace_floats(int dev, int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                                       int max_seq_len) {
  // room for either kernel (variant 1, the previous flash kernel, is kept for comparisons and for
  // the shapes the tensor-core kernel does not cover)
  const int sms = sm_count(dev);
  return std::max({planes::workspace_floats(sms, rows, q_heads, kv_heads, head_dim, max_seq_len),
                   tc::workspace_floats(sms, rows, q_heads, kv_heads, head_dim, max_seq_len),
                   flash::workspace_floats(sms, rows, q_heads, kv_heads, head_dim, max_seq_len)});
}

void kvq_attention(const Tensor& out, const Tensor& q, const kvq::Cache& c, const kvq::Calib& cal,
                   const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q, const Tensor& inv_freq,
                   float scale, int max_q, int max_seq_len, float* work, int64_t work_floats, int variant,
                   cudaStream_t stream) {
  (void)max_q;
  Geo g = make_geo(c, cal, page_table, &seq_lens, &cu_q);
  // Variant 0 (default): the rotation-plane kernel where it covers the shape (head_dim 64/96/128,
  // G <= 8 query heads per kv head), else the earlier tensor-core kernel where it does (G <= 16,
  // <= 8 at head_dim 256), else the flash kernel. Variant 2: the earlier tensor-core kernel
  // (kept as the A/B baseline of the default), the flash kernel where it does not cover the
  // shape. Variant 1: the CUDA-core flash kernel always (fp32 throughout).
  // SQUEEZELM_KVQ_VARIANT=1|2 selects one for default calls.
  if (variant == 0) variant = std::max(0, std::min(2, env_int("SQUEEZELM_KVQ_VARIANT", 0)));
  if (variant == 0) {
    const bool done = q.dtype == DType::F16
                          ? planes::dispatch<__half>(out, q, g, inv_freq, scale, max_seq_len, work, work_floats, stream)
                          : planes::dispatch<__nv_bfloat16>(out, q, g, inv_freq, scale, max_seq_len, work, work_floats, stream);
    if (done) return;
  }
  if (variant == 0 || variant == 2) {
    const bool done = q.dtype == DType::F16
                          ? tc::dispatch<__half>(out, q, g, inv_freq, scale, max_seq_len, work, work_floats, stream)
                          : tc::dispatch<__nv_bfloat16>(out, q, g, inv_freq, scale, max_seq_len, work, work_floats, stream);
    if (done) return;
  }
  const bool done = q.dtype == DType::F16
                        ? flash::dispatch<__half>(out, q, g, inv_freq, scale, max_seq_len, work, stream)
                        : flash::dispatch<__nv_bfloat16>(out, q, g, inv_freq, scale, max_seq_len, work, stream);
  if (!done) fail("ERR_UNSUPPORTED", "kvqAttention: head_dim " + std::to_string(g.D) + " is not supported on CUDA");
}

void kvq_dequantize(const Tensor& k_out, const Tensor& v_out, const kvq::Cache& c, const kvq::Calib& cal,
                    const Tensor& page_table, int64_t seq, int64_t sink_row, cudaStream_t stream) {
  const int L = (int)k_out.dim(0);
  if (L == 0) return;
  Geo g = make_geo(c, cal, page_table, nullptr, nullptr);
  g.sink_row_fixed = (int)sink_row;
  dim3 grid(L, g.H);
  if (k_out.dtype == DType::F16)
    launch_plain(dequant_kernel<__half>, grid, dim3(kThreads), 0, stream, g, (int)seq, static_cast<__half*>(k_out.data()),
                 static_cast<__half*>(v_out.data()));
  else
    launch_plain(dequant_kernel<__nv_bfloat16>, grid, dim3(kThreads), 0, stream, g, (int)seq,
                 static_cast<__nv_bfloat16*>(k_out.data()), static_cast<__nv_bfloat16*>(v_out.data()));
}

}  // namespace sqz::cuda
