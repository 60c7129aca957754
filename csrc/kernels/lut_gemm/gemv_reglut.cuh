// 4-bit LUT GEMV with each row's table held in registers (M <= 8), on the packed layout of
// csrc/cpu/lut_gemm.h. Included by lut_gemm.cu after its helpers (Cvt, pack2, load_x8, load_f,
// raw_f, ld_early_raw), inside its namespace.
//
// Why a second M <= 8 kernel. The tensor-core GEMV of lut_gemm.cu looks codes up in pairs in
// shared memory: per 16-row group a block builds 64 KB of pair tables (4 copies per row, so lookups
// never conflict), its 8 warps split K, and the group ends in a reduction over warps. At K = 4096
// (the q|k|v, o and gate|up projections of a 7B decode step) a warp decodes only 4 units per group,
// and the table build, barriers and reduction cost as much as the main loop: those shapes run at
// 39-52% of the copy bandwidth where K = 28672 reaches 73-77% (docs/squeezellm.md).
//
// Here a lane of the mma A fragment (rows g and g + 8 of a 16-row tile) holds the two rows'
// 16-entry tables as byte planes in 16 registers, and looks codes up with byte permutes:
//   lo[j] / hi[j] = the low / high bytes of entries 4j .. 4j + 3 (entries in the activation dtype);
//   for 4 codes c0..c3 (one 16-bit run of nibbles), selector s = c & 7 per nibble:
//     l = prmt(prmt(lo0, lo1, s), prmt(lo2, lo3, s), t),  t = nibble i + 4 * (bit 3 of c_i),
//     h = the same over hi,  then (c0, c1) = prmt(l, h, 0x5140), (c2, c3) = prmt(l, h, 0x7362):
// two half2 words of the A operand, exactly the pair-table lookups' result. 21 integer
// instructions per 8 codes (the integer pipe runs at half rate, so ~76% of the copy bandwidth at
// the H200's clock, before any other work), no shared memory, no table build, no barrier in the
// main loop. A block is one 16-row tile and S warps that split K (unit u to warp u mod S); the
// grid is one block per tile, scheduled by the hardware (small blocks balance the SMs), and the S
// partial tiles are summed in warp order in shared memory: deterministic, no atomics.
// Outliers (CSR over rows) are added by the same launch after the main loop: at M <= 2 a row's
// list is dealt to its 4 lanes and the S warps (two shuffles sum the lanes' shares), at M = 3-8
// each lane gathers x[m][col] for its activation rows 2q, 2q + 1. A lane's first RL_OUTR entries
// of each row are requested after its first unit (the row bounds have landed by then) and arrive
// under the rest of the main loop.

// prmt.b32 in its default mode; s must have bit 3 of each used nibble clear (sign replication).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
}

// One row's 16-entry table as byte planes (see the top of this file).
struct RegLut {
  uint32_t lo[4], hi[4];
};

// Row n's table in the activation dtype (zero for rows past N, whose codes are 0 and whose outputs
// are never written).
template <class T>
__device__ __forceinline__ RegLut reglut_load(const void* lut, bool lut_f32, int n, int N) {
  uint32_t v[8];  // entries 2i, 2i + 1, packed
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float a = n < N ? load_f(lut, lut_f32, (long long)n * 16 + 2 * i) : 0.f;
    const float b = n < N ? load_f(lut, lut_f32, (long long)n * 16 + 2 * i + 1) : 0.f;
    v[i] = pack2<T>(Cvt<T>::t(a), Cvt<T>::t(b));
  }
  RegLut L;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    L.lo[j] = prmt(v[2 * j], v[2 * j + 1], 0x6420u);
    L.hi[j] = prmt(v[2 * j], v[2 * j + 1], 0x7531u);
  }
  return L;
}

// Codes c0..c3 (s: their low 3 bits per nibble; t: the select word) -> (c0, c1), (c2, c3) as half2.
__device__ __forceinline__ void reglut4(const RegLut& L, uint32_t s, uint32_t t, uint32_t& p01, uint32_t& p23) {
  const uint32_t l = prmt(prmt(L.lo[0], L.lo[1], s), prmt(L.lo[2], L.lo[3], s), t);
  const uint32_t h = prmt(prmt(L.hi[0], L.hi[1], s), prmt(L.hi[2], L.hi[3], s), t);
  p01 = prmt(l, h, 0x5140u);
  p23 = prmt(l, h, 0x7362u);
}

// The 8 codes of one packed word (nibble i = k + i) -> the A words (k0, k1), (k2, k3), (k4, k5), (k6, k7).
__device__ __forceinline__ void reglut_word(const RegLut& L, uint32_t w, uint32_t (&p)[4]) {
  const uint32_t s = w & 0x77777777u;
  const uint32_t t = ((w >> 1) & 0x44444444u) | 0x32103210u;
  reglut4(L, s, t, p[0], p[1]);
  reglut4(L, s >> 16, t >> 16, p[2], p[3]);
}

// One unit (128 k) of rows g, g + 8: wa / wb are the lane's 4 code words of each (word c = chunk c,
// k = kb + 32c .. + 7), B = activation row g (zero where g >= M), as in gemv_unit.
template <class T, bool XVEC>
__device__ __forceinline__ void reglut_unit(float (&acc)[4], const RegLut& La, const RegLut& Lb, const uint4& qa,
                                            const uint4& qb, const T* xr, bool mv, int kb, int K) {
  uint4 xv[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) xv[c] = load_x8<T, XVEC>(xr, kb + 32 * c, K, mv);
  const uint32_t wa[4] = {qa.x, qa.y, qa.z, qa.w}, wb[4] = {qb.x, qb.y, qb.z, qb.w};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    uint32_t a[4], b[4];
    reglut_word(La, wa[c], a);
    reglut_word(Lb, wb[c], b);
    mma_16816<T>(acc, a[0], b[0], a[1], b[1], xv[c].x, xv[c].y);
    mma_16816<T>(acc, a[2], b[2], a[3], b[3], xv[c].z, xv[c].w);
  }
}

constexpr int RL_OUTR = 2;  // outlier entries per lane and row requested under the main loop

// Block = one 16-row tile, blockDim.x / 32 = S warps splitting K; P register buffers of codes per
// warp (P - 1 units in flight while one is decoded, as in lut_gemv_kernel).
template <class T, int P, bool XVEC>
__global__ void __launch_bounds__(256, 3)
    lut_gemv_reglut_kernel(T* __restrict__ y, const T* __restrict__ x, const uint4* __restrict__ codes,
                           const void* __restrict__ lut, bool lut_f32, const int* __restrict__ rows,
                           const int* __restrict__ cols, const void* __restrict__ vals, bool vals_f32, int M, int N,
                           int K, int U) {
  extern __shared__ __align__(16) float rl_red[];  // [S][32 lanes][4], S > 1
  const int S = blockDim.x >> 5;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int n0 = blockIdx.x * 16;

  // Before the wait: weights only (codes, tables, outlier row bounds).
  const uint4* ca = codes + (size_t)blockIdx.x * U * 64 + (g * 4 + q);  // row g; row g + 8 at +32
  uint4 qa[P], qb[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int u = warp + p * S;
    qa[p] = u < U ? ld_stream(ca + (size_t)u * 64) : make_uint4(0, 0, 0, 0);
    qb[p] = u < U ? ld_stream(ca + (size_t)u * 64 + 32) : make_uint4(0, 0, 0, 0);
  }
  const RegLut La = reglut_load<T>(lut, lut_f32, n0 + g, N), Lb = reglut_load<T>(lut, lut_f32, n0 + g + 8, N);
  const bool split = M <= 2;  // outliers: a row's list over its 4 lanes too (uniform)
  const int ostride = split ? 4 * S : S;
  int cb[2], ce[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int n = n0 + g + 8 * rr;
    cb[rr] = ce[rr] = 0;
    if (rows != nullptr && n < N) {
      cb[rr] = ld_pinned_s32(rows + n);  // used only after the first unit: no wait here
      ce[rr] = ld_pinned_s32(rows + n + 1);
    }
  }
  int oc[2][RL_OUTR];
  uint32_t ov[2][RL_OUTR];
  auto request_outliers = [&]() {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      cb[rr] += warp + (split ? S * q : 0);
#pragma unroll
      for (int o = 0; o < RL_OUTR; ++o) {
        const int j = cb[rr] + o * ostride;
        oc[rr][o] = -1;
        ov[rr][o] = 0u;
        if (j < ce[rr]) {
          oc[rr][o] = ld_pinned_s32(cols + j);
          ov[rr][o] = ld_early_raw(vals, vals_f32, j);
        }
      }
    }
  };

  pdl_wait();
  pdl_trigger();
  const bool mv = g < M;
  const T* xr = x + (size_t)(mv ? g : 0) * K;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  bool requested = false;
  for (int u0 = warp; u0 < U; u0 += S * P) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int u = u0 + p * S;
      if (u >= U) break;
      reglut_unit<T, XVEC>(acc, La, Lb, qa[p], qb[p], xr, mv, u * 128 + 8 * q, K);
      const int un = u + S * P;
      if (un < U) {
        qa[p] = ld_stream(ca + (size_t)un * 64);
        qb[p] = ld_stream(ca + (size_t)un * 64 + 32);
      }
      if (!requested) {
        requested = true;
        if (rows != nullptr) request_outliers();
      }
    }
  }
  if (!requested && rows != nullptr) request_outliers();  // a warp without units (U < S)

  if (rows != nullptr) {  // uniform: dense-only launches skip the step
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      if (split) {
        // this lane's share of row g + 8rr for activation rows 0 and 1; the row's 4 lanes then reduce
        float part[2] = {0.f, 0.f};
#pragma unroll
        for (int o = 0; o < RL_OUTR; ++o) {
          const int col = oc[rr][o];
          const int cc = col >= 0 ? col : 0;
          const float v = col >= 0 ? raw_f(ov[rr][o], vals_f32) : 0.f;
          part[0] = fmaf(v, Cvt<T>::f(x[cc]), part[0]);
          if (M > 1) part[1] = fmaf(v, Cvt<T>::f(x[(size_t)K + cc]), part[1]);
        }
        for (int j = cb[rr] + RL_OUTR * ostride; j < ce[rr]; j += ostride) {
          const float v = load_f(vals, vals_f32, j);
          const int col = cols[j];
          part[0] = fmaf(v, Cvt<T>::f(x[col]), part[0]);
          if (M > 1) part[1] = fmaf(v, Cvt<T>::f(x[(size_t)K + col]), part[1]);
        }
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          part[jj] += __shfl_xor_sync(0xffffffffu, part[jj], 1);
          part[jj] += __shfl_xor_sync(0xffffffffu, part[jj], 2);
          if (q == 0) acc[2 * rr + jj] += part[jj];
        }
      } else {
        // activation rows 2q, 2q + 1 of this lane, every S-th entry of the row
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int m = 2 * q + jj;
          if (m < M) {
            const T* xm = x + (size_t)m * K;
#pragma unroll
            for (int o = 0; o < RL_OUTR; ++o) {
              const int col = oc[rr][o];
              const float v = col >= 0 ? raw_f(ov[rr][o], vals_f32) : 0.f;
              acc[2 * rr + jj] = fmaf(v, Cvt<T>::f(xm[col >= 0 ? col : 0]), acc[2 * rr + jj]);
            }
            for (int j = cb[rr] + RL_OUTR * ostride; j < ce[rr]; j += ostride)
              acc[2 * rr + jj] = fmaf(load_f(vals, vals_f32, j), Cvt<T>::f(xm[cols[j]]), acc[2 * rr + jj]);
          }
        }
      }
    }
  }

  // C fragment: acc[j] = y[m = 2q + (j & 1)][n0 + g + 8 (j >> 1)]. S partial tiles summed in warp order.
  if (S == 1) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = 2 * q + (j & 1), n = n0 + g + 8 * (j >> 1);
      if (m < M && n < N) y[(size_t)m * N + n] = Cvt<T>::t(acc[j]);
    }
    return;
  }
  *reinterpret_cast<float4*>(rl_red + (warp * 32 + lane) * 4) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  for (int idx = threadIdx.x; idx < 128; idx += blockDim.x) {
    const int l = idx >> 2, j = idx & 3;
    const int m = 2 * (l & 3) + (j & 1), n = n0 + (l >> 2) + 8 * (j >> 1);
    if (m >= M || n >= N) continue;
    float s = 0.f;
    for (int w = 0; w < S; ++w) s += rl_red[w * 128 + idx];
    y[(size_t)m * N + n] = Cvt<T>::t(s);
  }
}

// Warps per tile (the split of K): the smallest power of two up to 8 that gives at least 16 warps per
// SM, while each warp keeps at least 4 units. SQUEEZELM_LUT_REGLUT_SPLIT=1/2/4/8 forces it (tuning, tests).
inline int reglut_split(int tiles, int U, int sms) {
  const int forced = env_int("SQUEEZELM_LUT_REGLUT_SPLIT", 0);
  if (forced == 1 || forced == 2 || forced == 4 || forced == 8) return forced;
  int S = 1;
  while (S < 8 && (long long)tiles * S < 16LL * sms && U >= 8 * S) S *= 2;
  return S;
}

template <class T, int P>
void launch_gemv_reglut(T* yp, const T* xp, const uint4* cp, const void* lp, bool lf, const int* rp, const int* colp,
                        const void* vp, bool vf, int M, int N, int K, int U, cudaStream_t st) {
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "lutMatmul: cudaGetDevice");
  const int tiles = (N + 15) / 16, S = reglut_split(tiles, U, sm_count(dev));
  const size_t smem = S > 1 ? (size_t)S * 128 * sizeof(float) : 0;
  launch_pdl(lut_gemv_reglut_kernel<T, P, true>, dim3(tiles), dim3(32 * S), smem, st, yp, xp, cp, lp, lf, rp, colp, vp,
             vf, M, N, K, U);
}
