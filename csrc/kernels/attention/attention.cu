// Host side of `attention`: fills the kernel parameters and picks the path. Few query rows
// per sequence (decode, speculative verification) take split-KV flash-decoding; many rows
// take the tensor-core prefill kernel.
#include <algorithm>

#include "attention.h"
#include "common.cuh"
#include "core/cuda_stream.h"
#include "core/error.h"
#include "launch.h"

namespace sqz::cuda {

bool attention_uses_decode(int q_heads, int kv_heads, int head_dim, int max_q) {
  (void)q_heads;
  (void)kv_heads;
  return max_q <= 4 || !attn::prefill_supported(head_dim);
}

int64_t attention_workspace_floats(int device, int num_seqs, int q_heads, int kv_heads, int head_dim, int max_q,
                                   int max_seq_len) {
  if (!attention_uses_decode(q_heads, kv_heads, head_dim, max_q)) return 0;
  attn::DecodePlan pl = attn::decode_plan(device, num_seqs, q_heads, kv_heads, head_dim, max_q, max_seq_len);
  return (int64_t)num_seqs * max_q * q_heads * pl.splits * (head_dim + 2);
}

void attention(const Tensor& out, const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& page_table,
               const Tensor& seq_lens, const Tensor& cu_q, float scale, int max_q, int max_seq_len, float* workspace,
               int64_t workspace_floats, int device, cudaStream_t stream) {
  attn::Params p{};
  p.out = out.data();
  p.q = q.data();
  p.kc = kc.data();
  p.vc = vc.data();
  p.page_table = page_table.ptr<int>();
  p.seq_lens = seq_lens.ptr<int>();
  p.cu_q = cu_q.ptr<int>();
  p.B = (int)seq_lens.dim(0);
  p.Hq = (int)q.dim(1);
  p.Hkv = (int)kc.dim(2);
  p.D = (int)q.dim(2);
  p.pages = (int)kc.dim(0);
  p.page_size = (int)kc.dim(1);
  p.max_pages = (int)page_table.dim(1);
  p.page_shift = -1;
  if ((p.page_size & (p.page_size - 1)) == 0) p.page_shift = __builtin_ctz((unsigned)p.page_size);
  p.scale_log2 = scale * 1.4426950408889634f;
  p.max_q = max_q;
  if (p.B == 0 || q.dim(0) == 0) return;

  if (attention_uses_decode(p.Hq, p.Hkv, p.D, max_q)) {
    attn::DecodePlan pl = attn::decode_plan(device, p.B, p.Hq, p.Hkv, p.D, max_q, max_seq_len);
    p.splits = pl.splits;
    p.chunk = pl.chunk;
    p.qchunks = pl.qchunks;
    const int64_t need = (int64_t)p.B * max_q * p.Hq * pl.splits * (p.D + 2);
    if (workspace_floats < need)
      fail("ERR_SHAPE", "attention: workspace holds " + std::to_string(workspace_floats) + " f32, needs " +
                            std::to_string(need));
    p.ws_acc = workspace;
    p.ws_ml = workspace + (int64_t)p.B * max_q * p.Hq * pl.splits * p.D;
    p.counters = attn::decode_counters(device, (int64_t)p.B * p.Hkv * pl.qchunks);
    attn::launch_decode(p, pl, q.dtype, device, stream);
  } else {
    attn::launch_prefill(p, q.dtype, stream);
  }
}

}  // namespace sqz::cuda
