// Launchers of the FMA GEMV (gemv.cuh) for every row count M <= 16 and the launch shapes the
// plan picks, shared by the matmul ops (matmul.cu) and the q|k|v projection with RoPE/append in
// its epilogue (gemv_rope.cu, ROPE = true).
#pragma once
#include <string>

#include "../common/launch_config.h"
#include "../common/pdl.cuh"
#include "core/error.h"
#include "gemv.cuh"

namespace sqz::cuda::gemm_detail {

// Which GEMV runs a product with M <= 16 rows and its launch shape (matmul.cu says why).
struct GemvPlan {
  bool tc;
  int nt, u, r;  // r: rows per warp of the FMA kernel
};
GemvPlan plan_gemv(int M, int N, int K);

template <class T, int M, bool VEC, int U, int R = kGemvRows, bool ROPE = false>
void launch_gemv_mu(T* y, const T* x, const T* w, const T* bias, int N, int K, GemvFuse f, cudaStream_t s) {
  // Pairs and RoPE modes: a warp covers R/2 pairs, i.e. R rows of w, like the plain mode.
  const long long warps = (N + R - 1) / R;
  const unsigned blocks = ceil_div(warps, kGemvWarps);
  if (f.gamma)
    launch_pdl(gemv_kernel<T, M, VEC, U, R, true, ROPE>, dim3(blocks), dim3(kGemvWarps * 32), 0, s, y, x, w, bias, N, K, f);
  else
    launch_pdl(gemv_kernel<T, M, VEC, U, R, false, ROPE>, dim3(blocks), dim3(kGemvWarps * 32), 0, s, y, x, w, bias, N, K, f);
}

// u: chunks in flight per lane (2, 4, 8); r: rows per warp (1, 2, 4; even in the pair modes).
// Only M <= 2 takes the FMA kernel with 16-byte loads in the plain matmul, so only those get
// the variants.
template <class T, int M, bool ROPE = false>
void launch_gemv_m(T* y, const T* x, const T* w, const T* bias, int N, int K, bool vec, int u, int r,
                   const GemvFuse& f, cudaStream_t s) {
  if (!vec) return launch_gemv_mu<T, M, false, 2, kGemvRows, ROPE>(y, x, w, bias, N, K, f, s);
  if constexpr (M <= 2) {
    if ((ROPE || f.mode == kFuseSiluPairs) && r == 1) r = 2;
#define SQZ_GEMV_RU(rr, uu)                                                                       \
  if (r == rr && u == uu) {                                                                       \
    if constexpr (!ROPE || rr % 2 == 0) return launch_gemv_mu<T, M, true, uu, rr, ROPE>(y, x, w, bias, N, K, f, s); \
  }
    SQZ_GEMV_RU(1, 4) SQZ_GEMV_RU(1, 8) SQZ_GEMV_RU(2, 4) SQZ_GEMV_RU(2, 8) SQZ_GEMV_RU(4, 2) SQZ_GEMV_RU(4, 4)
#undef SQZ_GEMV_RU
  }
  launch_gemv_mu<T, M, true, 2, kGemvRows, ROPE>(y, x, w, bias, N, K, f, s);
}

template <class T, bool ROPE = false>
void launch_gemv(T* y, const T* x, const T* w, const T* bias, int M, int N, int K, bool vec, int u, int r,
                 const GemvFuse& f, cudaStream_t s) {
  switch (M) {
#define SQZ_GEMV_CASE(m) \
  case m: return launch_gemv_m<T, m, ROPE>(y, x, w, bias, N, K, vec, u, r, f, s);
    SQZ_GEMV_CASE(1) SQZ_GEMV_CASE(2) SQZ_GEMV_CASE(3) SQZ_GEMV_CASE(4)
    SQZ_GEMV_CASE(5) SQZ_GEMV_CASE(6) SQZ_GEMV_CASE(7) SQZ_GEMV_CASE(8)
    SQZ_GEMV_CASE(9) SQZ_GEMV_CASE(10) SQZ_GEMV_CASE(11) SQZ_GEMV_CASE(12)
    SQZ_GEMV_CASE(13) SQZ_GEMV_CASE(14) SQZ_GEMV_CASE(15) SQZ_GEMV_CASE(16)
#undef SQZ_GEMV_CASE
    default: fail("ERR_INTERNAL", "GEMV called with M = " + std::to_string(M));
  }
}

}  // namespace sqz::cuda::gemm_detail
