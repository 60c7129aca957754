// Batch-1 LUT GEMV with one output row per lane (fp16 activations): the M = 1 kernel of
// lut_gemm.cu for fp16. Included by lut_gemm.cu inside its anonymous namespace, after Geo,
// chunk_bits, load_raw and the pair-table offset helpers.
//
// Why a second M = 1 kernel. The tensor-core GEMV (lut_gemv_kernel) spreads each weight row over
// the 4 lanes of an mma fragment, so every row needs 4 copies of its pair table to keep lookups
// free of bank conflicts: 64 KB of tables per 16 rows, rebuilt for every row group, and two
// blocks (16 warps) per SM. ncu put it at 0.36 issued instructions per scheduler and cycle,
// latency-bound, with the table build and the other per-group steps as costly as the main loop
// at K = 4096. Here a lane owns one row:
// * lane (h, r), r = lane % 16, h = lane / 16: row r of the block's 16-row tile, quarters h and
//   h + 2 of every unit of K (the packed layout's pieces, so lanes (r, 0) and (r, 1) read the two
//   halves of one 32-byte sector in the same instruction: every code load is whole sectors).
// * The pair table (2^(2 bits) half2 entries per row) has one copy per lane, entry e of lane l at
//   byte 256 e + 4 l: a lookup's offset is one byte permute of the code word with the lane's
//   byte (as in the tensor-core kernel), and the 32 lanes always hit 32 different banks. 32 KB of
//   entries per tile for 4-bit (the other half of the 64 KB window is unused), 8 KB for 3-bit; the
//   build is one byte permute and one 4-byte store per entry and lane, ~6% of the main loop at
//   K = 4096.
// * Products and sums in fp16x2 (HFMA2: two weights per instruction), over runs of at most 8
//   products per half, then added in fp32: no tensor-core fragment constraints, ~2 instructions
//   per 4-bit code, and few registers, so three blocks of 8 warps fit on an SM (24 warps).
//   The fp16 partial sums add a relative error of ~2^-11 per run, random from run to run
//   (relative L2 error ~3e-4 over a row). A partial sum overflows only where 8 products of one
//   row add up to more than 65504. bf16 activations keep the tensor-core kernel (bf16 sums would
//   lose 3 more bits).
// * Load balance: the (tile, unit) pairs of the whole matrix are split evenly over one wave of
//   blocks, in tile-major order (as stream-K). A tile covered by several blocks is finished by the
//   last of them to arrive (per-tile counters in a process buffer, reset by that block): it adds
//   the blocks' partial sums in block order, so results are deterministic. Outliers of a tile are
//   added by the block holding its first unit.
// * Programmatic dependent launch: the first codes, the tables and the outlier lists are read
//   before griddepcontrol.wait (weights only); x is read after it.
namespace rowlane {

constexpr int kWarps = 8, kThreads = kWarps * 32, kMinBlocks = 3;

template <int BITS> struct RL {
  using G = Geo<BITS>;
  static constexpr int E = 1 << BITS, E2 = E * E;
  static constexpr int NBS = BITS == 4 ? 4 : 1;          // code steps per batch: 128 codes per lane
  static constexpr int FLUSH = 4;                        // chunks per fp16 run (8 products per half)
  static constexpr size_t kTable = (size_t)E2 * 256;     // pair table window
  static constexpr size_t kLut = 16 * E * 2;             // the tile's 16-entry tables (fp16)
  static constexpr size_t kRed = kWarps * 16 * 4;        // per-warp row sums
  static constexpr size_t kSmem = kTable + kLut + kRed;
};

// The block holding unit index i of the (tile, unit) order: the largest b with b*total/B <= i.
__device__ __forceinline__ int block_of(long long i, long long total, int B) {
  int b = (int)((i * B) / total);
  while (b + 1 < B && ((long long)(b + 1) * total) / B <= i) ++b;
  return b;
}

// d = a * b + c on two fp16 lanes (not volatile: the compiler schedules it freely)
__device__ __forceinline__ uint32_t hfma2_u32(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
// acc += the four fp16 partial sums of two runs (added in fp16 once, then in fp32)
__device__ __forceinline__ void flush_runs(uint32_t a, uint32_t b, float& acc) {
  const __half2 s = __hadd2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  const float2 f = __half22float2(s);
  acc += f.x + f.y;
}

template <int BITS>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    rowlane_kernel(__half* __restrict__ y, const __half* __restrict__ x, const uint4* __restrict__ codes,
                   const void* __restrict__ lut, bool lut_f32, const int* __restrict__ rows,
                   const int* __restrict__ cols, const void* __restrict__ vals, bool vals_f32, int N, int K, int U,
                   long long total, int nsegmax, float* __restrict__ ws, int* __restrict__ ctr, uint32_t zero) {
  using R = RL<BITS>;
  using G = Geo<BITS>;
  constexpr int E = R::E, NBS = R::NBS, NV = G::NV, WU = G::WU, CH = G::CH, KU = G::KU;
  extern __shared__ __align__(16) uint32_t smem[];
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  __half* lt = reinterpret_cast<__half*>(base + R::kTable);           // [16][E]
  float* red = reinterpret_cast<float*>(base + R::kTable + R::kLut);  // [kWarps][16]
  __shared__ int s_last;
  const uint32_t tbl = smem_u32(base);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, h = lane >> 4, r = lane & 15;
  const uint32_t lb = 4u * lane;
  const int B = gridDim.x, b = blockIdx.x;
  long long lo = (long long)b * total / B;
  const long long hi = (long long)(b + 1) * total / B;

  // Code steps: step j of a segment is unit u0 + j / 2, quarter h + 2 (j % 2) of the lane's row; a
  // warp takes steps warp, warp + kWarps, ... in batches of NBS (128 codes per lane).
  uint4 buf[NBS][NV];
  const uint4* crow = codes;  // the lane's row, plane 0 of unit 0 of the tile (16-byte units)
  int u0 = 0, my = 0;
  // zdep: 0 at run time, but computed from the batch in flight, so the next batch's loads are
  // issued only once that batch has landed. Every code load of a warp shares one scoreboard: a
  // batch requested before the previous one is read would make that read wait for both.
  auto load_batch = [&](int bi, uint32_t zdep) {
#pragma unroll
    for (int s2 = 0; s2 < NBS; ++s2) {
      const int jl = bi * NBS + s2, j = warp + jl * kWarps;
      const bool ok = jl < my;
      const uint4* p = crow + (size_t)(u0 + (j >> 1)) * G::USTRIDE + 2 * (j & 1) + zdep;
#pragma unroll
      for (int v = 0; v < NV; ++v) buf[s2][v] = ok ? ld_stream(p + 64 * v) : make_uint4(0, 0, 0, 0);
    }
  };

  bool waited = false;
  while (lo < hi) {
    const int t = (int)(lo / U);
    u0 = (int)(lo - (long long)t * U);
    const int u1 = (int)min((long long)U, u0 + (hi - lo));
    lo += u1 - u0;
    const int n = 16 * t + r;
    const int nsteps = 2 * (u1 - u0);
    crow = codes + (size_t)t * U * G::USTRIDE + (r * 4 + h);
    my = nsteps > warp ? (nsteps - warp + kWarps - 1) / kWarps : 0;
    // 1. this warp's first batch of steps
    load_batch(0, 0u);
    // 2. outlier entries of the lane's row (block of the tile's first unit only): the first two are
    //    requested now, the rest after the main loop. Thread (warp, h) takes entries warp*2+h, +16, ...
    const bool outl = rows != nullptr && u0 == 0 && n < N;
    int ob = 0, oe = 0, oc[2] = {0, 0};
    uint32_t ov[2] = {0u, 0u};
    if (outl) {
      ob = rows[n] + warp * 2 + h;
      oe = rows[n + 1];
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (ob + 16 * e < oe) {
          oc[e] = ld_pinned_s32(cols + ob + 16 * e);
          ov[e] = vals_f32 ? ld_pinned_u32(static_cast<const uint32_t*>(vals) + ob + 16 * e)
                           : ld_pinned_u16(static_cast<const unsigned short*>(vals) + ob + 16 * e);
        }
    }
    // 3. the tile's 16-entry tables, then the pair tables: thread (warp, lane l) writes entries
    //    e = warp + 8 i of lane l's copy (row l % 16); entry e = (lut[e % E], lut[e / E]).
    for (int i = tid; i < 16 * E; i += kThreads) {
      const int rn = 16 * t + i / E;
      lt[i] = rn < N ? (lut_f32 ? __float2half_rn(static_cast<const float*>(lut)[(long long)rn * E + i % E])
                                : static_cast<const __half*>(lut)[(long long)rn * E + i % E])
                     : __float2half_rn(0.f);
    }
    __syncthreads();
    {
      const unsigned short* lr = reinterpret_cast<const unsigned short*>(lt) + r * E;
      uint32_t row[E / 2];
#pragma unroll
      for (int j = 0; j < E / 2; ++j) row[j] = (uint32_t)lr[2 * j] | ((uint32_t)lr[2 * j + 1] << 16);
      if constexpr (BITS == 4) {
        // e = warp + 8 i: e % 16 = warp + 8 (i % 2), e / 16 = i / 2
        const uint32_t a0 = lr[warp], a1 = lr[warp + 8];
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int e1 = i >> 1;
          const uint32_t hi16 = (e1 & 1) ? (row[e1 >> 1] >> 16) : (row[e1 >> 1] & 0xffffu);
          const uint32_t v = ((i & 1) ? a1 : a0) | (hi16 << 16);
          st_shared_u32(tbl + (uint32_t)((warp + 8 * i) * 256) + lb, v);
        }
      } else {
        // e = warp + 8 i: e % 8 = warp, e / 8 = i
        const uint32_t a0 = lr[warp];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint32_t hi16 = (i & 1) ? (row[i >> 1] >> 16) : (row[i >> 1] & 0xffffu);
          st_shared_u32(tbl + (uint32_t)((warp + 8 * i) * 256) + lb, a0 | (hi16 << 16));
        }
      }
    }
    __syncthreads();
    if (!waited) {
      pdl_wait();
      pdl_trigger();
      waited = true;
    }

    // 4. main loop: take the batch in flight, request the next one, decode the taken one
    float acc = 0.f;
    const int nb = (my + NBS - 1) / NBS;
    for (int bi = 0; bi < nb; ++bi) {
      uint32_t w[NBS][WU];
#pragma unroll
      for (int s2 = 0; s2 < NBS; ++s2)
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          w[s2][4 * v] = buf[s2][v].x;
          w[s2][4 * v + 1] = buf[s2][v].y;
          w[s2][4 * v + 2] = buf[s2][v].z;
          w[s2][4 * v + 3] = buf[s2][v].w;
        }
      load_batch(bi + 1, w[0][0] & zero);
#pragma unroll
      for (int s2 = 0; s2 < NBS; ++s2) {
        const int jl = bi * NBS + s2, j = warp + jl * kWarps;
        if (jl < my) {
          const int kq = (u0 + (j >> 1)) * KU + 8 * (h + 2 * (j & 1));
#pragma unroll
          for (int c0 = 0; c0 < CH; c0 += R::FLUSH) {
            uint32_t ha = 0u, hb = 0u;
#pragma unroll
            for (int c = c0; c < c0 + R::FLUSH; ++c) {
              const int k = kq + 32 * c;
              const uint4 xv = k < K ? *reinterpret_cast<const uint4*>(x + k) : make_uint4(0, 0, 0, 0);
              const uint32_t cv = chunk_bits<BITS>(w[s2], c), cv8 = cv << 8;
              const uint32_t t0 = lds_at(tbl, pair_off<BITS>(cv, cv8, lb, 0));
              const uint32_t t1 = lds_at(tbl, pair_off<BITS>(cv, cv8, lb, 1));
              const uint32_t t2 = lds_at(tbl, pair_off<BITS>(cv, cv8, lb, 2));
              const uint32_t t3 = lds_at(tbl, pair_off<BITS>(cv, cv8, lb, 3));
              ha = hfma2_u32(t0, xv.x, ha);
              hb = hfma2_u32(t1, xv.y, hb);
              ha = hfma2_u32(t2, xv.z, ha);
              hb = hfma2_u32(t3, xv.w, hb);
            }
            flush_runs(ha, hb, acc);
          }
        }
      }
    }
    // 5. outliers (exact, fp32)
    if (outl) {
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (ob + 16 * e < oe) acc = fmaf(raw_f(ov[e], vals_f32), __half2float(x[oc[e]]), acc);
      for (int j = ob + 32; j < oe; j += 16) acc = fmaf(load_f(vals, vals_f32, j), __half2float(x[cols[j]]), acc);
    }
    // 6. the segment's row sums: lanes (r, 0) and (r, 1), then the warps in order
    acc += __shfl_xor_sync(0xffffffffu, acc, 16);
    if (lane < 16) red[warp * 16 + r] = acc;
    __syncthreads();
    const int bf = block_of((long long)t * U, total, B), bl = block_of((long long)t * U + U - 1, total, B);
    float s = 0.f;
    if (tid < 16) {
#pragma unroll
      for (int w2 = 0; w2 < kWarps; ++w2) s += red[w2 * 16 + tid];
    }
    if (bf == bl) {
      if (tid < 16 && 16 * t + tid < N) y[16 * t + tid] = __float2half_rn(s);
    } else {
      // several blocks share the tile: partials in block order, the last to arrive adds them
      if (tid < 16) ws[((long long)t * nsegmax + (b - bf)) * 16 + tid] = s;
      __threadfence();
      __syncthreads();
      if (tid == 0) {
        const int prev = atomicAdd(ctr + t, 1);
        s_last = prev == bl - bf;
        if (s_last) ctr[t] = 0;  // ready for the next launch
      }
      __syncthreads();
      if (s_last && tid < 16) {
        __threadfence();
        float tot = 0.f;
        for (int sg = 0; sg <= bl - bf; ++sg) tot += __ldcg(ws + ((long long)t * nsegmax + sg) * 16 + tid);
        if (16 * t + tid < N) y[16 * t + tid] = __float2half_rn(tot);
      }
    }
    __syncthreads();  // red, lt and the tables are free for the next segment
  }
  if (!waited) pdl_wait();
}

}  // namespace rowlane
