// Rotary embedding in place, Hugging Face rotate-half layout. One block per token: the
// block computes cos/sin of its D/2 angles once (fp32 angle = pos * invFreq, precise
// sincosf: positions reach 1M, where the fast intrinsics are far off), then rotates every
// head.
#include <algorithm>

#include "common.h"
#include "kernels/common/dynamic_smem.cuh"
#include "kernels/common/pdl.cuh"
#include "core/cuda_stream.h"
#include "dtype_cuda.cuh"

namespace sqz::cuda {
namespace {

template <class T>
__global__ void rope_kernel(T* x, const int* __restrict__ pos, const float* __restrict__ inv_freq, int heads, int half) {
  SQZ_DYNAMIC_SMEM(cs_bytes);
  float* const cs = reinterpret_cast<float*>(cs_bytes);  // cos[half], sin[half]
  const int t = blockIdx.x;
  const float p = (float)pos[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float a = p * inv_freq[i];
    float sn, cn;
    sincosf(a, &sn, &cn);
    cs[i] = cn;
    cs[half + i] = sn;
  }
  __syncthreads();
  T* xt = x + (int64_t)t * heads * 2 * half;
  const int pairs = heads * half;
  for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
    const int h = q / half, i = q - h * half;
    T* xh = xt + (int64_t)h * 2 * half;
    const float x1 = to_f32(xh[i]), x2 = to_f32(xh[i + half]);
    const float c = cs[i], s = cs[half + i];
    // Products rounded separately, as the CPU computes them (no fma contraction).
    xh[i] = from_f32<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
    xh[i + half] = from_f32<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
  }
}

}  // namespace

void rope(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, cudaStream_t s) {
  const int64_t t = x.dim(0), heads = x.dim(1), half = x.dim(2) / 2;
  if (t == 0 || heads == 0 || half == 0) return;
  dispatch_float(x.dtype, "rope", [&](auto tt) {
    using T = decltype(tt);
    const int threads = (int)std::min<int64_t>(256, std::max<int64_t>(32, (heads * half + 31) / 32 * 32));
    launch_plain(rope_kernel<T>, dim3((unsigned)t), dim3(threads), 2 * half * sizeof(float), s, x.ptr<T>(), positions.ptr<int>(),
                 inv_freq.ptr<float>(), (int)heads, (int)half);
  });
}

}  // namespace sqz::cuda
