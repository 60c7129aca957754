// SqueezeLLM dense-and-sparse matmul, CPU reference.
//
// Weight layout (the interchange format, also the kernel layout):
//   qweight i32 [Kp*bits/32, N], Kp = ceil(K/32)*32: the codes of output column n packed along
//   the input dim K, least significant bits first; 4-bit: 8 codes per word; 3-bit: 32 codes in
//   3 words, straddling word boundaries (code i of a group sits at bit 3i of the 96-bit group).
//   lut [N, 2^bits] (f16 | f32): row n = the codebook of output channel n.
//   Optional outliers in CSR over output rows: rows i32 [N+1], cols i32 [nnz], vals [nnz]
//   (f16 | f32), added to the dense part.
// y[m, n] = sum_k lut[n, code(n, k)] * x[m, k] + sum_j vals[j] * x[m, cols[j]].
#pragma once
#include <cstdint>

#include "../core/tensor.h"

namespace sqz::cpu {

// Decodes code i (0..31) of a 32-code group given the group's `bits` words.
inline uint32_t lut_code(const uint32_t* w, int bits, int i) {
  if (bits == 4) return (w[i >> 3] >> ((i & 7) * 4)) & 15u;
  const int bit = 3 * i, word = bit >> 5, off = bit & 31;
  uint32_t v = w[word] >> off;
  if (off > 29) v |= w[word + 1] << (32 - off);
  return v & 7u;
}

void lut_matmul(const Tensor& y, const Tensor& x, const Tensor& qweight, const Tensor& lut,
                const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits);

}  // namespace sqz::cpu
