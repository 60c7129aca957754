// Squeezed Attention's context table, shared by the CPU reference and the CUDA kernels.
//
// Several clustered contexts live in three flat arrays: context n's centroids [Hkv, C_n, D] (f32)
// start at element contexts[n].cen of `centroids`, its cluster offsets [Hkv, C_n + 1] at .start of
// `clusterStart`, its token lists [Hkv, P_n] at .tok of `clusterTokens`; row n of the i32 table
// `contexts` [N, 6] is (cen, start, tok, C, P, topC). A sequence names its context in contextOf[b].
// The table is device data, so every entry is checked against the arrays' sizes before use: a
// sequence whose entry does not fit attends densely, as one with no context (contextOf -1) does.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define SQZ_HD __host__ __device__ __forceinline__
#else
#define SQZ_HD inline
#endif

namespace sqz::squeezed {

struct Context {
  int64_t cen, start, tok, C, P, top;
};

// Context `n` of the table if it is one and fits the arrays (and C <= max_clusters), else false.
SQZ_HD bool context_at(const int* table, int64_t n_contexts, int64_t n, int64_t Hkv, int64_t D, int64_t cen_len, int64_t start_len,
                       int64_t tok_len, int64_t max_clusters, Context& c) {
  if (n < 0 || n >= n_contexts) return false;
  const int* e = table + 6 * n;
  c = Context{e[0], e[1], e[2], e[3], e[4], e[5]};
  if (c.C < 1 || c.C > max_clusters || c.P < 0 || c.top < 0 || c.cen < 0 || c.start < 0 || c.tok < 0) return false;
  return c.cen + Hkv * c.C * D <= cen_len && c.start + Hkv * (c.C + 1) <= start_len && c.tok + Hkv * c.P <= tok_len;
}

}  // namespace sqz::squeezed
