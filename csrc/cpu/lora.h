// CPU reference of the batched LoRA op (S-LoRA's heterogeneous batch): every row of a batch may
// use another adapter, of another rank, from one pool of adapter weights.
#pragma once
#include "core/tensor.h"

namespace sqz::cpu {

// y[t, :] += scale[s] * sum_{j < rank_s} (A[off_s + j, :] . x[t, :]) * Bt[off_s + j, :],
// s = slots[t], (off_s, rank_s) = desc[s]. A row whose slot is outside [0, S), or whose entry
// is not a range inside the pool (off < 0, rank < 0, off + rank > R, rank > kLoraMaxRank), is
// left as it is. fp32 math; any float dtype per tensor.
void lora_apply(const Tensor& y, const Tensor& x, const Tensor& slots, const Tensor& a, const Tensor& bt,
                const Tensor& desc, const Tensor& scale);

// The largest rank one slot's entry may span (the CUDA kernel keeps a row's rank products in
// shared memory).
constexpr int kLoraMaxRank = 1024;

}  // namespace sqz::cpu
