// Large-M products through a dense copy of the weight: the packed codes are decoded once into an
// fp16/bf16 matrix W [N, K] (lookup table value, plus the exact outliers folded in with one
// rounding, as the tiled GEMM of lut_gemm.cu folds them into its shared-memory tiles), and y = x W^T
// is then our dense tensor-core GEMM (kernels/gemm): one decoding kernel, then the GEMM. Included by
// lut_gemm.cu inside its anonymous namespace (Cvt, pack2, load_f).
//
// Why. The tiled LUT GEMM decodes every weight once per 128-row block of x, on the CUDA cores, in
// the same loop that feeds the tensor cores: at prefill sizes it reached a third of our dense GEMM
// (H200, 8192x8192, M = 2048: 1.63-2.00 ms against 0.51 ms). Decoding once costs one pass over the
// codes and one write of W (2 N K bytes: 46-51 us at 8192x8192, 4-bit), after which the product
// runs at the dense GEMM's speed. The launch picks the path by M (lut_gemm.cu launch()).
//
// W is a temporary from the device's caching pool (one stream per device, so its reuse is stream
// ordered), N K * 2 bytes: the launch takes this path only where that is at most a cap, the pool can
// supply it, and the stream is not capturing a graph (an allocation cannot be captured); otherwise
// the tiled GEMM runs.
#pragma once

namespace dense {

// The least M that takes the path by default: every M past the GEMV's range (measured on the H200:
// docs/log/squeezellm-kernels.md, "Prefill through a dense copy of the weight").
constexpr int kDefaultMinM = 65;

// The words of (row n, quarter q) of unit u that hold chunks 4b..4b+3, in the packed layout
// (csrc/cpu/lut_gemm.h), placed so that chunk_pairs<BITS>(w, cc) (lut_gemm.cu) reads chunk 4b + cc:
// 4 bits, the quarter's 4 words (one 16-byte load; b = 0); 3 bits, words 3b..3b+2 at w[0..2].
template <int BITS>
__device__ __forceinline__ void load_block(const uint32_t* __restrict__ codes, int n, int u, int b, int q, int U,
                                           uint32_t (&w)[Geo<BITS>::WU]) {
  const uint32_t* p = codes + ((long long)(n >> 4) * U + u) * 64 * Geo<BITS>::WU + ((n & 15) * 4 + q) * 4;
  if constexpr (BITS == 4) {
    const uint4 t = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = t.x; w[1] = t.y; w[2] = t.z; w[3] = t.w;
  } else {
#pragma unroll
    for (int i = 0; i < Geo<BITS>::WU; ++i) {
      const int wi = 3 * b + i;
      w[i] = i < 3 ? __ldg(p + (wi >> 2) * 256 + (wi & 3)) : 0u;
    }
  }
}

constexpr int kThreads = 128;  // per block (one row): short blocks, many resident per SM

// Row n of W, one block per row: W[n, k] = lut[n, code(n, k)], 32 codes per thread and item, stored
// 8 consecutive k at a time (16 bytes where rows are 16-byte aligned, K % 8 == 0), the row's table in shared memory
// (its 2^BITS entries sit in distinct banks: lanes that read different entries never conflict).
// Then the row's outliers, W[n, cols[j]] = lut value + vals[j] with one rounding, each by one thread
// after a barrier: the barrier orders them after the dense stores of the same elements, and a row's
// columns are distinct (checkOutlierCsr: they increase), so no two threads write one element. (A
// second kernel with a warp per row took 20 us for the 0.45% outliers of 8192x8192 on the H200, a
// chain of dependent loads per entry; here they follow the row's own codes, already in L1.)
template <class T, int BITS>
__global__ void __launch_bounds__(kThreads) dequant_rows_kernel(T* __restrict__ w, const uint32_t* __restrict__ codes,
                                                                const void* __restrict__ lut, bool lut_f32,
                                                                const int* __restrict__ rows, const int* __restrict__ cols,
                                                                const void* __restrict__ vals, bool vals_f32, int K, int U,
                                                                int pair_half) {
  constexpr int E = 1 << BITS, UNROLL = 2;
  __shared__ float tab[E];
  const int n = blockIdx.x, tid = threadIdx.x;
  // An item is the 32 codes of one quarter in 4 consecutive chunks of a unit (k = unit base + 128 b +
  // 32 cc + 8 q + j, cc = 0..3): for 4 bits one 16-byte load (the quarter's 4 words of the unit), for
  // 3 bits the 3 words of block b (load_block); then 4 stores of 8 values. Items run q fastest, so 4 neighbouring
  // threads write 64 contiguous bytes per store. (One thread per 8 codes, with a 4-byte load each
  // and, for 3 bits, 3 loads on a quarter of the threads: 46 / 71 us at 8192x8192 4 / 3-bit.)
  using G = Geo<BITS>;
  constexpr int BLOCKS = G::CH / 4;  // 4-chunk blocks per unit
  const int items = U * BLOCKS * 4;  // (unit, block, quarter), quarter fastest
  auto load_item = [&](int it, uint32_t (&wv)[G::WU]) {
    load_block<BITS>(codes, n, it / (4 * BLOCKS), (it >> 2) % BLOCKS, it & 3, U, wv);
  };
  // Everything the block needs is requested before it waits for any of it: a block's work is short,
  // so its latency chain (table, codes, the outliers' row bounds, columns and values) is its time.
  // (Requested one after another, with a block of 256 threads, 8192x8192 took 58 us, 2.3 TB/s.)
  const int ob = rows ? rows[n] : 0, oe = rows ? rows[n + 1] : 0;
  const float entry = tid < E ? load_f(lut, lut_f32, (long long)n * E + tid) : 0.f;
  uint32_t wv[UNROLL][G::WU];
#pragma unroll
  for (int i = 0; i < UNROLL; ++i)
    if (tid + i * kThreads < items) load_item(tid + i * kThreads, wv[i]);
  int oc = -1;
  float ov = 0.f;
  if (ob + tid < oe) { oc = cols[ob + tid]; ov = load_f(vals, vals_f32, ob + tid); }
  if (tid < E) tab[tid] = entry;
  __syncthreads();
  T* row = w + (long long)lut_pair_row(n, pair_half) * K;  // packed row n is output row lut_pair_row(n)
  for (int first = tid; first < items; first += UNROLL * kThreads) {
    if (first != tid) {
#pragma unroll
      for (int i = 0; i < UNROLL; ++i)
        if (first + i * kThreads < items) load_item(first + i * kThreads, wv[i]);
    }
#pragma unroll
    for (int i = 0; i < UNROLL; ++i) {
      const int it = first + i * kThreads;
      if (it >= items) break;
      const int u = it / (4 * BLOCKS), b = (it >> 2) % BLOCKS, q = it & 3;
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int k0 = u * G::KU + 128 * b + 32 * cc + 8 * q;
        if (k0 >= K) continue;
        const uint32_t v = chunk_pairs<BITS>(wv[i], cc);  // code j at bit cpu::lut_code_shift(BITS, j)
        float e[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) e[j] = tab[(v >> cpu::lut_code_shift(BITS, j)) & (E - 1)];
        if (K % 8 == 0) {
          uint4 o;
          o.x = pack2<T>(Cvt<T>::t(e[0]), Cvt<T>::t(e[1]));
          o.y = pack2<T>(Cvt<T>::t(e[2]), Cvt<T>::t(e[3]));
          o.z = pack2<T>(Cvt<T>::t(e[4]), Cvt<T>::t(e[5]));
          o.w = pack2<T>(Cvt<T>::t(e[6]), Cvt<T>::t(e[7]));
          *reinterpret_cast<uint4*>(row + k0) = o;
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (k0 + j < K) row[k0 + j] = Cvt<T>::t(e[j]);
        }
      }
    }
  }
  if (oe == ob) return;  // block-uniform
  __syncthreads();  // the dense stores of the row come first
  // the row's outliers, the first kThreads from the registers loaded above
  auto put = [&](int k, float val) {
    const int kk = k % G::KU, c = kk >> 5;
    uint32_t wq[G::WU];
    load_block<BITS>(codes, n, k / G::KU, c >> 2, (kk >> 3) & 3, U, wq);
    uint32_t cv = 0;
#pragma unroll
    for (int cc = 0; cc < 4; ++cc)  // (a compile-time chunk: no dynamic index into wq)
      if (cc == (c & 3)) cv = chunk_pairs<BITS>(wq, cc);
    row[k] = Cvt<T>::t(tab[(cv >> cpu::lut_code_shift(BITS, k & 7)) & (E - 1)] + val);
  };
  if (oc >= 0) put(oc, ov);
  for (int j = ob + kThreads + tid; j < oe; j += kThreads) put(cols[j], load_f(vals, vals_f32, j));
}

// Settings of the path (read per call: tuning and tests). SQUEEZELM_LUT_DENSE_MIN_M: the least M that
// takes it (0: never; it applies only where the GEMV does not, above M = 64, or 16 for unaligned
// activations); SQUEEZELM_LUT_DENSE_MAX_MB: the largest temporary W, in MiB.
inline int min_m() { return env_int("SQUEEZELM_LUT_DENSE_MIN_M", kDefaultMinM); }
inline int64_t max_bytes() { return (int64_t)env_int("SQUEEZELM_LUT_DENSE_MAX_MB", 1024) << 20; }

// y = x dequant(codes, lut)^T (+ outliers) through a dense W when M, the size of W and the stream
// allow (see above); false where the caller takes its own kernels instead.
template <class T, int BITS>
bool run(const Tensor& y, const Tensor& x, const Tensor& codes, const Tensor& lut, const Tensor* rows,
         const Tensor* cols, const Tensor* vals, int U, int pair_half, cudaStream_t st) {
  const int M = (int)x.dim(0), K = (int)x.dim(1), N = (int)y.dim(1);
  const int from = min_m();
  if (from <= 0 || M < from || (int64_t)N * K * 2 > max_bytes()) return false;
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  cuda_check(cudaStreamIsCapturing(st, &cap), "lutMatmul: cudaStreamIsCapturing");
  if (cap != cudaStreamCaptureStatusNone) return false;
  Tensor w;
  try {
    w = Tensor::empty(x.dtype, {N, K}, x.device);
  } catch (const Error& e) {
    if (e.code == "ERR_OUT_OF_MEMORY") return false;  // the tiled GEMM needs no copy
    throw;
  }
  const bool sparse = rows && cols && vals && cols->numel() > 0;
  launch_plain(dequant_rows_kernel<T, BITS>, dim3(N), dim3(kThreads), 0, st, w.ptr<T>(), codes.ptr<uint32_t>(), lut.data(),
               lut.dtype == DType::F32, sparse ? rows->ptr<int>() : nullptr, sparse ? cols->ptr<int>() : nullptr,
               sparse ? vals->data() : nullptr, sparse && vals->dtype == DType::F32, K, U, pair_half);
  cuda_check(cudaGetLastError(), "lutMatmul: dequantize");
  matmul(y, x, w, nullptr, st);
  return true;  // w goes back to the pool; its next user is ordered after the GEMM on this stream
}

}  // namespace dense
