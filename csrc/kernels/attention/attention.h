// CUDA attention over a paged fp16/bf16 KV cache (GQA, batched, causal).
// Declarations only; kernels live in append.cu, decode.cu and prefill.cu.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "core/tensor.h"

namespace sqz::cuda {

// Writes rows of k/v into their sequences' pages (see docs/ops.md, kvAppend).
void kv_append(const Tensor& kc, const Tensor& vc, const Tensor& k, const Tensor& v, const Tensor& page_table,
               const Tensor& seq_lens, const Tensor& cu_q, cudaStream_t stream);

// Number of f32 elements of workspace `attention` needs for these launch bounds.
int64_t attention_workspace_floats(int device, int num_seqs, int q_heads, int kv_heads, int head_dim, int max_q,
                                   int max_seq_len);

// Causal paged attention. `workspace` (f32, at least attention_workspace_floats elements)
// holds split-KV partials of the decode path; the prefill path does not use it.
void attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
               const Tensor& seq_lens, const Tensor& cu_q, float scale, int max_q, int max_seq_len, float* workspace,
               int64_t workspace_floats, int device, cudaStream_t stream);

// True when `attention` takes the split-KV decode path for these bounds.
bool attention_uses_decode(int q_heads, int kv_heads, int head_dim, int max_q);

}  // namespace sqz::cuda
