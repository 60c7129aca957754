// Squeezed Attention, decode (one query row per sequence) over the paged fp16/bf16 cache.
//
// Why this shape. Three launches. select: per (sequence, query head) one block of 1024 threads scores
// the query against its kv head's cluster centroids (a warp per 8 centroids, their loads in flight
// together) and flags the topC clusters by a radix select over the scores (ties to the lower cluster;
// squeezed.cuh has why not a sort). attend, where a kv
// head serves at most 8 query heads (squeezed.cuh, attend_group_kernel): per (sequence, kv head) S
// blocks (a split of the work, as flash-decoding splits the keys, so that batch 1 with few heads
// still fills the GPU). Each key and value row is read once for the group's heads, with 16-byte
// loads, and counts for the heads that flagged its cluster; the kept clusters' token lists and the
// tokens after the fixed context form one list that the splits cut into equal ranges. (The first
// kernel, attend_kernel, still serves larger groups: a block per query head, a lane per key row read
// 2 bytes at a time, clusters dealt to warps whole; on the H100 it ran 3-8x slower than dense
// attention at 8K-32K tokens.) combine: the S partials in split order. Every merge has a fixed
// order, so the result does not depend on timing. The cluster starts go through a running maximum
// clamped to the token list, and token positions outside the context are skipped: no device data
// can send the kernels outside their tensors.
#include <algorithm>
#include <type_traits>
#include <utility>

#include "core/cuda_stream.h"
#include "kernels/common/grow_scratch.h"
#include "kernels/common/launch_config.h"
#include "squeezed.cuh"
#include "squeezed.h"

namespace sqz::cuda {
void squeezed_attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
                        const Tensor& seq_lens, float scale, const Tensor& prefix_lens, const Tensor& context_of,
                        const Tensor& contexts, const Tensor& centroids, const Tensor& cluster_start, const Tensor& cluster_tokens,
                        int max_clusters, cudaStream_t s) {
  using namespace squeezed_kernels;
  Args a{};
  const int64_t B = q.dim(0);
  a.Hq = q.dim(1);
  a.D = q.dim(2);
  a.pages = kc.dim(0);
  a.ps = kc.dim(1);
  a.Hkv = kc.dim(2);
  a.maxp = page_table.dim(1);
  a.G = a.Hq / a.Hkv;
  a.cof = context_of.ptr<int>();
  a.table = contexts.ptr<int>();
  a.n_contexts = contexts.dim(0);
  a.cen_len = centroids.numel();
  a.cs_len = cluster_start.numel();
  a.ct_len = cluster_tokens.numel();
  a.max_clusters = std::max(1, max_clusters);
  a.pt = page_table.ptr<int>();
  a.lens = seq_lens.ptr<int>();
  a.pre = prefix_lens.ptr<int>();
  a.cen = centroids.ptr<float>();
  a.cs = cluster_start.ptr<int>();
  a.ct = cluster_tokens.ptr<int>();
  a.scale = scale;
  if (B == 0 || a.Hq == 0) return;
  const int dev = q.device.index;
  // GQA up to 8 query heads per kv head: one block per kv head reads each row once for its heads
  const int GP = a.G <= 1 ? 1 : a.G <= 2 ? 2 : a.G <= 4 ? 4 : a.G <= 8 ? 8 : 0;
  const bool vec = a.D % 8 == 0 && aligned16(kc.data()) && aligned16(vc.data());
  // splits: about two blocks per SM over all (sequence, kv head) or (sequence, head) pairs, at most 32
  const int64_t rows = B * a.Hq, blocks = GP ? B * a.Hkv : rows;
  a.S = (int)std::min<int64_t>(32, std::max<int64_t>(1, (2 * (int64_t)sm_count(dev) + blocks - 1) / blocks));
  const size_t flag_bytes = ((size_t)rows * (size_t)a.max_clusters + 15) / 16 * 16;
  char* ws = static_cast<char*>(
      grow_scratch(Scratch::kSqueezed, dev, flag_bytes + (size_t)rows * a.S * (a.D + 2) * sizeof(float), s, "squeezedAttention scratch"));
  a.flags = reinterpret_cast<unsigned char*>(ws);
  a.part = reinterpret_cast<float*>(ws + flag_bytes);
  const size_t sel_smem = ((size_t)a.D * 4 + (size_t)a.max_clusters * 4 + (size_t)(kSelWarps + kSelBins + 2) * 4 + 15) / 16 * 16;
  const size_t att_smem =
      (std::max((size_t)a.D * 4 + (size_t)(a.max_clusters + 1) * 4 + (size_t)a.max_clusters, (size_t)kWarps * (a.D + 2) * 4) + 15) / 16 * 16;
  const size_t grp_smem = GP ? group_smem_bytes(a.max_clusters, GP, a.D) : 0;
  dispatch_float(q.dtype, "squeezedAttention", [&](auto tv) {
    using T = decltype(tv);
    const void* attend = (const void*)attend_kernel<T>;
    size_t attend_bytes = att_smem;
    auto grouped = [&](auto gp) {
      constexpr int kGP = decltype(gp)::value;
      attend = vec ? (const void*)attend_group_kernel<T, kGP, true> : (const void*)attend_group_kernel<T, kGP, false>;
      attend_bytes = grp_smem;
    };
    if (GP == 1) grouped(std::integral_constant<int, 1>{});
    else if (GP == 2) grouped(std::integral_constant<int, 2>{});
    else if (GP == 4) grouped(std::integral_constant<int, 4>{});
    else if (GP == 8) grouped(std::integral_constant<int, 8>{});
    for (auto [kern, bytes] : {std::pair{(const void*)select_kernel<T>, sel_smem}, std::pair{attend, attend_bytes}})
      if (bytes > 48 * 1024) cuda_check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), "squeezedAttention: smem");
    select_kernel<T><<<dim3((unsigned)a.Hq, (unsigned)B), kSelThreads, sel_smem, s>>>(q.ptr<T>(), a);
    const T* qp = q.ptr<T>();
    const T* kp = kc.ptr<T>();
    const T* vp = vc.ptr<T>();
    void* args[] = {(void*)&qp, (void*)&kp, (void*)&vp, (void*)&a};
    const dim3 grid = GP ? dim3((unsigned)a.Hkv, (unsigned)B, (unsigned)a.S) : dim3((unsigned)a.Hq, (unsigned)B, (unsigned)a.S);
    cuda_check(cudaLaunchKernel(attend, grid, dim3(kThreads), args, attend_bytes, s), "squeezedAttention: attend");
    combine_kernel<T><<<dim3((unsigned)a.Hq, (unsigned)B), kThreads, 0, s>>>(out.ptr<T>(), a);
  });
  cuda_check(cudaGetLastError(), "squeezedAttention: launch");
}

}  // namespace sqz::cuda
