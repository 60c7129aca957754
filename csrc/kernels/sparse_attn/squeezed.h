// Squeezed Attention's decode step on CUDA: the op of csrc/cpu/squeezed.h, same arguments and rules.
#pragma once
#include <cuda_runtime.h>

#include "core/tensor.h"

namespace sqz::cuda {

// The most clusters per kv head the kernel sorts in shared memory.
constexpr int kSqueezedMaxClusters = 4096;

void squeezed_attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
                        const Tensor& seq_lens, float scale, const Tensor& prefix_lens, const Tensor& context_of,
                        const Tensor& contexts, const Tensor& centroids, const Tensor& cluster_start, const Tensor& cluster_tokens,
                        int max_clusters, cudaStream_t s);

}  // namespace sqz::cuda
