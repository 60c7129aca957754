// SqueezeLLM dense-and-sparse matmul on CUDA (layouts and semantics: csrc/cpu/lut_gemm.h).
#pragma once
#include <cuda_runtime.h>

#include "core/tensor.h"
#include "cpu/lut_gemm.h"

namespace sqz::cuda {

// dst i32 [Np, Kp*bits/32] (packed layout) <- qweight i32 [Kg*bits/32, N] (interchange).
void lut_repack(const Tensor& dst, const Tensor& qweight, int bits, cudaStream_t stream);

// y[M,N] = x[M,K] * dequant(codes, lut)^T + CSR outliers, codes packed. x, y: f16 | bf16 (one
// dtype); lut, vals: f16 | f32. rows/cols/vals may be null (no outliers); their contents must have
// been checked on the host (ts/ops/lut.ts checkOutlierCsr) when they were loaded.
// M <= 64: pair-LUT tensor-core GEMV (each code decoded once for all rows); larger M: tiled
// tensor-core GEMM on dequantized tiles, except where the weight's fp16 copy is at most 1 GiB and no
// graph is being captured: then the weight is decoded once into a temporary fp16/bf16 matrix and
// multiplied by the dense GEMM (dense_path.cuh).
// pair_half / epilogue: paired stored rows, the SiLU and residual epilogues (cpu/lut_gemm.h);
// an epilogue needs the GEMV (M <= 64, or 16 for unaligned activations). gamma (or null): the RMSNorm
// of x fused in front (M <= 2, K % 8 == 0, x 16-byte aligned; ERR_UNSUPPORTED otherwise).
// next_codes (or null): the packed codes (i32 2-D, this device) of the weight whose launch follows
// this one; the 4-bit decode GEMVs (M <= 2, Hopper) request the first codes of its row groups into L2
// at their end (a hint: the result does not depend on it; every other path ignores it).
void lut_matmul_packed(const Tensor& y, const Tensor& x, const Tensor& codes, const Tensor& lut,
                       const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, int pair_half, cpu::LutEpilogue epilogue,
                       const Tensor* gamma, float eps, const Tensor* next_codes, cudaStream_t stream);

// cpu::lut_rope_append in one launch: the GEMV's epilogue rotates q and k and appends k and v to the
// paged fp16 caches (rows paired at head_dim/2; the GEMV's M, up to 64 rows of x). gamma: as above.
void lut_rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& x, const Tensor& codes,
                     const Tensor& lut, const Tensor* rows, const Tensor* cols, const Tensor* vals, int bits, int pair_half,
                     const Tensor& positions, const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens,
                     const Tensor& cu_q, const Tensor* gamma, float eps, cudaStream_t stream);

}  // namespace sqz::cuda
