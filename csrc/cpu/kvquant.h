// CPU reference of the KVQuant paged cache ops (layout in kernels/kvquant/kvquant_layout.h).
// fp32 math, multi-threaded; shapes and dtypes are validated by the binding.
#pragma once
#include "core/tensor.h"
#include "kernels/kvquant/kvquant_layout.h"

namespace sqz::cpu {

// Quantizes rows k/v [N, kvHeads, D] and writes them at positions seqLens[b] - n_b + j.
void kvq_append(const kvq::Cache& c, const kvq::Calib& cal, const Tensor& k, const Tensor& v,
                const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q);
// From packed rows qkv [N, (Hq + 2 kvHeads) D]: rotates the q heads into q_out [N, Hq, D]
// (when given; the numerics of ropeAppend) and quantizes the k (pre-RoPE, or rotated at
// `positions` when rotate_keys) and v heads into the cache, as kvq_append does.
void kvq_rope_append(const Tensor* q_out, const kvq::Cache& c, const kvq::Calib& cal, const Tensor& qkv,
                     const Tensor& positions, const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens,
                     const Tensor& cu_q, bool rotate_keys);
// Causal attention of q [N, Hq, D] (already rotated) over the quantized cache; RoPE is
// applied to the dequantized keys at their positions.
void kvq_attention(const Tensor& out, const Tensor& q, const kvq::Cache& c, const kvq::Calib& cal,
                   const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q,
                   const Tensor& inv_freq, float scale);
// Unpacks positions [0, L) of page-table row `seq` to k_out/v_out [L, kvHeads, D] (keys as
// stored, pre-RoPE; sink positions from row `sink_row` of the fp16 side store).
void kvq_dequantize(const Tensor& k_out, const Tensor& v_out, const kvq::Cache& c, const kvq::Calib& cal,
                    const Tensor& page_table, int64_t seq, int64_t sink_row);

}  // namespace sqz::cpu
