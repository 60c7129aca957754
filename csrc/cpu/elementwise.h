// CPU reference of the decoder's small ops (embedding, norms, rope, activations, casts,
// fills, gathers, argmax, sampling). Any float dtype per tensor, fp32 math, multi-threaded.
// Shapes and dtypes are validated by the binding before these run.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace sqz::cpu {

void embedding(const Tensor& out, const Tensor& ids, const Tensor& table);
void gather_rows(const Tensor& out, const Tensor& x, const Tensor& index);
void rms_norm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps);
void add_rms_norm(const Tensor& residual, const Tensor& x, const Tensor& out, const Tensor& weight, float eps);
void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq);
void silu_mul(const Tensor& out, const Tensor& gate_up);
void add(const Tensor& out, const Tensor& a, const Tensor& b);
void cast(const Tensor& out, const Tensor& x);
void fill(const Tensor& t, double value);
void fill_random(const Tensor& t, uint64_t seed, float mean, float std);
void fill_random_int(const Tensor& t, uint64_t seed);
void argmax(const Tensor& out, const Tensor& logits);
void sample(const Tensor& out, const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
            const Tensor& top_p, const Tensor& rng);

}  // namespace sqz::cpu
