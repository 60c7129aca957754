// Hopper (sm_90a) GEMM for M > 16: y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias) on warpgroup MMA.
//
// x and w are both K-contiguous, which is wgmma's "K-major" operand layout for A and B alike,
// so no transposes. A block computes a BM=128 x BN tile with two warpgroups (64 rows each,
// one m64nBNk16 wgmma per 16 of K, fp32 accumulators in registers). K advances BK=64 at a time
// (one 128-byte row per operand row) through a STAGES-deep cp.async ring in shared memory,
// stored in the 128-byte swizzle that the wgmma descriptors name: 16-byte chunk c of row r
// lies at r*128 + ((c ^ (r & 7)) << 4), tiles 1024-byte aligned, 8-row groups 1024 bytes apart.
// A k16 step inside the 64-wide stage advances the descriptor's start address by 32 bytes.
//
// Pipeline: every thread issues cp.async for the tile LAG+1 iterations behind the newest, and
// keeps LAG wgmma groups in flight; the stage a load overwrites was last read LAG+1
// iterations ago, which the __syncthreads at the top of the iteration proves finished
// (each warpgroup waited for it before arriving). cp.async writes go through the generic
// proxy and wgmma reads through the async proxy, hence the proxy fence before the barrier.
// Tails: chunks past M, N or K are zero-filled (needs K % 8 == 0 and 16-byte aligned bases:
// the caller falls back to the mma.sync kernel otherwise); stores are guarded.
#pragma once
#include <type_traits>

#include "common.cuh"
#include "../common/bulk_copy.cuh"

namespace sqz::cuda::gemm_detail {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SQZ_WGMMA_DEVICE 1
#endif

namespace wg {

constexpr int kWBM = 128, kWBK = 64, kWThreads = 256;

template <int BN, int STAGES>
struct Cfg {
  static constexpr int kABytes = kWBM * kWBK * 2;
  static constexpr int kBBytes = BN * kWBK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kSmem = STAGES * kStageBytes + 1024;  // + alignment slack
};


// Shared-memory matrix descriptor: 128-byte swizzle, K-major, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t desc(uint32_t addr) {
  uint64_t d = (uint64_t)((addr & 0x3FFFF) >> 4);
  d |= (uint64_t)1 << 16;            // leading byte offset (unused with 128-byte swizzle)
  d |= (uint64_t)(1024 >> 4) << 32;  // stride byte offset
  d |= (uint64_t)1 << 62;            // 128-byte swizzle
  return d;
}

#ifdef SQZ_WGMMA_DEVICE
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

__device__ __forceinline__ void wgmma_m64n128k16_f16(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db));
}

__device__ __forceinline__ void wgmma_m64n128k16_bf16(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db));
}

__device__ __forceinline__ void wgmma_m64n256k16_f16(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"
      "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db));
}

__device__ __forceinline__ void wgmma_m64n256k16_bf16(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"
      "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db));
}

template <class T, int BN>
__device__ __forceinline__ void mma_k16(float* d, uint64_t da, uint64_t db) {
  constexpr bool H = std::is_same<T, __half>::value;
  if constexpr (BN == 256) {
    if constexpr (H) wgmma_m64n256k16_f16(d, da, db); else wgmma_m64n256k16_bf16(d, da, db);
  } else {
    if constexpr (H) wgmma_m64n128k16_f16(d, da, db); else wgmma_m64n128k16_bf16(d, da, db);
  }
}
#endif

// rows x 64 tile of a [nrows, K] K-contiguous matrix at (row0, k0) into a swizzled stage.
template <class T, int ROWS>
__device__ __forceinline__ void load(uint32_t dst, const T* __restrict__ g, int nrows, int K, int row0, int k0) {
#pragma unroll
  for (int i = 0; i < ROWS * 8 / kWThreads; ++i) {
    const int idx = threadIdx.x + i * kWThreads;
    const int r = idx >> 3, c = idx & 7;
    const int gr = row0 + r, gk = k0 + c * 8;
    const bool ok = gr < nrows && gk < K;
    const T* src = ok ? g + (size_t)gr * K + gk : g;
    cp_async16(dst + r * 128 + ((c ^ (r & 7)) << 4), src, ok);
  }
}

}  // namespace wg

template <class T, int BN, int STAGES, int LAG, int MINB>
__global__ void __launch_bounds__(wg::kWThreads, MINB)
    gemm_wgmma_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                      int M, int N, int K) {
#ifdef SQZ_WGMMA_DEVICE
  using namespace wg;
  using C = Cfg<BN, STAGES>;
  static_assert(STAGES - 1 - LAG >= 1, "pipeline too shallow");
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;

  const int tilesM = (M + kWBM - 1) / kWBM, tilesN = (N + BN - 1) / BN;
  const int bid = blockIdx.x;
  constexpr int kGroup = 8;
  const int group = bid / (kGroup * tilesN);
  const int firstM = group * kGroup;
  const int groupM = min(tilesM - firstM, kGroup);
  const int tm = firstM + (bid % (kGroup * tilesN)) % groupM;
  const int tn = (bid % (kGroup * tilesN)) / groupM;
  const int m0 = tm * kWBM, n0 = tn * BN;

  const int wgi = threadIdx.x >> 7;  // warpgroup: rows 64*wgi.. of the tile

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  const int KT = (K + kWBK - 1) / kWBK;
  constexpr int kAhead = STAGES - 1 - LAG;  // tiles in flight ahead of the one consumed
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < KT) {
      const uint32_t st = base + s * C::kStageBytes;
      load<T, kWBM>(st, x, M, K, m0, s * kWBK);
      load<T, BN>(st + C::kABytes, w, N, K, n0, s * kWBK);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kAhead - 1>();
    fence_proxy_async_shared();
    __syncthreads();
    {
      const int nk = kt + kAhead;
      if (nk < KT) {
        const uint32_t st = base + (nk % STAGES) * C::kStageBytes;
        load<T, kWBM>(st, x, M, K, m0, nk * kWBK);
        load<T, BN>(st + C::kABytes, w, N, K, n0, nk * kWBK);
      }
      cp_async_commit();
    }
    const uint32_t st = base + (kt % STAGES) * C::kStageBytes;
    const uint32_t a = st + wgi * 64 * 128, b = st + C::kABytes;
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < kWBK / 16; ++ks) mma_k16<T, BN>(acc, desc(a + ks * 32), desc(b + ks * 32));
    wg_commit();
    wg_wait<LAG>();
  }
  wg_wait<0>();
  cp_async_wait<0>();

  // Accumulator layout of m64nBN: warp v of the warpgroup owns rows 16v..16v+15; register
  // 4i+h*2+e is row g + 8h, column 8i + 2t + e (g = lane/4, t = lane%4).
  const int lane = threadIdx.x & 31, v = (threadIdx.x >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;
  const bool pair_ok = (N % 2) == 0 && (reinterpret_cast<uintptr_t>(y) & 3) == 0;
#pragma unroll
  for (int i = 0; i < BN / 8; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + wgi * 64 + v * 16 + g + h * 8;
      const int n = n0 + i * 8 + 2 * t;
      if (m >= M) continue;
      float v0 = acc[4 * i + 2 * h], v1 = acc[4 * i + 2 * h + 1];
      if (bias) {
        if (n < N) v0 += to_f<T>(bias[n]);
        if (n + 1 < N) v1 += to_f<T>(bias[n + 1]);
      }
      T* dst = y + (size_t)m * N + n;
      if (pair_ok && n + 1 < N) {
        typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type p;
        p.x = from_f<T>(v0);
        p.y = from_f<T>(v1);
        *reinterpret_cast<decltype(p)*>(dst) = p;
      } else {
        if (n < N) dst[0] = from_f<T>(v0);
        if (n + 1 < N) dst[1] = from_f<T>(v1);
      }
    }
#else
  __trap();  // only launched on sm_90a builds (see matmul.cu)
#endif
}

}  // namespace sqz::cuda::gemm_detail
