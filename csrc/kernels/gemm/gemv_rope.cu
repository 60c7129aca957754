// The decode step's q|k|v projection with ropeAppend in its epilogue (see fuse.cuh,
// kFuseRopeAppend): one launch where the plain path runs the fused GEMV and then the
// RoPE/append kernel, which at batch 1 is a whole kernel boundary per layer for a few KB of work.
// One or two rows (the fused decode pass's batch sizes).
#include <cstdint>
#include <string>

#include "core/error.h"
#include "../common/dtype_cuda.cuh"
#include "gemm.h"
#include "gemv_launch.cuh"

namespace sqz::cuda {
namespace {
using namespace gemm_detail;

template <class T>
void run(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& x, const Tensor& w, const Tensor* bias,
         const Tensor* gamma, float eps, const Tensor& positions, const Tensor& inv_freq, const Tensor& page_table,
         const Tensor& seq_lens, const Tensor& cu_q, cudaStream_t s) {
  const long long M = x.dim(0), K = x.dim(1), N = w.dim(0);
  if (M == 0 || N == 0) return;
  if (M > 2) fail("ERR_UNSUPPORTED", "linearRopeAppend: CUDA fuses up to 2 rows, got " + std::to_string(M));
  if (K == 0) fail("ERR_SHAPE", "linearRopeAppend: K = 0");
  GemvFuse f{gamma ? gamma->data() : nullptr, eps, kFuseRopeAppend};
  f.rope = rope_append_params(q_out, kc, M, positions, inv_freq, page_table, seq_lens, cu_q);
  f.q_out = q_out.data();
  f.kc = kc.data();
  f.vc = vc.data();
  const bool vec = K % 8 == 0 && aligned16(x.data()) && aligned16(w.data()) && (!gamma || aligned16(gamma->data()));
  // The launch shape the fused GEMV of the same product takes (the same sums, bit for bit).
  // Only the decode step's one or two rows are instantiated: a kernel per row count, norm and
  // launch shape, and more rows would multiply the addon's size for a path the decoder never takes.
  const GemvPlan plan = plan_gemv((int)M, (int)N, (int)K);
  const T* bp = bias ? bias->ptr<T>() : nullptr;
  if (M == 1) launch_gemv_m<T, 1, true>(nullptr, x.ptr<T>(), w.ptr<T>(), bp, (int)N, (int)K, vec, plan.u, plan.r, f, s);
  else launch_gemv_m<T, 2, true>(nullptr, x.ptr<T>(), w.ptr<T>(), bp, (int)N, (int)K, vec, plan.u, plan.r, f, s);
}

}  // namespace

void linear_rope_append(const Tensor& q_out, const Tensor& kc, const Tensor& vc, const Tensor& x, const Tensor& w,
                        const Tensor* bias, const Tensor* gamma, float eps, const Tensor& positions,
                        const Tensor& inv_freq, const Tensor& page_table, const Tensor& seq_lens, const Tensor& cu_q,
                        cudaStream_t stream) {
  if (x.dtype == DType::F16)
    run<__half>(q_out, kc, vc, x, w, bias, gamma, eps, positions, inv_freq, page_table, seq_lens, cu_q, stream);
  else if (x.dtype == DType::BF16)
    run<__nv_bfloat16>(q_out, kc, vc, x, w, bias, gamma, eps, positions, inv_freq, page_table, seq_lens, cu_q, stream);
  else
    fail("ERR_DTYPE", std::string("linearRopeAppend: CUDA takes f16 or bf16, got ") + dtype_name(x.dtype));
}

}  // namespace sqz::cuda
