// Launchers of the dense matmul: GEMV for M <= 16, tensor-core GEMM above.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "core/cuda_stream.h"
#include "core/env.h"
#include "gemm.h"
#include "gemm_tc.cuh"
#include "gemm_wgmma.cuh"
#include "gemv_bulk.cuh"
#include "gemv_launch.cuh"
#include "gemv_tc.cuh"
#include "gemv_tma.cuh"
#include "../common/dtype_cuda.cuh"
#include "../common/process_buffer.h"
#include "../common/hopper.h"
#include "../common/launch_config.h"
#include "../common/tensor_map.h"

namespace sqz::cuda::gemm_detail {

// Which GEMV runs a product with M <= 16 rows, and its launch shape. From sweeps of every
// setting over the LLaMA projection shapes on an H200 (bench gemv-tune):
//   - M <= 2: the FMA kernel; 2 rows per warp with 8 chunks in flight per lane where N <= 8192
//     and K <= 11008 (4096x4096 76%, 4096x11008 91%, 8192x8192 91% of copy bandwidth), 4 rows
//     with 2 chunks for wide N at K <= 4096 (11008x4096 89%; the decode step's fused 12288x4096
//     q|k|v 93% and 22016x4096 gate|up 93%, where 2 x 2 gave 88%), 2 rows x 4 chunks at very
//     long K (8192x28672 100%), 2 x 2 for very wide N at longer K (28672x8192 102%);
//   - M >= 3: the tensor-core kernel (persistent grid). Up to 8 rows: 2 row tiles per block where
//     N and K are both 8192+ but N is not very wide (8192x8192 90%, 8192x28672 95%), else one
//     (28672x8192 92%, N = 4096 shapes). More rows: 2 tiles where N >= 8192 (x is reread per
//     tile: 2 tiles halve that traffic), else one tile with 4 chunks in flight. 4 tiles per block
//     and fewer blocks per SM than fit both lose (39-70% and 50-77%).
// SQUEEZELM_GEMV_TC_MIN_M / _NT / _TC_U / _U / _R override each choice (tuning runs only).
GemvPlan plan_gemv(int M, int N, int K) {
  GemvPlan p;
  if (M <= 2) {
    p.tc = false;
    p.nt = 1;
    if (N >= 8192 && K <= 4096) p.r = 4, p.u = 2;
    else if (N >= 16384) p.r = 2, p.u = 2;
    else if (K >= 16384) p.r = 2, p.u = 4;
    else p.r = 2, p.u = 8;
  } else {
    p.tc = true;
    p.r = 2;
    if (M <= 8) p.nt = N >= 8192 && N < 16384 && K >= 8192 ? 2 : 1;
    else p.nt = N >= 8192 ? 2 : 1;
    p.u = p.nt == 1 && M > 8 ? 4 : 2;
  }
  const int min_m = env_int("SQUEEZELM_GEMV_TC_MIN_M", 0);
  if (min_m > 0) p.tc = M >= min_m;
  const int nt = env_int("SQUEEZELM_GEMV_NT", 0);
  if (nt > 0) p.nt = nt;
  const int u = env_int(p.tc ? "SQUEEZELM_GEMV_TC_U" : "SQUEEZELM_GEMV_U", 0);
  if (u > 0) p.u = u;
  const int r = env_int("SQUEEZELM_GEMV_R", 0);
  if (r > 0) p.r = r;
  return p;
}

}  // namespace sqz::cuda::gemm_detail

namespace sqz::cuda {
namespace {
using namespace gemm_detail;

GemvFuse no_fuse() { return GemvFuse{nullptr, 0.f, kFusePlain}; }

template <class T, int NT, int U>
void launch_gemv_tc_nu(T* y, const T* x, const T* w, const T* bias, int M, int N, int K, cudaStream_t s) {
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "matmul: cudaGetDevice");
  const int occ = cached_per_device(dev, 0, [] {  // blocks of this instantiation per SM
    int n = 0;
    cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, gemv_tc_kernel<T, NT, U>, kGemvTcWarps * 32, 0),
               "matmul: occupancy");
    return std::max(n, 1);
  });
  // Persistent grid: every block that fits at once (SQUEEZELM_GEMV_TC_BPS: blocks per SM, tuning).
  const int bps = env_int("SQUEEZELM_GEMV_TC_BPS", occ);
  const int tiles = ceil_div(N, 8 * NT);
  const int grid = std::max(1, std::min(tiles, sm_count(dev) * bps));
  launch_pdl(gemv_tc_kernel<T, NT, U>, dim3(grid), dim3(kGemvTcWarps * 32), 0, s, y, x, w, bias, M, N, K);
}

template <class T>
void launch_gemv_tc(T* y, const T* x, const T* w, const T* bias, int M, int N, int K, int nt, int u, cudaStream_t s) {
  if (nt >= 4) return launch_gemv_tc_nu<T, 4, 2>(y, x, w, bias, M, N, K, s);
  if (nt >= 2) {
    if (u >= 4) return launch_gemv_tc_nu<T, 2, 4>(y, x, w, bias, M, N, K, s);
    return launch_gemv_tc_nu<T, 2, 2>(y, x, w, bias, M, N, K, s);
  }
  if (u >= 4) return launch_gemv_tc_nu<T, 1, 4>(y, x, w, bias, M, N, K, s);
  launch_gemv_tc_nu<T, 1, 2>(y, x, w, bias, M, N, K, s);
}


template <class T, bool A>
void launch_gemm_tc(T* y, const T* x, const T* w, const T* bias, int M, int N, int K, cudaStream_t s) {
  allow_dynamic_smem<gemm_tc_kernel<T, A>>(kSmemBytes, "matmul");  // the 64 KiB ring is above 48 KiB
  const long long tiles = (long long)ceil_div(M, kBM) * ceil_div(N, kBN);
  gemm_tc_kernel<T, A><<<(unsigned)tiles, kThreads, kSmemBytes, s>>>(y, x, w, bias, M, N, K);
}

// The wgmma and bulk-copy kernels exist only in sm_90a code: kBuiltFor90a and device_is_sm90()
// (common/hopper.h) say where they run.

// Tile width, ring depth, wgmma groups in flight, blocks per SM. Measured on H100 at M = 2048:
// 128/6/1 beats 256/4/1 by 0-10% (K = 4096) and the 2-blocks-per-SM 128/3/0 on the wide shapes.
constexpr int kWgBN = 128, kWgStages = 6, kWgLag = 1, kWgMinBlocks = 1;

template <class T>
void launch_gemm_wgmma(T* y, const T* x, const T* w, const T* bias, int M, int N, int K, cudaStream_t s) {
  using C = wg::Cfg<kWgBN, kWgStages>;
  constexpr auto kernel = gemm_wgmma_kernel<T, kWgBN, kWgStages, kWgLag, kWgMinBlocks>;
  allow_dynamic_smem<kernel>(C::kSmem, "matmul");
  const long long tiles = (long long)ceil_div(M, wg::kWBM) * ceil_div(N, kWgBN);
  kernel<<<(unsigned)tiles, wg::kWThreads, C::kSmem, s>>>(y, x, w, bias, M, N, K);
}

// Split-tile counters and fp32 partial slots of the bulk-copy GEMV, per device
// (common/process_buffer.h: zeroed once; the kernel leaves every counter at 0). Until the buffer
// exists the register-load GEMV runs.
struct BulkWorkspace {
  int* counters = nullptr;
  float* partials = nullptr;
};
constexpr int kBulkMaxTiles = 1 << 16, kBulkMaxBlocks = 1024, kBulkMaxNT = 4;

BulkWorkspace gemv_bulk_workspace(int device) {
  const size_t counter_bytes = kBulkMaxTiles * sizeof(int);
  const size_t partial_bytes = (size_t)kBulkSlotsPerBlock * kBulkMaxBlocks * 16 * 8 * kBulkMaxNT * sizeof(float);
  char* p = static_cast<char*>(zeroed_process_buffer(device, ProcessBuffer::kGemvBulk, counter_bytes + partial_bytes));
  if (!p) return {};
  return {reinterpret_cast<int*>(p), reinterpret_cast<float*>(p + counter_bytes)};
}

// The bulk-copy GEMV (gemv_bulk.cuh) with NT 8-row tiles per item; false where it cannot run
// (workspace missing, too many tiles, too little shared memory): the caller falls back.
template <class T, int NT, int KS>
bool launch_gemv_bulk_nt(T* y, const T* x, const T* w, const T* bias, int M, int N, int K, int slots, cudaStream_t s) {
  static_assert(NT >= 2 && NT <= kBulkMaxNT, "bulk GEMV tile");
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "matmul: cudaGetDevice");
  const int tiles = ceil_div(N, 8 * NT), kt = ceil_div(K, KS);
  if (tiles > kBulkMaxTiles) return false;
  const BulkWorkspace ws = gemv_bulk_workspace(dev);
  if (!ws.counters) return false;
  // Ring depth: as many item slots as the shared memory holds (SQUEEZELM_GEMV_BULK_S caps it, tuning).
  const int max_slots = cached_per_device(dev, 0, [&] {
    int optin = 0;
    cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "matmul: device attribute");
    const long long n = ((long long)optin - bulk_ring_offset<NT>()) / bulk_stage_bytes<NT, KS>();
    return (int)std::max(0LL, std::min(n, 32LL));
  });
  const int S = std::min(max_slots, std::max(2, env_int("SQUEEZELM_GEMV_BULK_S", slots)));
  if (S < 2) return false;
  constexpr auto kernel = gemv_bulk_kernel<T, NT, KS>;
  const size_t smem = bulk_smem_bytes<NT, KS>(S);
  allow_dynamic_smem<kernel>(smem, "matmul");
  const long long items = (long long)tiles * kt;
  const int grid = (int)std::min<long long>({items, (long long)sm_count(dev), (long long)kBulkMaxBlocks});
  // k per unit of the work split: the smallest KS / 2^i of at least SQUEEZELM_GEMV_BULK_UNIT (256;
  // tuning) and 256 (BulkWalk needs KS / uk to be a power of two).
  const int want = std::max(256, env_int("SQUEEZELM_GEMV_BULK_UNIT", 256));
  int uk = KS;
  while (uk / 2 >= want) uk /= 2;
  launch_pdl(kernel, dim3(grid), dim3(kBulkThreads), smem, s, y, x, w, bias, M, N, K, S, uk, ws.counters, ws.partials);
  return true;
}

// Where the bulk-copy GEMV takes a product with M <= 16 rows: sm_90 devices of a 90a build, K % 8 == 0
// and aligned operands (the caller's vec), and N wide enough that whole-tile scheduling would leave a
// ragged last round: N >= 10000 from 9 activation rows, N >= 16384 from 3. Measured on the H200
// (graph replay, same process; register-load GEMV / bulk / cuBLAS): M = 16 11008x4096 30.3 / 28.4 /
// 25.4 us, 28672x8192 127.3 / 115.9 / 112.5 us, M = 4 28672x8192 120.2 / 116.9 / 106.2; but M = 16
// 4096x4096 12.3 / 15.3, 8192x8192 36.2 / 38.3, 4096x11008 27.4 / 28.2, and M = 1-2 everywhere: where
// tiles divide evenly, the bulk kernel's larger first request costs more than it saves.
// SQUEEZELM_GEMV_BULK_MIN_M (0 = off) and _MIN_N move the first bound (tests force the kernel with
// both at 1), _NT picks 16- or 32-row items, _KS 1024 or 2048 k per item, _S the ring slots (tuning).
template <class T>
bool launch_gemv_bulk(T* y, const T* x, const T* w, const T* bias, int M, int N, int K, cudaStream_t s) {
  if (!kBuiltFor90a || !device_is_sm90()) return false;
  const int min_m = env_int("SQUEEZELM_GEMV_BULK_MIN_M", 9), min_n = env_int("SQUEEZELM_GEMV_BULK_MIN_N", 10000);
  if (min_m <= 0 || !((M >= min_m && N >= min_n) || (M >= 3 && N >= 16384))) return false;
  const int nt = env_int("SQUEEZELM_GEMV_BULK_NT", 4);
  const int ks = env_int("SQUEEZELM_GEMV_BULK_KS", 1024);
  // 32-row items: two 64 KB slots measured faster than three at M = 16 (11008x4096 28.4 / 30.2 us,
  // 28672x8192 115.9 / 124.1 us, H200), three faster than two at M = 4-8 (M = 4 28672x8192 116.4 /
  // 128.9 us). 16-row items: as many slots as fit.
  if (nt >= 4) return launch_gemv_bulk_nt<T, 4, 1024>(y, x, w, bias, M, N, K, M > 8 ? 2 : 3, s);
  if (ks >= 2048) return launch_gemv_bulk_nt<T, 2, 2048>(y, x, w, bias, M, N, K, 32, s);
  return launch_gemv_bulk_nt<T, 2, 1024>(y, x, w, bias, M, N, K, 32, s);
}

// Split-tile counters and fp32 partial slots of the TMA GEMV (as the bulk GEMV's): two slots of
// R x 16 floats per block, kTmaPartialFloats in all (256 blocks of 128-row tiles).
constexpr int kTmaMaxTiles = 1 << 16;
constexpr size_t kTmaPartialFloats = (size_t)2 * 256 * 16 * 128;
BulkWorkspace gemv_tma_workspace(int device) {
  const size_t counter_bytes = kTmaMaxTiles * sizeof(int);
  const size_t partial_bytes = kTmaPartialFloats * sizeof(float);
  char* p = static_cast<char*>(zeroed_process_buffer(device, ProcessBuffer::kGemvTma, counter_bytes + partial_bytes));
  if (!p) return {};
  return {reinterpret_cast<int*>(p), reinterpret_cast<float*>(p + counter_bytes)};
}

// The TMA GEMV (gemv_tma.cuh) with R-row tiles and an S-stage ring; `whole`: one block per tile,
// each walking the whole K (no split tiles; the caller checks that the tiles fit in one wave).
// False where it cannot run (no encoder, workspace or shared memory; a shape past its counters):
// the caller falls back.
template <class T, int R>
bool launch_gemv_tma_r(T* y, const T* x, const T* w, const T* bias, int M, int N, int K, int S, bool whole,
                       int dev, cudaStream_t s) {
  const int tiles = ceil_div(N, R);
  const long long units = (long long)tiles * ceil_div(K, kTmaBoxK);
  if (tiles > kTmaMaxTiles || units >= INT32_MAX) return false;
  const BulkWorkspace ws = gemv_tma_workspace(dev);
  if (!ws.counters) return false;
  // At most as many stages as the shared memory holds.
  const int max_slots = cached_per_device(dev, 0, [&] {
    int optin = 0;
    cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "matmul: device attribute");
    const long long n = ((long long)optin - (long long)tma_smem_bytes<R>(0)) / tma_stage_bytes<R>();
    return (int)std::max(0LL, std::min(n, 32LL));
  });
  S = std::min(max_slots, S);
  if (S < 2) return false;
  CUtensorMap wmap, xmap;
  if (!encode_rows_map<T>(&wmap, w, N, K, K, R) || !encode_rows_map<T>(&xmap, x, M, K, K, kTmaXRows)) return false;
  constexpr auto kernel = gemv_tma_kernel<T, R>;
  const size_t smem = tma_smem_bytes<R>(S);
  allow_dynamic_smem<kernel>(smem, "matmul");
  // Blocks: one per tile (whole), else one per SM (SQUEEZELM_GEMV_TMA_BPS more, tuning), as many
  // as the partial slots allow.
  const long long bps = std::max(1, env_int("SQUEEZELM_GEMV_TMA_BPS", 1));
  const long long max_blocks = (long long)(kTmaPartialFloats / (2 * 16 * R));
  const long long blocks = whole ? (long long)tiles : (long long)sm_count(dev) * bps;
  const int grid = (int)std::min<long long>({units, blocks, max_blocks});
  launch_pdl(kernel, dim3(grid), dim3(kTmaThreads), smem, s, wmap, xmap, y, bias, M, N, K, S, ws.counters,
             ws.partials);
  return true;
}

// Where the TMA GEMV takes a product with M <= 16 rows, and how: sm_90 devices of a 90a build,
// K % 8 == 0 and aligned operands (the caller's vec), from 3 activation rows.
// * Whole-K tiles (one block per tile, no split, as cuBLAS's GEMV kernels do) where the tiles of
//   one height fill most of one wave: 64-row tiles and an 8-stage ring where ceil(N / 64) is 90-100%
//   of the SMs, else 128-row tiles and 4 stages where ceil(N / 128) is 60-100% of them and the
//   weights are wide or long (N >= 10000 or K >= 16384). Fewer SMs then stream, but each at more
//   than its share of the bandwidth, and no tile pays the split-tile sum. Measured on the H200
//   (f16, graph replay, same process; whole / stream-K / cuBLAS, us): M = 16 11008x4096 26.5 /
//   28.3 / 24.6, 8192x8192 36.0 / 37.9 (the bulk kernel) / 33.9, 8192x28672 113.1 / 115.4 / 116.4;
//   M = 4 11008x4096 25.8 / 27.9 / 24.9, 8192x28672 112.8 / 115.3 / 114.8, 8192x8192 35.7 / 35.6 /
//   38.8. Fewer tiles than that lose: 4096x4096 with 64 tiles of 64 rows 17.3 against 12.2 us.
// * Stream-K over all SMs (128-row tiles, 4 stages) for the other wide or long weights: M = 16
//   28672x8192 117.3 against cuBLAS 116.4 (whole-K does not fit one wave there).
// * Elsewhere the other GEMVs (M = 1, 2 everywhere; 4096-wide shapes).
// SQUEEZELM_GEMV_TMA=1 / 0 forces it on / off (tests, tuning); with it forced on,
// SQUEEZELM_GEMV_TMA_R (64 / 128), _S (stages) and _WHOLE (1 / 0) replace the plan (tuning).
template <class T>
bool launch_gemv_tma(T* y, const T* x, const T* w, const T* bias, int M, int N, int K, cudaStream_t s) {
  // M = 1, 2 (every decode GEMV) leave before any device query.
  const int force = env_int("SQUEEZELM_GEMV_TMA", -1);
  if (force == 0 || (force < 0 && M < 3) || !kBuiltFor90a || !device_is_sm90()) return false;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "matmul: cudaGetDevice");
  const long long sms = sm_count(dev);
  const long long t64 = ceil_div(N, 64), t128 = ceil_div(N, 128);
  const bool wide = N >= 10000 || K >= 16384;
  int R = 128, S = 4;
  bool whole = false;
  if (10 * t64 >= 9 * sms && t64 <= sms) R = 64, S = 8, whole = true;
  else if (wide && 10 * t128 >= 6 * sms && t128 <= sms) whole = true;
  else if (!wide && force != 1) return false;
  if (force == 1) {
    R = env_int("SQUEEZELM_GEMV_TMA_R", R) <= 64 ? 64 : 128;
    S = env_int("SQUEEZELM_GEMV_TMA_S", S);
    whole = env_int("SQUEEZELM_GEMV_TMA_WHOLE", whole ? 1 : 0) == 1 && ceil_div(N, R) <= sms;
  }
  if (R == 64) return launch_gemv_tma_r<T, 64>(y, x, w, bias, M, N, K, S, whole, dev, s);
  return launch_gemv_tma_r<T, 128>(y, x, w, bias, M, N, K, S, whole, dev, s);
}

template <class T>
void run(const Tensor& yt, const Tensor& xt, const Tensor& wt, const Tensor* bt, cudaStream_t s) {
  const long long M = xt.dim(0), K = xt.dim(1), N = wt.dim(0);
  if (M == 0 || N == 0) return;
  if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) fail("ERR_SHAPE", "matmul: dimensions above 2^31 - 1");
  T* y = yt.ptr<T>();
  const T* x = xt.ptr<T>();
  const T* w = wt.ptr<T>();
  const T* bias = bt ? bt->ptr<T>() : nullptr;
  if (K == 0) {
    // An empty sum: y = bias or 0. Rare; the GEMV's scalar path writes it without reading.
    launch_gemv<T>(y, x, w, bias, 1, (int)N, 0, false, 2, 2, no_fuse(), s);
    for (long long m = 1; m < M; ++m) launch_gemv<T>(y + m * N, x, w, bias, 1, (int)N, 0, false, 2, 2, no_fuse(), s);
    return;
  }
  const bool vec = K % 8 == 0 && aligned16(x) && aligned16(w);
  // M = 1, 2: the FMA GEMV is at cuBLAS parity; from M = 3 its fp32 FMAs, not HBM, are the
  // limit, and the tensor-core GEMV keeps 0.9-1.0x cuBLAS up to M = 16 (H100 measurements).
  const GemvPlan plan = M <= 16 ? plan_gemv((int)M, (int)N, (int)K) : GemvPlan{false, 1, 2, 2};
  if (M <= 16 && vec && launch_gemv_tma<T>(y, x, w, bias, (int)M, (int)N, (int)K, s)) {
    // done: the TMA GEMV
  } else if (M <= 16 && vec && launch_gemv_bulk<T>(y, x, w, bias, (int)M, (int)N, (int)K, s)) {
    // done: the bulk-copy GEMV
  } else if (M <= 16 && vec && plan.tc) {
    launch_gemv_tc<T>(y, x, w, bias, (int)M, (int)N, (int)K, plan.nt, plan.u, s);
  } else if (M <= 16) {
    launch_gemv<T>(y, x, w, bias, (int)M, (int)N, (int)K, vec, plan.u, plan.r, no_fuse(), s);
  } else if (vec && kBuiltFor90a && device_is_sm90()) {
    launch_gemm_wgmma<T>(y, x, w, bias, (int)M, (int)N, (int)K, s);
  } else if (vec) {
    launch_gemm_tc<T, true>(y, x, w, bias, (int)M, (int)N, (int)K, s);
  } else {
    launch_gemm_tc<T, false>(y, x, w, bias, (int)M, (int)N, (int)K, s);
  }
}

// The fused GEMV: M <= 16 (the caller checks), any K (16-byte path where aligned).
template <class T>
void run_fused(const Tensor& yt, const Tensor& xt, const Tensor& wt, const Tensor* bt, const Tensor* gt, float eps,
               int mode, cudaStream_t s) {
  const long long M = xt.dim(0), K = xt.dim(1), N = wt.dim(0);
  if (M == 0 || N == 0) return;
  if (M > 16) fail("ERR_UNSUPPORTED", "fusedLinear: CUDA fuses up to 16 rows, got " + std::to_string(M));
  if (K == 0) fail("ERR_SHAPE", "fusedLinear: K = 0");
  T* y = yt.ptr<T>();
  const T* x = xt.ptr<T>();
  const T* w = wt.ptr<T>();
  const T* bias = bt ? bt->ptr<T>() : nullptr;
  const GemvFuse f{gt ? gt->data() : nullptr, eps, mode};
  const bool vec = K % 8 == 0 && aligned16(x) && aligned16(w) && (!gt || aligned16(gt->data()));
  // The FMA kernel at every M: the fusions are for the decode step's few rows.
  GemvPlan plan = plan_gemv((int)M, (int)N, (int)K);
  if (M > 2) plan.u = plan.r = 2;
  launch_gemv<T>(y, x, w, bias, (int)M, (int)N, (int)K, vec, plan.u, plan.r, f, s);
}

}  // namespace

void fused_linear(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* gamma, float eps,
                  int mode, cudaStream_t stream) {
  if (x.dtype == DType::F16)
    run_fused<__half>(y, x, w, bias, gamma, eps, mode, stream);
  else if (x.dtype == DType::BF16)
    run_fused<__nv_bfloat16>(y, x, w, bias, gamma, eps, mode, stream);
  else
    fail("ERR_DTYPE", std::string("fusedLinear: CUDA takes f16 or bf16, got ") + dtype_name(x.dtype));
}

void matmul(const Tensor& y, const Tensor& x, const Tensor& w, const Tensor* bias, cudaStream_t stream) {
  if (x.dtype == DType::F16)
    run<__half>(y, x, w, bias, stream);
  else if (x.dtype == DType::BF16)
    run<__nv_bfloat16>(y, x, w, bias, stream);
  else
    fail("ERR_DTYPE", std::string("matmul: CUDA takes f16 or bf16, got ") + dtype_name(x.dtype));
}

}  // namespace sqz::cuda
