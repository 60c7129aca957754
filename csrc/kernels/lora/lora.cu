// Batched LoRA (S-LoRA's heterogeneous batch) on CUDA: y[t] += scale_s * Bt_s^T (A_s x[t]) with
// each row's adapter slot s read from device memory, so one call serves a batch that mixes adapters
// of different ranks (and rows with none), and a captured decode graph stays valid whichever
// adapters the next step's rows use.
//
// Why this shape (the shrink / expand split of Punica's BGMV and S-LoRA's MBGMV). A decode step has
// few rows and small ranks (8-64): the work is reading the adapter's A (rank x K) and Bt (rank x N)
// once per row, a few hundred KB, so the kernels are bound by how many loads are in flight, not by
// arithmetic. Two launches:
// * shrink: v[t][j] = scale * A[off + j] . x[t] into a float workspace, a block per two rank rows
//   of one batch row, four warps splitting K with 16-byte loads (K = 4096: two loads per lane);
// * expand: y[t][n] += sum_j v[t][j] Bt[off + j][n], a block per 256 outputs of one batch row, its
//   eight warps splitting the rank (rank 16: two 16-byte loads per lane), summed in shared memory.
// An earlier single kernel had every output block redo the shrink with 2-byte loads: 45 us for one
// rank-16 row of q|k|v on the H100, more than the projection it adds to. Rows sharing an adapter
// reread it from L2. Deterministic: fixed reduction orders, no atomics.
#include "core/cuda_stream.h"
#include "kernels/common/grow_scratch.h"
#include "lora.cuh"
#include "lora.h"

namespace sqz::cuda {

void lora_apply(const Tensor& y, const Tensor& x, const Tensor& slots, const Tensor& a, const Tensor& bt,
                const Tensor& desc, const Tensor& scale, const Tensor* work, cudaStream_t s) {
  const int64_t T = x.dim(0), K = x.dim(1), N = y.dim(1), R = a.dim(0);
  const int S = (int)desc.dim(0);
  if (T == 0 || N == 0 || S == 0 || R == 0) return;
  using namespace lora_kernels;
  // A rank is at most min(R, kLoraMaxRank): the workspace holds that many products per row, and the
  // shrink grid covers them (blocks past a row's rank return at once).
  const int64_t vstride = R < cpu::kLoraMaxRank ? R : cpu::kLoraMaxRank;
  float* v = work ? work->ptr<float>()
                  : static_cast<float*>(grow_scratch(Scratch::kLora, y.device.index, (size_t)(T * vstride) * sizeof(float), s, "loraApply workspace"));
  const dim3 gs((unsigned)T, (unsigned)((vstride + kShrinkRows - 1) / kShrinkRows)), ge((unsigned)T, (unsigned)((N + kExpandOut - 1) / kExpandOut));
  const bool vec_k = K % 8 == 0 && aligned16(x.data()) && aligned16(a.data());
  const bool vec_n = N % 8 == 0 && aligned16(bt.data());
  dispatch_float(y.dtype, "loraApply", [&](auto tv) {
    using E = decltype(tv);
    if (vec_k)
      shrink_kernel<E, true><<<gs, kThreads, 0, s>>>(v, x.ptr<E>(), slots.ptr<int>(), a.ptr<E>(), desc.ptr<int>(), scale.ptr<float>(), K, R, S, vstride);
    else
      shrink_kernel<E, false><<<gs, kThreads, 0, s>>>(v, x.ptr<E>(), slots.ptr<int>(), a.ptr<E>(), desc.ptr<int>(), scale.ptr<float>(), K, R, S, vstride);
    if (vec_n)
      expand_kernel<E, true><<<ge, kThreads, 0, s>>>(y.ptr<E>(), v, slots.ptr<int>(), bt.ptr<E>(), desc.ptr<int>(), N, R, S, vstride);
    else
      expand_kernel<E, false><<<ge, kThreads, 0, s>>>(y.ptr<E>(), v, slots.ptr<int>(), bt.ptr<E>(), desc.ptr<int>(), N, R, S, vstride);
  });
  cuda_check(cudaGetLastError(), "loraApply: launch");
}

}  // namespace sqz::cuda
