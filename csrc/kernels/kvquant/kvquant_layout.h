// KVQuant paged cache layout, shared by the CPU reference and the CUDA kernels.
//
// Per layer, for every (page, slot, kv head) one record split over three u8 tensors:
//   kCodes [pages, pageSize, kvHeads, codeBytes]  key codes, b bits each, LSB-first bit
//       stream over the PAIR-INTERLEAVED channel order e = 2i -> channel i,
//       e = 2i + 1 -> channel i + D/2 (the two halves RoPE rotates together).
//   vCodes [pages, pageSize, kvHeads, codeBytes]  value codes, b bits each, LSB-first
//       bit stream in natural channel order.
//   meta   [pages, pageSize, kvHeads, metaBytes]  per token-head vector:
//       +0 fp16 value min, +2 fp16 value max,
//       +4 nk fp16 key outlier values, then nv fp16 value outlier values,
//       then nk u8 key outlier channels, then nv u8 value outlier channels,
//       then (mode KeyPerToken only) fp16 key min, fp16 key max, zero padding.
// codeBytes = D*b/8 rounded up to 16 bytes (a row starts 16-byte aligned); padding is zero.
// Keys: per channel, normalised against calibrated bounds, x = 2(k-lo)/(hi-lo) - 1, code =
// nearest entry of a sorted 2^b codebook in [-1, 1] (ties to the lower entry); dequantised
// as lo + (hi-lo) * 0.5 * (cb + 1). Values: the same per token with the vector's own
// min/max (fp16-rounded, computed without the outliers). Outlier slots are always filled:
// keys keep the nk channels with the largest |x| (entries outside the bounds first), values
// the nv largest |v|; ties go to the lower channel. Outlier channels dequantise to their
// stored fp16 value exactly.
// Sink: the first `sink` tokens of sequence b are also kept as fp16 in
// sinkK/sinkV [rows, sink, kvHeads, D]; sequence b of a call uses row sinkRows[b] (an i32
// device tensor, so rows stay with their sequences when a batch is reordered; without it,
// row b); attention and dequantisation use them instead of the codes for positions < sink.
// Mode bits (ablations; the CPU reference implements every mode, the CUDA kernels mode 0):
//   KeyPerToken: keys are quantized like values (per token-head vector, with its own fp16
//   min/max stored after the outlier channels; outliers are the nk largest |k|); the
//   calibrated key bounds are unused.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/tensor.h"

namespace sqz::kvq {

// One layer's quantized cache and its calibration (all tensors on one device).
enum Mode : int { KeyPerToken = 1 };

struct Cache {
  Tensor k_codes, v_codes, meta;  // u8, see above
  Tensor sink_k, sink_v;          // f16 [rows, sink, kvHeads, D]
  Tensor sink_rows;               // i32 [B] (no storage: row b)
  int bits = 4, nk = 0, nv = 0, sink = 0, mode = 0;
  int64_t kv_heads = 0, head_dim = 0, page_size = 0;
};
struct Calib {
  Tensor key_lo, key_hi;  // f32 [kvHeads * D]
  Tensor key_cb, val_cb;  // f32 [2^bits], sorted
};

inline int64_t code_bytes(int64_t head_dim, int bits) {
  int64_t raw = (head_dim * bits + 7) / 8;
  return (raw + 15) / 16 * 16;
}
inline int64_t meta_bytes(int nk, int nv, int mode = 0) {
  int64_t raw = 4 + 3 * (int64_t)(nk + nv) + ((mode & KeyPerToken) ? 4 : 0);
  return (raw + 3) / 4 * 4;
}
// Offset of the per-token key min/max (mode KeyPerToken).
inline int64_t key_range_offset(int nk, int nv) { return 4 + 3 * (int64_t)(nk + nv); }
// Bytes one token takes in one layer (all kv heads), excluding the fp16 sink side store.
inline int64_t bytes_per_token_layer(int64_t kv_heads, int64_t head_dim, int bits, int nk, int nv, int mode = 0) {
  return kv_heads * (2 * code_bytes(head_dim, bits) + meta_bytes(nk, nv, mode));
}

#ifdef __CUDACC__
#define KVQ_HD __host__ __device__ __forceinline__
#else
#define KVQ_HD inline
#endif

// x normalised to the [-1, 1] range of [lo, hi] (0 for an empty range).
KVQ_HD float normalize(float x, float lo, float hi) {
  if (!(hi > lo)) return 0.f;
  float t = 2.f * (x - lo);
  return t / (hi - lo) - 1.f;
}
// Codebook entries are used at fp16 precision by every op, CPU and CUDA alike (an f32 entry is
// rounded to the nearest fp16 value where it is read). The tensor-core attention kernel then
// multiplies exact codebook values: a per-code rounding left to the kernel alone would be the
// same for every token with that code and would not average out over a long sequence.
KVQ_HD float book_entry(float x) {
#ifdef __CUDA_ARCH__
  return __half2float(__float2half_rn(x));
#else
  return half_to_float(float_to_half(x));
#endif
}
// Nearest entry of a sorted codebook (entries at fp16 precision); ties (and NaN) go to the lower entry.
KVQ_HD int nearest_code(float x, const float* cb, int n) {
  int best = 0;
  float bd = fabsf(x - book_entry(cb[0]));
  for (int j = 1; j < n; ++j) {
    float d = fabsf(x - book_entry(cb[j]));
    if (d < bd) { bd = d; best = j; }
  }
  return best;
}
// lo + (hi - lo) * 0.5 * (c + 1), rounded the same way on host and device (no fused ops).
KVQ_HD float dequant(float lo, float hi, float c) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(lo, __fmul_rn(__fsub_rn(hi, lo), __fmul_rn(0.5f, __fadd_rn(c, 1.f))));
#else
  return lo + (hi - lo) * (0.5f * (c + 1.f));
#endif
}
// How much a key element loses in its code, |k - dequant(code)| in the key's own units (dequant
// rounds alike on host and device, and a lone subtraction has nothing to fuse with). The per-channel
// key outlier slots go to the largest; an element outside the calibrated bounds loses its distance
// to the clamped end entry. (Ranking by the normalised |x| treated a narrow channel's error like a
// wide one's: docs/kvquant.md has the perplexities.)
KVQ_HD float key_loss(float k, float lo, float hi, float entry) { return fabsf(k - dequant(lo, hi, entry)); }
// Code of element e of a packed LSB-first stream of `bits`-bit codes.
KVQ_HD int get_code(const uint8_t* row, int e, int bits) {
  int bit = e * bits, byte = bit >> 3, sh = bit & 7;
  unsigned w = row[byte];
  if (sh + bits > 8) w |= (unsigned)row[byte + 1] << 8;
  return (int)((w >> sh) & ((1u << bits) - 1u));
}
// True when channel i of a score array beats channel j (larger score, ties to lower index).
KVQ_HD bool beats(float si, int i, float sj, int j) { return si > sj || (si == sj && i < j); }

// Element e of the key stream holds channel key_channel(e).
KVQ_HD int key_channel(int e, int head_dim) { return (e & 1) ? (e >> 1) + head_dim / 2 : (e >> 1); }
// Stream position of key channel c.
KVQ_HD int key_element(int c, int head_dim) { return c < head_dim / 2 ? 2 * c : 2 * (c - head_dim / 2) + 1; }

}  // namespace sqz::kvq
