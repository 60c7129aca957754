// CUDA launchers of the KVQuant paged cache ops (same contracts as csrc/cpu/kvquant.h).
#pragma once
#include <cuda_runtime.h>

#include "core/tensor.h"
#include "kvquant_layout.h"

namespace sqz::cuda {

void kvq_append(const kvq::Cache& c, const kvq::Calib& cal, const Tensor& k, const Tensor& v,
                const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q, cudaStream_t stream);
void kvq_rope_append(const Tensor* q_out, const kvq::Cache& c, const kvq::Calib& cal, const Tensor& qkv,
                     const Tensor& positions, const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens,
                     const Tensor& cu_q, bool rotate_keys, cudaStream_t stream);
// work / work_floats: caller scratch of kvq_attention_workspace_floats(...) floats, or null
// (then a grow-only per-device buffer, never while capturing a graph). variant: 0 the
// rotation-plane kernel (planes.cuh) where it covers the shape, else the earlier tensor-core
// kernel, else the flash kernel; 1 the CUDA-core flash-decoding kernel always; 2 the earlier
// tensor-core kernel (the flash kernel where it does not cover the shape).
// SQUEEZELM_KVQ_VARIANT=1|2 makes 1 or 2 the default.
void kvq_attention(const Tensor& out, const Tensor& q, const kvq::Cache& c, const kvq::Calib& cal,
                   const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q, const Tensor& inv_freq,
                   float scale, int max_q, int max_seq_len, float* work, int64_t work_floats, int variant,
                   cudaStream_t stream);
int64_t kvq_attention_workspace_floats(int dev, int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                                       int max_seq_len);
void kvq_dequantize(const Tensor& k_out, const Tensor& v_out, const kvq::Cache& c, const kvq::Calib& cal,
                    const Tensor& page_table, int64_t seq, int64_t sink_row, cudaStream_t stream);

}  // namespace sqz::cuda
