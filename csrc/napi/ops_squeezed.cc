// Binding of Squeezed Attention's decode op (csrc/cpu/squeezed.h, csrc/kernels/sparse_attn).
#include <algorithm>
#include <cmath>
#include <string>

#include "../cpu/squeezed.h"
#include "op.h"
#ifdef SQUEEZELM_WITH_CUDA
#include "../kernels/sparse_attn/squeezed.h"
#endif

namespace sqz::napi {

// squeezedAttention(out[B,Hq,D], q[B,Hq,D], kCache, vCache [pages,pageSize,Hkv,D], pageTable i32[B,maxPages],
//   seqLens i32[B], scale, prefixLens i32[B], contextOf i32[B], contexts i32[N,6], centroids f32[*],
//   clusterStart i32[*], clusterTokens i32[*], maxClusters) -- the context table of
//   kernels/sparse_attn/squeezed_layout.h.
SQZ_OP(squeezedAttention) {
  Args a(info, "squeezedAttention");
  Tensor out = a.tensor(0, "out"), q = a.tensor(1, "q"), kc = a.tensor(2, "kCache"), vc = a.tensor(3, "vCache"),
         pt = a.tensor(4, "pageTable"), lens = a.tensor(5, "seqLens");
  const double scale = a.number(6, "scale");
  Tensor pre = a.tensor(7, "prefixLens"), cof = a.tensor(8, "contextOf"), tab = a.tensor(9, "contexts"), cen = a.tensor(10, "centroids"),
         cs = a.tensor(11, "clusterStart"), ct = a.tensor(12, "clusterTokens");
  const int64_t max_clusters = a.integer(13, "maxClusters");
  for (auto [t, n] : {std::pair{&out, "out"}, {&q, "q"}, {&kc, "kCache"}, {&vc, "vCache"}}) a.dtype_in(*t, n, {DType::F32, DType::F16, DType::BF16});
  for (auto [t, n] : {std::pair{&pt, "pageTable"}, {&lens, "seqLens"}, {&pre, "prefixLens"}, {&cof, "contextOf"}, {&tab, "contexts"},
                      {&cs, "clusterStart"}, {&ct, "clusterTokens"}})
    a.dtype_in(*t, n, {DType::I32});
  a.dtype_in(cen, "centroids", {DType::F32});
  a.same_device({{&out, "out"}, {&q, "q"}, {&kc, "kCache"}, {&vc, "vCache"}, {&pt, "pageTable"}, {&lens, "seqLens"}, {&pre, "prefixLens"},
                 {&cof, "contextOf"}, {&tab, "contexts"}, {&cen, "centroids"}, {&cs, "clusterStart"}, {&ct, "clusterTokens"}});
  a.ndim(q, "q", 3);
  a.ndim(kc, "kCache", 4);
  a.shape_is(out, "out", q.shape);
  a.shape_is(vc, "vCache", kc.shape);
  const int64_t B = q.dim(0), Hq = q.dim(1), D = q.dim(2), Hkv = kc.dim(2);
  if (kc.dim(3) != D) a.error("ERR_SHAPE", "kCache " + kc.shape_str() + " has head_dim " + std::to_string(kc.dim(3)) + ", q has " + std::to_string(D));
  if (Hkv < 1 || Hq % Hkv != 0) a.error("ERR_SHAPE", "q's " + std::to_string(Hq) + " heads are not a multiple of the cache's " + std::to_string(Hkv));
  a.ndim(pt, "pageTable", 2);
  a.shape_is(pt, "pageTable", {B, -1});
  a.shape_is(lens, "seqLens", {B});
  a.shape_is(pre, "prefixLens", {B});
  a.shape_is(cof, "contextOf", {B});
  a.ndim(tab, "contexts", 2);
  a.shape_is(tab, "contexts", {-1, 6});
  for (auto [t, n] : {std::pair{&cen, "centroids"}, {&cs, "clusterStart"}, {&ct, "clusterTokens"}}) a.ndim(*t, n, 1);
  if (!(scale > 0) || !std::isfinite(scale)) a.error("ERR_ARG", "scale must be a finite number > 0");
  if (max_clusters < 1) a.error("ERR_ARG", "maxClusters must be >= 1");
  if (out.device.is_cuda()) {
    for (auto [t, n] : {std::pair{&out, "out"}, {&kc, "kCache"}, {&vc, "vCache"}})
      if (t->dtype != q.dtype) a.error("ERR_DTYPE", std::string("on CUDA ") + n + " must have q's dtype (" + dtype_name(q.dtype) + ")");
#ifdef SQUEEZELM_WITH_CUDA
    if (D > 256) a.error("ERR_UNSUPPORTED", "head_dim " + std::to_string(D) + " (at most 256 on CUDA)");
    if (max_clusters > cuda::kSqueezedMaxClusters)
      a.error("ERR_UNSUPPORTED", std::to_string(max_clusters) + " clusters per kv head (at most " + std::to_string(cuda::kSqueezedMaxClusters) + " on CUDA)");
#endif
  }
  const float sc = (float)scale;
  const int mc = (int)std::min<int64_t>(max_clusters, 1 << 30);
  dispatch(out.device, "squeezedAttention", [=] { cpu::squeezed_attention(out, q, kc, vc, pt, lens, sc, pre, cof, tab, cen, cs, ct, mc); },
           [&](int dev) { CUDA_ONLY(cuda::squeezed_attention(out, q, kc, vc, pt, lens, sc, pre, cof, tab, cen, cs, ct, mc, cuda_stream(dev))); });
  return a.env().Undefined();
}

}  // namespace sqz::napi
