// Launchers of the decoder's small ops on CUDA (definitions in the .cu files of this
// folder). Tensors are validated by the binding: one device, contiguous, and on CUDA the
// activations and weights of one call share a dtype (f32, f16 or bf16).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "core/tensor.h"

namespace sqz::cuda {

void gather_rows(const Tensor& out, const Tensor& src, const Tensor& index, cudaStream_t s);
void rms_norm(const Tensor& out, const Tensor& x, const Tensor& weight, float eps, cudaStream_t s);
void add_rms_norm(const Tensor& residual, const Tensor& x, const Tensor& out, const Tensor& weight, float eps,
                  cudaStream_t s);
void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, cudaStream_t s);
void silu_mul(const Tensor& out, const Tensor& gate_up, cudaStream_t s);
void add(const Tensor& out, const Tensor& a, const Tensor& b, cudaStream_t s);
void cast(const Tensor& out, const Tensor& x, cudaStream_t s);
void fill(const Tensor& t, double value, cudaStream_t s);
void fill_random(const Tensor& t, uint64_t seed, float mean, float std, cudaStream_t s);
void fill_random_int(const Tensor& t, uint64_t seed, cudaStream_t s);
void argmax(const Tensor& out, const Tensor& logits, cudaStream_t s);
void sample(const Tensor& out, const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
            const Tensor& top_p, const Tensor& rng, cudaStream_t s);

}  // namespace sqz::cuda
