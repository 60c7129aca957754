// CPU reference of Squeezed Attention's decode step: attention over a paged KV cache whose first
// prefixLens[b] tokens (a fixed context, clustered offline) are attended only where their cluster
// is among the topC clusters whose centroid scores highest against the query.
#pragma once
#include "core/tensor.h"

namespace sqz::cpu {

// out[b, h] = softmax attention of q[b, h] over the keys of sequence b (positions 0 .. seqLens[b]-1,
// GQA: query head h reads kv head g = h / (Hq / Hkv)), where a position t < P_b = min(prefixLens[b],
// seqLens[b]) is visible only if it is listed under a selected cluster of kv head g:
//   clusters c of head g own clusterTokens[g][clusterStart[g][c] .. clusterStart[g][c + 1]);
//   the selected ones are the topC with the largest q[b, h] . centroids[g][c] (ties: lower c).
// Positions from P_b on are all visible; P_b = 0 is plain attention. Listed positions outside
// [0, P_b) and start offsets outside [0, Pc] are ignored (clamped), so device data never leads
// a kernel out of bounds. A row with no visible key is 0.
void squeezed_attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
                        const Tensor& seq_lens, float scale, const Tensor& prefix_lens, const Tensor& centroids,
                        const Tensor& cluster_start, const Tensor& cluster_tokens, int top_c);

}  // namespace sqz::cpu
