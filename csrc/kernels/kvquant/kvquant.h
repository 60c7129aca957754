// CUDA launchers of the KVQuant paged cache ops (same contracts as csrc/cpu/kvquant.h).
#pragma once
#include <cuda_runtime.h>

#include "core/tensor.h"
#include "kvquant_layout.h"

namespace sqz::cuda {

void kvq_append(const kvq::Cache& c, const kvq::Calib& cal, const Tensor& k, const Tensor& v,
                const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q, cudaStream_t stream);
void kvq_attention(const Tensor& out, const Tensor& q, const kvq::Cache& c, const kvq::Calib& cal,
                   const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q, const Tensor& inv_freq,
                   float scale, int max_q, int max_seq_len, cudaStream_t stream);
void kvq_dequantize(const Tensor& k_out, const Tensor& v_out, const kvq::Cache& c, const kvq::Calib& cal,
                    const Tensor& page_table, int64_t seq, cudaStream_t stream);

}  // namespace sqz::cuda
