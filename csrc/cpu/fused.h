// CPU reference of the decoder's fused ops.
#pragma once
#include "core/tensor.h"

namespace sqz::cpu {

// ropeAppend: qkv[T, (Hq + 2 Hkv) D] holds q | k | v of each row. Rotates q (written to
// q_out[T, Hq, D]) and k by positions[t] (Hugging Face rotate-half, fp32 angle), and writes
// the rotated k and v to the paged caches at the slot kvAppend would use. The rotated k is
// rounded to qkv's dtype before it is stored, as rope followed by kvAppend does.
void rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& qkv, const Tensor& positions,
                 const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q);

// linearRopeAppend: qkv = [rmsnorm(x) * gamma] · wᵀ (+ bias) as fused_linear stores it (mode 0,
// in x's dtype), then rope_append(q_out, kc, vc, qkv, ...): the decode step's q|k|v
// projection and RoPE/append in one call (one launch on CUDA).
void linear_rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& x, const Tensor& w,
                        const Tensor* bias, const Tensor* gamma, float eps, const Tensor& positions,
                        const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q);

}  // namespace sqz::cpu
