// Launchers shared between the attention translation units (host side only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace sqz::cuda::attn {
struct Params;

// Split-KV decode: decode_plan picks the query vectors per block (R), the query chunks and
// the splits; launch_decode runs the partial kernel, then the combine kernel.
// mma: the tensor-core kernel (decode_mma.cu, R = 16 query vectors per block) instead of the
// CUDA-core one (decode.cu, R of 1, 2, 4 or 8).
struct DecodePlan {
  int R = 1, qchunks = 1, splits = 1, chunk = 1;
  bool mma = false;
  // The tensor-core kernel with 4 warps and 6-stage rings instead of 8 warps and 3 stages (head_dim
  // 128, short splits: decode_mma.cu)
  bool deep_ring = false;
};
DecodePlan decode_plan(int device, int B, int Hq, int Hkv, int D, int max_q, int max_seq_len);
// Arrival counters for merging the splits inside the partial kernel: a zeroed per-device buffer
// of at least n ints, or null (too many groups, or SQUEEZELM_ATTN_COMBINE_KERNEL=1) for the
// separate combine kernel.
int* decode_counters(int device, int64_t n);
void launch_decode(Params& p, const DecodePlan& plan, DType dt, int device, cudaStream_t stream);
// The tensor-core partial kernel (decode_mma.cu): head_dim a multiple of 16 up to 128.
bool decode_mma_supported(int D);
// Whether the tensor-core kernel takes its deep-ring shape for splits of tiles_per_split 16-token
// tiles and `vectors` query vectors per kv head.
bool decode_mma_deep_ring(int D, int tiles_per_split, int vectors);
int decode_mma_resident_blocks(int device, int D);
void launch_decode_mma(const Params& p, bool deep_ring, DType dt, cudaStream_t stream);

// Tensor-core prefill; returns false when head_dim has no prefill instantiation.
bool prefill_supported(int D);
void launch_prefill(const Params& p, DType dt, cudaStream_t stream);
}  // namespace sqz::cuda::attn
