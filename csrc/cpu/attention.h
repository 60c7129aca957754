// CPU reference of the paged attention ops (same signatures as the CUDA ones; fp32 math).
#pragma once
#include "core/tensor.h"

namespace sqz::cpu {

// Rows cu_q[b]..cu_q[b+1] of k/v land at positions seq_lens[b] - n_b + j of sequence b.
// Rows whose position is negative or whose page is outside the table/pool are dropped.
void kv_append(const Tensor& kc, const Tensor& vc, const Tensor& k, const Tensor& v, const Tensor& page_table,
               const Tensor& seq_lens, const Tensor& cu_q);

// Causal attention over the paged cache (GQA: query head h reads kv head h / (Hq / Hkv)).
// Keys whose page is outside the table/pool are ignored; a row with no visible key is 0;
// rows outside [cu_q[0], cu_q[B]) are written as 0.
void attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
               const Tensor& seq_lens, const Tensor& cu_q, float scale);

}  // namespace sqz::cpu
