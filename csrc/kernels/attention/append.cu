// kvAppend: each block copies one row of k and v (all kv heads, 16 bytes per thread) to
// the slot its sequence's page table names. The sequence of a row is found by binary
// search over cuQ in device memory, so a captured graph replays with new batches. Rows
// whose position or page is out of range are dropped rather than written out of bounds.
#include "attention.h"
#include "common.cuh"
#include "core/cuda_stream.h"
#include "core/error.h"
#include "kernels/common/paged_rows.cuh"
#include "kernels/common/pdl.cuh"

namespace sqz::cuda {

namespace {

__global__ void kv_append_kernel(attn::Params p, uint4* kc, uint4* vc, const uint4* k, const uint4* v, int N) {
  const int chunks = p.Hkv * p.D / 8;  // 16-byte pieces of one row
  for (int row = blockIdx.x; row < N; row += gridDim.x) {
    int b, pos;
    if (!paged_row_position(p.cu_q, p.seq_lens, p.B, row, &b, &pos) || pos < 0) continue;
    const int page = attn::page_of(p, b, pos);
    if (page < 0) continue;
    const int64_t dst = attn::cache_offset(p, page, pos, 0) / 8;
    const int64_t src = (int64_t)row * chunks;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
      kc[dst + c] = k[src + c];
      vc[dst + c] = v[src + c];
    }
  }
}

}  // namespace

void kv_append(const Tensor& kc, const Tensor& vc, const Tensor& k, const Tensor& v, const Tensor& page_table,
               const Tensor& seq_lens, const Tensor& cu_q, cudaStream_t stream) {
  const int N = (int)k.dim(0);
  const int B = (int)seq_lens.dim(0);
  if (N == 0 || B == 0) return;
  attn::Params p{};
  p.page_table = page_table.ptr<int>();
  p.seq_lens = seq_lens.ptr<int>();
  p.cu_q = cu_q.ptr<int>();
  p.B = B;
  p.Hkv = (int)kc.dim(2);
  p.D = (int)kc.dim(3);
  p.pages = (int)kc.dim(0);
  p.page_size = (int)kc.dim(1);
  p.max_pages = (int)page_table.dim(1);
  p.page_shift = -1;
  if ((p.page_size & (p.page_size - 1)) == 0) p.page_shift = __builtin_ctz((unsigned)p.page_size);
  const int chunks = p.Hkv * p.D / 8;
  const int threads = chunks >= 256 ? 256 : ((chunks + 31) / 32) * 32;
  const int grid = N < 65535 ? N : 65535;
  launch_plain(kv_append_kernel, dim3(grid), dim3(threads), 0, stream, p, static_cast<uint4*>(kc.data()),
               static_cast<uint4*>(vc.data()), static_cast<const uint4*>(k.data()), static_cast<const uint4*>(v.data()), N);
}

}  // namespace sqz::cuda
