// Launchers of the decoder's fused ops on CUDA (definitions in fused.cu). Tensors are
// validated by the binding: one device, contiguous, one float dtype.
#pragma once
#include <cuda_runtime.h>

#include "core/tensor.h"

namespace sqz::cuda {

// See cpu::rope_append: rotary embedding of q and k from a packed q|k|v row, q written
// contiguous, rotated k and v written to the paged caches.
void rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& qkv, const Tensor& positions,
                 const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q,
                 cudaStream_t s);

}  // namespace sqz::cuda
