// Squeezed Attention, decode (one query row per sequence) over the paged fp16/bf16 cache.
//
// Why this shape. Per (sequence, query head) one block: the query is scored against the kv head's
// cluster centroids, the scores are sorted in shared memory (bitonic, ties to the lower cluster)
// and the topC clusters kept, then 8 warps walk the kept clusters' token lists (cluster c to warp
// c mod 8) and the tokens after the fixed context (32-token steps dealt round robin), each with an
// online softmax 32 tokens at a time; the 8 partial states are merged in a fixed order, so the
// result does not depend on timing. The cluster starts go through a running maximum (a scan in shared memory) clamped to the
// token list, and token positions outside the context are skipped: no device data can send the
// kernel outside its tensors. A first kernel, not yet measured: one block per (sequence, query head)
// leaves SMs idle at batch 1 with few heads (a split over the keys, as the dense decode has, is the
// next step once a GPU has timed it).
#include <algorithm>

#include "core/cuda_stream.h"
#include "squeezed.cuh"
#include "squeezed.h"

namespace sqz::cuda {

void squeezed_attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
                        const Tensor& seq_lens, float scale, const Tensor& prefix_lens, const Tensor& centroids,
                        const Tensor& cluster_start, const Tensor& cluster_tokens, int top_c, cudaStream_t s) {
  using namespace squeezed_kernels;
  Args a{};
  const int64_t B = q.dim(0);
  a.Hq = q.dim(1);
  a.D = q.dim(2);
  a.pages = kc.dim(0);
  a.ps = kc.dim(1);
  a.Hkv = kc.dim(2);
  a.maxp = page_table.dim(1);
  a.C = centroids.dim(1);
  a.Pc = cluster_tokens.dim(1);
  a.G = a.Hq / a.Hkv;
  a.pt = page_table.ptr<int>();
  a.lens = seq_lens.ptr<int>();
  a.pre = prefix_lens.ptr<int>();
  a.cen = centroids.ptr<float>();
  a.cs = cluster_start.ptr<int>();
  a.ct = cluster_tokens.ptr<int>();
  a.top_c = top_c;
  a.scale = scale;
  a.Cpad = 1;
  while (a.Cpad < a.C) a.Cpad <<= 1;
  if (B == 0 || a.Hq == 0) return;
  const size_t sel = (size_t)a.D * 4 + (size_t)a.Cpad * 8 + (size_t)(a.C + 1) * 4 + (size_t)a.C;
  const size_t merge = (size_t)kWarps * (a.D + 2) * 4;
  const size_t smem = (std::max(sel, merge) + 15) / 16 * 16;
  dispatch_float(q.dtype, "squeezedAttention", [&](auto tv) {
    using T = decltype(tv);
    auto kern = squeezed_kernel<T>;
    if (smem > 48 * 1024) cuda_check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "squeezedAttention: smem");
    kern<<<dim3((unsigned)a.Hq, (unsigned)B), kThreads, smem, s>>>(out.ptr<T>(), q.ptr<T>(), kc.ptr<T>(), vc.ptr<T>(), a);
  });
  cuda_check(cudaGetLastError(), "squeezedAttention: launch");
}

}  // namespace sqz::cuda
