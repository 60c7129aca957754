// CPU reference of Squeezed Attention's decode step: attention over a paged KV cache whose first
// prefixLens[b] tokens (a fixed context, clustered offline) are attended only where their cluster
// is among the top clusters whose centroids score highest against the query.
#pragma once
#include "core/tensor.h"

namespace sqz::cpu {

// out[b, h] = softmax attention of q[b, h] over the keys of sequence b (positions 0 .. seqLens[b]-1,
// GQA: query head h reads kv head g = h / (Hq / Hkv)). With context n = contextOf[b] (the table of
// kernels/sparse_attn/squeezed_layout.h), a position t < P_b = min(prefixLens[b], seqLens[b]) is
// visible only if it is listed under a selected cluster of kv head g: cluster c owns
// clusterTokens[tok + g P_n + clusterStart[start + g (C_n + 1) + c] .. (c + 1)); the selected ones
// are the topC_n with the largest q[b, h] . centroid (ties: lower c). Positions from P_b on are all
// visible; no context, or an entry that does not fit, is plain attention. The starts are taken as
// a running maximum clamped to [0, P_n] and listed positions outside [0, P_b) are skipped, so device
// data never leads a kernel out of bounds (a position listed twice counts twice). A row with no
// visible key is 0. max_clusters bounds C_n (the CUDA kernels' shared memory).
void squeezed_attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
                        const Tensor& seq_lens, float scale, const Tensor& prefix_lens, const Tensor& context_of,
                        const Tensor& contexts, const Tensor& centroids, const Tensor& cluster_start, const Tensor& cluster_tokens,
                        int max_clusters);

}  // namespace sqz::cpu
