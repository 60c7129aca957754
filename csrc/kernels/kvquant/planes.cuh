// Rotation-plane tensor-core decode attention over the packed KVQuant cache: the default kernel
// for head_dim 64, 96 and 128 with up to 8 query heads per kv head. Included by kvquant.cu
// inside its anonymous namespace, after namespace tc (Geo, slot_of, the codebook byte-permute
// helpers, the split plan and the combine are shared).
//
// Why this shape. Keys are stored before RoPE as k = a*cb + b per channel (a, b from the
// calibrated bounds, cb a codebook value), so with (c, s) the cos/sin of a RoPE pair at the
// token's position, the score of a pair (x channel i, y channel i + D/2) is
//     qx x' + qy y' = c*cbx*(qx ax) + c*cby*(qy ay) + s*cbx*(qy ax) + s*cby*(-qx ay)
//                     + c*(qx bx + qy by) + s*(qy bx - qx by).
// Every term is a product of something per token (c*cb, s*cb, c, s) with something per query
// head (the brackets). So the score is one tensor-core product over six "planes" of HALF
// entries each: the token side is built in registers with one half2 multiply per two
// entries (c*cb and s*cb; the codebook values come from byte permutes, the cos/sin half2
// words from a per-block table), the query side is computed once per split. Nothing is
// dequantized or rotated in fp32 per element, nothing is staged through shared memory for the
// keys, and the fragments are laid out so that each lane's RoPE pairs are one contiguous run
// of its token's code row. Codebook entries are fp16 values (kvquant_layout.h), so the only
// roundings are c*cb, s*cb and the query-side brackets: random from token to token.
//   * scores: S^T = K Q^T with mma.m16n8k16, A = the token planes (16 tokens of the tile),
//     B = the query planes (8 query heads): every row of the product is used (with the query
//     heads as rows, G <= 8 would waste half of it).
//   * softmax in fp32 (log2 domain); P^T for p.v is the score fragment transposed by movmatrix.
//   * values: v = offset_t + scale_t * cb, so the value tile holds codebook values (staged per
//     token row through shared memory, read transposed by ldmatrix) and P carries p * scale_t;
//     sum p * offset_t is kept apart. A value outlier is staged as (exact - offset) / scale.
//   * key outliers: the difference between the exact key and a*cb + b, rotated with an exact
//     cos/sin and multiplied with each query head, is added to the scores of the token's heads in
//     fp32 (one lane per outlier computes it for all heads, the lanes holding the token's scores
//     read theirs from shared memory).
//   * sink tokens: splits of their own (blocks x < nsink, beside the token splits), exactly
//     (fp16 keys rotated in fp32, fp16 values), in batches of up to 32 tokens spread over the
//     lanes (sink_partial); the token splits' tiles mask them.
//   * codes, value rows and metadata of the next tiles are copied to shared memory by cp.async
//     (two or three stages per warp) while the current tile is computed.
// Grid and combine are tc's (one warp per kv head), with splits of 32 tokens.
namespace planes {

// kChunk: tokens per cos/sin table fill; kSplit: the split granularity (half a chunk, so that
// short contexts still give two blocks per SM: at 8K tokens and 8 kv heads, 64-token splits
// gave 128 blocks, one per SM)
constexpr int kTok = 16, kChunk = 64, kSplit = 32, kWarps = 8;
// Row stride (floats) of the key-outlier corrections [token][head][slot parity]: 16 used, 16-byte
// aligned, token rows 20 words apart (two rows per bank group at most).
constexpr int kCorrRow = 20;
static_assert(kTok * kCorrRow * 4 <= kTok * 64 * 2, "corrections fit the smallest value tile");
using tc::Book;
using tc::h2u;
using tc::kLog2e;
using tc::lds128;
using tc::lut;
using tc::prmt;
using tc::sts128;
using tc::swz;
using tc::u2h;

template <int D, int BITS> struct Shape {
  static constexpr int HALF = D / 2;
  static constexpr int KS = HALF / 16;   // k-steps per plane
  static constexpr int PPL = HALF / 4;   // RoPE pairs per lane and token (4 per k-step)
  static constexpr int GROUPS = HALF / 4;  // 4-pair groups per token in the cos/sin table
  // cos/sin table row stride in 16-byte chunks, = 4 (mod 8): the 8 lanes of a quarter warp
  // (two tokens, four lanes each) read 8 different bank groups
  static constexpr int RSC = (GROUPS + 3) / 8 * 8 + 4;
  static constexpr int CB = fast::CodeBytes<D, BITS>::value;
  static constexpr int KBITS = PPL * 2 * BITS;  // key code bits per lane and token
  static constexpr int NWK = (KBITS + 31) / 32 + (BITS == 3 ? 1 : 0);
  static constexpr int NB = D / 16, MT = D / 16;
  static constexpr int RS = D <= 64 ? 64 : 128;  // value tile row stride (halves)
  static constexpr int TW = BITS == 4 ? 4 : 2;
  static constexpr int NSTG = BITS == 2 ? 3 : 2;  // cp.async stages per warp (two blocks per SM)
};
static_assert(Shape<64, 2>::RSC % 8 == 4 && Shape<96, 3>::RSC % 8 == 4 && Shape<128, 4>::RSC % 8 == 4, "table stride");

__device__ __forceinline__ unsigned hmul2(unsigned a, unsigned b) { return h2u(__hmul2(u2h(a), u2h(b))); }
// 8x8 fp16 transpose across the warp (ptx.cuh).
__device__ __forceinline__ unsigned movtrans(unsigned a) { return movmatrix_trans(a); }

// NW words of a bit stream starting at bit `bit0` of a shared-memory row (reads one more word).
template <int NW, bool ALIGNED>
__device__ __forceinline__ void stream_words(const uint8_t* row, int bit0, unsigned (&w)[NW]) {
  const unsigned* p = reinterpret_cast<const unsigned*>(row) + (bit0 >> 5);
  if constexpr (ALIGNED) {
#pragma unroll
    for (int i = 0; i < NW; ++i) w[i] = p[i];
  } else {
    const int sh = bit0 & 31;
    unsigned nx = p[0];
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      const unsigned cur = nx;
      nx = p[i + 1];
      w[i] = __funnelshift_r(cur, nx, sh);
    }
  }
}

// Codebook values of the lane's 4 RoPE pairs of k-step ks (from its key code words): X[0] =
// (x0, x1), X[1] = (x2, x3) as half2, Y likewise for the partner channels.
template <int BITS, int TW, int NW>
__device__ __forceinline__ void key_step(const unsigned (&kw)[NW], int ks, const Book<TW>& bk, unsigned (&X)[2],
                                         unsigned (&Y)[2]) {
  unsigned lo, hi;
  if constexpr (BITS == 2) {
    const unsigned v = kw[ks >> 1] >> ((ks & 1) * 16);  // x_k in bits 4k, 4k+1; y_k in 4k+2, 4k+3
    lut(bk, v & 0x3333u, lo, hi);
    X[0] = prmt(lo, hi, 0x5140);
    X[1] = prmt(lo, hi, 0x7362);
    lut(bk, (v >> 2) & 0x3333u, lo, hi);
    Y[0] = prmt(lo, hi, 0x5140);
    Y[1] = prmt(lo, hi, 0x7362);
  } else {
    unsigned nb;  // one code per nibble: x0 y0 x1 y1 x2 y2 x3 y3
    if constexpr (BITS == 4) {
      nb = kw[ks];
    } else {
      const int bit = 24 * ks;
      nb = tc::nib3(__funnelshift_r(kw[bit >> 5], kw[(bit >> 5) + 1], bit & 31) & 0xffffffu);
    }
    lut(bk, nb & 0xffffu, lo, hi);
    X[0] = prmt(lo, hi, 0x6240);
    Y[0] = prmt(lo, hi, 0x7351);
    lut(bk, nb >> 16, lo, hi);
    X[1] = prmt(lo, hi, 0x6240);
    Y[1] = prmt(lo, hi, 0x7351);
  }
}

template <int D, int BITS> __host__ __device__ inline size_t warp_bytes(int stage_bytes) {
  using S = Shape<D, BITS>;
  return (size_t)S::NSTG * stage_bytes + kTok * S::RS * 2 + S::KS * 2 * 32 * 8 + kTok * 8;
}
template <int D, int BITS> __host__ __device__ constexpr size_t table_bytes() { return (size_t)kChunk * Shape<D, BITS>::RSC * 16; }
inline int stage_bytes_for(int cb, int mb) { return (32 * cb + 16 * mb + 15) / 16 * 16; }

// Splits of their own for the sink tokens (blockIdx.x 0 .. nsink - 1 of each row and head group):
// at most one per 32-token batch of the sink and at most kSinkSplits (further batches are dealt
// over them); how many is plan_with_sink's choice.
constexpr int kSinkSplits = 4;
inline int sink_batches(const Geo& g) { return (g.sink + 31) / 32; }

// The running maxima start at kNoKey, not -inf: a token split inside the sink can see a tile with
// every key masked before any other, and exp2(-inf - -inf) would poison its state; from kNoKey
// such a tile gives factor 1 and p = 0 with no test in the loop. A partial that saw no key still
// reports -inf: partial_max turns a running maximum (log2 domain) into the partial's (natural log).
constexpr float kNoKey = -1e30f;
__device__ __forceinline__ float partial_max(float m) { return m == kNoKey ? -INFINITY : m * 0.6931471805599453f; }

// The sink split's work (see the kernel): its own accumulators, its partial written here. sk0 /
// sv0: the sink store at token 0 of this sequence and kv head, tstride elements from one token to
// the next; ts_end sink tokens (0: no sequence), of which this split takes the 32-token batches
// at tb0, tb0 + tb_step, ...; qsh / fsh / psh: the warp's scratch (query heads,
// inv_freq, p and the running maxima and sums); pr0: the partial of query head 0, pr_head floats
// to the next head's. It takes the query heads four at a time (a second pass over the sink for 5-8
// heads), so only four heads' accumulators are held in registers.
template <class T, int D, int BITS>
__device__ __forceinline__ void sink_partial(const uint16_t* sk0, const uint16_t* sv0, long long tstride, int ts_end,
                                             int tb0, int tb_step, const T* qrow, const float* inv_freq, float qs, int G, float* pr0,
                                             long long pr_head, unsigned qsh, unsigned fsh, unsigned psh) {
  using S = Shape<D, BITS>;
  constexpr int HALF = S::HALF, KS = S::KS, RS = S::RS, CB = S::CB, NSTG = S::NSTG;
  constexpr int CPL = D / 32;    // value channels per lane in the p.v pass
  constexpr int NCH = HALF / 8;  // 16-byte chunks of a key row's half
  const int lane = threadIdx.x & 31;
  // scratch: the query heads [HALF][x 8 | y 8] (fp32, x qs) in the value tile (qsh), inv_freq in
  // the query-plane area (fsh), p [32 tokens][4 heads] then the four heads' maxima and sums in the
  // stages (psh)
  static_assert(HALF * 16 * 4 <= kTok * RS * 2, "sink query heads fit the value tile");
  static_assert(HALF * 4 <= KS * 2 * 32 * 8, "inv_freq fits the query-plane area");
  static_assert(NSTG * 32 * CB >= 32 * 4 * 4 + 32, "p, maxima and sums fit the stages");
  const unsigned msh = psh + 32 * 4 * 4, lsh = msh + 16;
  for (int e = lane; e < HALF * 8; e += 32) {
    const int i = e >> 3, hh = e & 7;
    const bool ok = hh < G;
    tc::sts32(qsh + (unsigned)((i * 16 + hh) * 4), ok ? qs * to_f(qrow[hh * D + i]) : 0.f);
    tc::sts32(qsh + (unsigned)((i * 16 + 8 + hh) * 4), ok ? qs * to_f(qrow[hh * D + i + HALF]) : 0.f);
  }
  for (int i = lane; i < HALF; i += 32) tc::sts32(fsh + (unsigned)(i * 4), inv_freq[i]);
  const uint16_t* const svl = sv0 + lane * CPL;
  for (int hg = 0; hg < G; hg += 4) {  // query heads hg .. hg + 3
    if (lane < 4) {
      tc::sts32(msh + lane * 4, kNoKey);
      tc::sts32(lsh + lane * 4, 0.f);
    }
    __syncwarp();
    float av[4][CPL];  // head hg + hh, channel lane * CPL + c
#pragma unroll
    for (int hh = 0; hh < 4; ++hh)
#pragma unroll
      for (int c = 0; c < CPL; ++c) av[hh][c] = 0.f;
    for (int tb = tb0; tb < ts_end; tb += tb_step) {
      const int nb = min(32, ts_end - tb);
      const int lpt = 32 >> (32 - __clz(nb - 1));  // 32 / (nb rounded up to a power of two)
      const int tl = lane / lpt, sub = lane % lpt, tt = tb + tl;
      const bool tok_ok = tl < nb;
      // the batch's key and value rows requested into L1 at once (the key chunks below and the
      // p.v pass's row loads then wait for L1, not for a round trip each)
      if (hg == 0 && tok_ok && sub == 0) {
        const char* kb = reinterpret_cast<const char*>(sk0 + tt * tstride);
        const char* vb = reinterpret_cast<const char*>(sv0 + tt * tstride);
        for (int o = 0; o < D * 2; o += 128) {
          prefetch_l1(kb + o);
          prefetch_l1(vb + o);
        }
        prefetch_l1(kb + D * 2 - 1);  // a row that straddles one more line
        prefetch_l1(vb + D * 2 - 1);
      }
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      if (tok_ok && sub < NCH) {
        const uint4* kr = reinterpret_cast<const uint4*>(sk0 + tt * tstride);  // x chunks, then y chunks
        uint4 kx = __ldg(kr + sub), ky = __ldg(kr + NCH + sub);
        for (int ch = sub; ch < NCH; ch += lpt) {
          const unsigned xw[4] = {kx.x, kx.y, kx.z, kx.w}, yw[4] = {ky.x, ky.y, ky.z, ky.w};
          if (ch + lpt < NCH) {
            kx = __ldg(kr + ch + lpt);
            ky = __ldg(kr + NCH + ch + lpt);
          }
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int i = 8 * ch + j;
            const float x = __half2float(__ushort_as_half((unsigned short)(xw[j >> 1] >> (16 * (j & 1)))));
            const float y = __half2float(__ushort_as_half((unsigned short)(yw[j >> 1] >> (16 * (j & 1)))));
            float sn, cn;
            tc::sincos_reduced(__fmul_rn((float)tt, tc::lds32(fsh + (unsigned)(i * 4))), &sn, &cn);
            const float xr = fmaf(x, cn, -y * sn), yr = fmaf(y, cn, x * sn);
            const unsigned qa = qsh + (unsigned)(i * 64 + hg * 4);
            const float4 qx = tc::lds128f(qa), qy = tc::lds128f(qa + 32);
            s[0] = fmaf(qx.x, xr, fmaf(qy.x, yr, s[0]));
            s[1] = fmaf(qx.y, xr, fmaf(qy.y, yr, s[1]));
            s[2] = fmaf(qx.z, xr, fmaf(qy.z, yr, s[2]));
            s[3] = fmaf(qx.w, xr, fmaf(qy.w, yr, s[3]));
          }
        }
      }
      // per head: the token's lanes sum their parts; the batch's maximum; p (the token's first
      // lane writes it); the accumulators rescaled; maximum and sum updated (lane 0)
#pragma unroll
      for (int hh = 0; hh < 4; ++hh) {
        for (int o = lpt >> 1; o > 0; o >>= 1) s[hh] += __shfl_xor_sync(0xffffffffu, s[hh], o);
        float mx = tok_ok ? s[hh] : -INFINITY;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float m_old = tc::lds32(msh + hh * 4), mn = fmaxf(m_old, mx);
        const float p = tok_ok && sub == 0 ? exp2f(s[hh] - mn) : 0.f;
        if (sub == 0 && tok_ok) tc::sts32(psh + (unsigned)((tl * 4 + hh) * 4), p);
        float ps = p;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
        const float alpha = exp2f(m_old - mn);  // m_old = kNoKey: 0
#pragma unroll
        for (int c = 0; c < CPL; ++c) av[hh][c] *= alpha;
        __syncwarp();  // every lane has read the old maximum
        if (lane == 0) {
          tc::sts32(msh + hh * 4, mn);
          tc::sts32(lsh + hh * 4, fmaf(tc::lds32(lsh + hh * 4), alpha, ps));
        }
      }
      __syncwarp();
      // p . v: the lane's channels lane * CPL .. + CPL - 1 of each token, four heads
#pragma unroll 2
      for (int j = 0; j < nb; ++j) {
        const uint16_t* sv = svl + (tb + j) * tstride;
        float v[CPL];
        if constexpr (CPL == 4) {
          const uint2 w = __ldg(reinterpret_cast<const uint2*>(sv));
          v[0] = __half2float(__ushort_as_half((unsigned short)w.x));
          v[1] = __half2float(__ushort_as_half((unsigned short)(w.x >> 16)));
          v[2] = __half2float(__ushort_as_half((unsigned short)w.y));
          v[3] = __half2float(__ushort_as_half((unsigned short)(w.y >> 16)));
        } else if constexpr (CPL == 2) {
          const unsigned w = __ldg(reinterpret_cast<const unsigned*>(sv));
          v[0] = __half2float(__ushort_as_half((unsigned short)w));
          v[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
        } else {
#pragma unroll
          for (int c = 0; c < CPL; ++c) v[c] = __half2float(__ushort_as_half(__ldg(sv + c)));
        }
        const float4 p4 = tc::lds128f(psh + (unsigned)(j * 16));
        const float p[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
        for (int hh = 0; hh < 4; ++hh)
#pragma unroll
          for (int c = 0; c < CPL; ++c) av[hh][c] = fmaf(p[hh], v[c], av[hh][c]);
      }
      __syncwarp();  // psh is written again by the next batch
    }
    // the partials of heads hg ..: exact values (no offsets), m in the natural log, l
#pragma unroll
    for (int hh = 0; hh < 4; ++hh) {
      if (hg + hh >= G) break;  // warp-uniform
      float* pr = pr0 + (hg + hh) * pr_head;
#pragma unroll
      for (int c = 0; c < CPL; ++c) pr[lane * CPL + c] = av[hh][c];
      if (lane == 0) {
        pr[D] = partial_max(tc::lds32(msh + hh * 4));
        pr[D + 1] = tc::lds32(lsh + hh * 4);
      }
    }
    __syncwarp();  // maxima and sums are reset for the next heads
  }
}

// TMA: each tile's key codes, value codes and metadata arrive as three 2-D tensor boxes (16 tokens of
// one kv head, unswizzled: the same [16][CB] / [16][MB] rows the cp.async copies write), issued by one
// lane and counted on one mbarrier per stage (launch: pages of whole tiles, MB % 16 == 0).
template <class T, int D, int BITS, bool TMA = false>
__global__ void __launch_bounds__(kWarps * 32, 2)
planes_kernel(Geo g, const T* __restrict__ q, const float* __restrict__ inv_freq, float scale, int hq_total, tc::Plan pl,
              float* __restrict__ part, int stage_bytes, int nsink, const __grid_constant__ CUtensorMap kmap,
              const __grid_constant__ CUtensorMap vmap, const __grid_constant__ CUtensorMap mmap) {
  using S = Shape<D, BITS>;
  constexpr int HALF = S::HALF, KS = S::KS, PPL = S::PPL, CB = S::CB, TW = S::TW, RS = S::RS, NSTG = S::NSTG;
  constexpr int NWK = S::NWK, RSC = S::RSC;
  SQZ_DYNAMIC_SMEM(smem_raw);
  // (TMA: boxes land at 128-byte aligned addresses; the launch adds the 128 bytes)
  uint8_t* const smem = smem_raw + (TMA ? ((128u - (smem_u32(smem_raw) & 127u)) & 127u) : 0u);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = lane >> 2, c4 = lane & 3;  // fragment row (token / head) and column pair
  // With sink tokens, blocks x < nsink (plan_with_sink) of each (row, head group) are the sink
  // splits: they take only the sink tokens, in parallel with the token splits after them (the sink
  // step below). (nsink is a parameter: computed in the kernel, ptxas spilled in the 2-bit tile
  // path.)
  const bool sink_split = (int)blockIdx.x < nsink;
  const int split = blockIdx.x - nsink, n = blockIdx.y;
  const int h = blockIdx.z * pl.hpb + warp;
  const bool active = warp < pl.hpb && h < g.H;
  const int G = hq_total / g.H;
  const int MB = g.mbytes, nk = g.nk, nv = g.nv, ns = nk + nv;
  // launched with PDL (pdl.cuh): wait for the previous grid (its q, cache rows, or the previous
  // call's combine still reading the partials). No early trigger: the combine's blocks, launched
  // early, took the registers a second block of this grid needed (32q/8kv: 8K 29.6 -> 36.4 us,
  // 32K 56.1 -> 62.4 us at 2 bits); it launches as this grid exits.
  pdl_wait();

  // shared memory: the block's cos/sin table, then per warp: code stages, value tile, offset-plane
  // query fragments, value scales
  const unsigned base = smem_u32(smem);
  const unsigned cs_s = base;
  const unsigned wb = (unsigned)(table_bytes<D, BITS>() + warp * warp_bytes<D, BITS>(stage_bytes));
  const unsigned stg = base + wb;
  const unsigned vt = stg + NSTG * stage_bytes;
  // the offset planes' query fragments [KS][2][32 lanes] (uint2): registers are short at D = 128
  const unsigned qcs = vt + kTok * RS * 2;
  const uint2* const qcsp = reinterpret_cast<const uint2*>(smem + (qcs - base));
  float2* const vsc = reinterpret_cast<float2*>(smem + (qcs - base) + KS * 2 * 32 * 8);  // [kTok] (scale, offset)
  const T* const qrow = q + ((long long)n * hq_total + (long long)h * G) * D;  // this kv head's G query rows
  // The lines of this lane's query values for the query planes (head r, its RoPE pairs) are
  // requested into L1 now, so that their latency passes under the row lookup, its barrier and the
  // first copies (a prefetch holds no register: loads this early spilled at head_dim 128).
  if (active && r < G) {
    prefetch_l1(qrow + r * D + PPL * c4);
    prefetch_l1(qrow + r * D + PPL * c4 + HALF);
  }

  __shared__ int bp[2];
  __shared__ __align__(16) unsigned books[2][2][TW];  // key, value books: low / high byte planes
  __shared__ float kbook[16];                         // key codebook (fp16 values) for the outlier deltas
  const bool row_mine = find_row(g, n, bp);
  if (tid < 2) {
    const Book<TW> bk = tc::make_book<TW>(tid == 0 ? g.key_cb : g.val_cb, 1 << BITS);
#pragma unroll
    for (int w = 0; w < TW; ++w) { books[tid][0][w] = bk.lo[w]; books[tid][1][w] = bk.hi[w]; }
  }
  if (tid < (1 << BITS)) kbook[tid] = kvq::book_entry(g.key_cb[tid]);
  const bool row_found = __syncthreads_or(row_mine);
  auto book = [&](int i) {
    Book<TW> bk;
#pragma unroll
    for (int w = 0; w < TW; ++w) { bk.lo[w] = books[i][0][w]; bk.hi[w] = books[i][1][w]; }
    return bk;
  };
  const int b = row_found ? bp[0] : -1, L = row_found ? bp[1] + 1 : 0;
  // chunks of the current length spread over the planned splits (see tc_kernel)
  const int sub_now = max(1, ((L + kSplit - 1) / kSplit + pl.splits - 1) / pl.splits);
  // the sink split has no tiles
  const int t_begin = sink_split ? 0 : split * sub_now * kSplit;
  const int t_end = sink_split ? 0 : min(L, t_begin + sub_now * kSplit);
  const int ntiles = t_end > t_begin ? (t_end - t_begin + kTok - 1) / kTok : 0;
  const float qs = scale * kLog2e;  // scores in the log2 domain

  // ---- cp.async of tile k (K rows, V rows, metadata rows) into stage k % NSTG; one group per tile.
  // Lane (token tl = lane & 15, half) copies half of its token's rows. The page of the token is
  // read one tile ahead (page_of), so the copy never waits for the page table.
  // (TMA: the page of the tile, whose 16 tokens lie in one page; masked tokens are read and ignored)
  auto page_of = [&](int k) -> int {
    if constexpr (TMA) {
      const int tt0 = t_begin + k * kTok;
      return k < ntiles ? __ldg(g.pt + (long long)b * g.max_pages + page_col(g, tt0)) : 0;
    }
    const int tt = t_begin + k * kTok + (lane & 15);
    return k < ntiles && tt < t_end && tt >= g.sink ? __ldg(g.pt + (long long)b * g.max_pages + page_col(g, tt)) : 0;
  };
  [[maybe_unused]] __shared__ __align__(8) uint64_t s_full[TMA ? kWarps * NSTG : 1];  // TMA: per warp and stage
  const unsigned full0 = TMA ? smem_u32(&s_full[warp * NSTG]) : 0u;
  if constexpr (TMA) {
    if (active && lane == 0)
      for (int st = 0; st < NSTG; ++st) mbar_init(full0 + 8 * st, 1);
    mbar_fence_init();
    __syncwarp();
  }
  auto issue = [&](int k, int page) {
    if constexpr (TMA) {
      // one lane; the warp last read this stage before the __syncwarp that ended its tile
      if (k < ntiles && lane == 0) {
        const unsigned dst = stg + (k % NSTG) * stage_bytes, bar = full0 + 8 * (k % NSTG);
        const int tt0 = t_begin + k * kTok, row = page * g.page_size + (tt0 - page_col(g, tt0) * g.page_size);
        fence_proxy_async_shared();
        mbar_arrive_expect_tx(bar, 32 * CB + 16 * MB);
        tma_load_2d(dst, &kmap, h * CB, row, bar);
        tma_load_2d(dst + 16 * CB, &vmap, h * CB, row, bar);
        tma_load_2d(dst + 32 * CB, &mmap, h * MB, row, bar);
      }
      return;
    }
    if (k < ntiles) {
      const unsigned dst = stg + (k % NSTG) * stage_bytes;
      const int tl = lane & 15, half = lane >> 4, tt = t_begin + k * kTok + tl;
      const bool ok = tt < t_end && tt >= g.sink;
      const long long sl = ok ? slot_in_page(g, page, tt, h) : 0;
      const uint8_t* kr = g.kc + sl * CB;
      const uint8_t* vr = g.vc + sl * CB;
      const uint8_t* mr = g.meta + sl * MB;
#pragma unroll
      for (int c = half; c < CB / 16; c += 2) {
        cp_async16(dst + tl * CB + 16 * c, kr + 16 * c, ok);
        cp_async16(dst + 16 * CB + tl * CB + 16 * c, vr + 16 * c, ok);
      }
      for (int c = half; c < MB / 4; c += 2) cp_async4(dst + 32 * CB + tl * MB + 4 * c, mr + 4 * c, ok);
    }
    cp_async_commit();
  };
  int page_next = 0;  // page of each lane's token in tile k + NSTG - 1
  if (active) {
#pragma unroll
    for (int k = 0; k < NSTG - 1; ++k) issue(k, page_of(k));
    page_next = page_of(NSTG - 1);
  }

  // ---- per split: the query planes (B fragments, head = r); the offset planes go to shared memory
  unsigned qb[4][KS][2];
  if (active && !sink_split) {
    const float* lo = g.key_lo + (long long)h * D;
    const float* hi = g.key_hi + (long long)h * D;
    const bool hv = r < G && b >= 0;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int hf2 = 0; hf2 < 2; ++hf2) {
        float cf[2][6];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int p = PPL * c4 + 4 * ks + 2 * hf2 + j;
          const float qx = hv ? qs * to_f(qrow[r * D + p]) : 0.f, qy = hv ? qs * to_f(qrow[r * D + p + HALF]) : 0.f;
          const float lx = lo[p], ly = lo[p + HALF];
          const float ax = 0.5f * (hi[p] - lx), ay = 0.5f * (hi[p + HALF] - ly), bx = lx + ax, by = ly + ay;
          cf[j][0] = qx * ax;
          cf[j][1] = qy * ay;
          cf[j][2] = qy * ax;
          cf[j][3] = -qx * ay;
          cf[j][4] = fmaf(qx, bx, qy * by);
          cf[j][5] = fmaf(qy, bx, -qx * by);
        }
#pragma unroll
        for (int pl_ = 0; pl_ < 4; ++pl_) qb[pl_][ks][hf2] = h2u(__floats2half2_rn(cf[0][pl_], cf[1][pl_]));
#pragma unroll
        for (int pl_ = 4; pl_ < 6; ++pl_)
          tc::sts32(qcs + (unsigned)((((ks * 2 + pl_ - 4) * 32 + lane) * 2 + hf2) * 4),
                    __uint_as_float(h2u(__floats2half2_rn(cf[0][pl_], cf[1][pl_]))));
      }
    __syncwarp();
  }

  float acc[S::MT][4];
#pragma unroll
  for (int mt = 0; mt < S::MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;
  float m_run[2] = {kNoKey, kNoKey}, l_run[2] = {0.f, 0.f}, pa_run[2] = {0.f, 0.f};  // heads 2 c4 + e (kNoKey: above)

  // ---- sink tokens, in splits of their own (x < nsink): exact scores from the fp16 side
  // store (keys rotated in fp32) and exact values, folded into an online softmax a batch of up to
  // 32 tokens at a time (batch x of the sink in split x, and x + nsink, ...); the token
  // splits mask them. Scores: the batch's tokens spread over the lanes, LPT lanes
  // per token (32 / the batch's token count rounded up to a power of two); each lane rotates its
  // share of the token's RoPE pairs (16-byte chunks of 8 pairs, the next chunk's loads in flight)
  // and dots them with four query heads (pre-scaled, one shared-memory broadcast); the token's
  // lanes sum their parts. Then one maximum and one rescale per batch, and the p.v pass with the
  // lanes over the channels (D / 32 each): each token's value row is one coalesced load of the
  // warp, its p one broadcast. The sink split has its own accumulators and writes its partial in
  // sink_partial; it then runs on through the (empty) tile loop to the common exit: returning
  // here instead made ptxas spill in the 2-bit tile path (as did the one-token-at-a-time step with
  // its loads a token ahead), which cost 7-11% there. (The whole warp took one token at a time
  // before, two RoPE pairs per lane, each token's sin/cos, shuffles and softmax step one after
  // another: 0.9-1.6 us per token on the H200; with 64 sink tokens a 20 us call took 113 us,
  // 2-bit, 32q/8kv x128, 8K.)
  if (sink_split && active) {
    const int srow = b >= 0 ? sink_row(g, b) : 0;
    const long long pr_head = (long long)gridDim.x * (D + 2);
    sink_partial<T, D, BITS>(g.sink_k + sink_at(g, srow, 0, h), g.sink_v + sink_at(g, srow, 0, h), (long long)g.H * D,
                             b >= 0 ? min(g.sink, L) : 0, 32 * (int)blockIdx.x, 32 * nsink, qrow, inv_freq, qs, G,
                             part + ((long long)n * hq_total + (long long)h * G) * pr_head + (long long)blockIdx.x * (D + 2), pr_head,
                             vt, qcs, stg);
  }

  for (int t0c = t_begin; t0c < t_end; t0c += kChunk) {
    const int cnt_c = min(kChunk, t_end - t0c);
    // cos/sin of the chunk: row tt, chunk (ks * 4 + lane c4) holds (c0..c3, s0..s3) of pairs 4 grp .. 4 grp + 3
    __syncthreads();
    for (int e = tid; e < cnt_c * S::GROUPS; e += blockDim.x) {
      const int tt = e / S::GROUPS, grp = e % S::GROUPS;
      float cv[4], sv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) tc::sincos_reduced(__fmul_rn((float)(t0c + tt), inv_freq[4 * grp + j]), &sv[j], &cv[j]);
      sts128(cs_s + (unsigned)((tt * RSC + (grp % KS) * 4 + grp / KS) * 16), h2u(__floats2half2_rn(cv[0], cv[1])),
             h2u(__floats2half2_rn(cv[2], cv[3])), h2u(__floats2half2_rn(sv[0], sv[1])), h2u(__floats2half2_rn(sv[2], sv[3])));
    }
    __syncthreads();
    if (!active) continue;
    for (int tt0 = 0; tt0 < cnt_c; tt0 += kTok) {
      const int k = (t0c - t_begin + tt0) / kTok, t0 = t0c + tt0;
      issue(k + NSTG - 1, page_next);
      page_next = page_of(k + NSTG);
      if constexpr (TMA) mbar_wait(full0 + 8 * (k % NSTG), (k / NSTG) & 1);
      else cp_async_wait<NSTG - 1>();
      __syncwarp();
      const unsigned sbs = stg + (k % NSTG) * stage_bytes;
      const uint8_t* sbp = smem + (sbs - base);  // K rows [16][CB], V rows [16][CB], meta [16][MB]
      const uint8_t* metap = sbp + 32 * CB;

      // ---- scores over the six planes
      float sc[4];
      {
        const Book<TW> kbk = book(0);
        // The lane's key code words of the two tokens. At head_dim 128 each word is loaded right
        // before the first k-step that reads it, not all before the first: that holds 4-6 fewer
        // registers through the products, which took the 3- and 4-bit kernels' spills (20 / 32 and
        // 36 / 48 bytes) down to none and 4 / 16 (a row index reloaded once per tile). Same process,
        // H200, 2 + 2 outlier slots, 4 sink tokens, all at once / word by word, us: 32q/8kv x128 at
        // 32K 4-bit 59.7 / 56.4, 3-bit 53.3 / 50.6, 2-bit 44.6 / 44.0; 32x128 at 32K 191.6 / 178.8,
        // 171.3 / 161.2, 137.3 / 135.0; batch 8 at 4K 4-bit 59.3 / 56.2. At head_dim 64 and 96 (no
        // spills) it measured 0.5% slower at 4 bits and is not taken there.
        unsigned kw0[NWK] = {}, kw1[NWK] = {};  // (zeros: the 3-bit funnel shift's unused word)
        constexpr bool kLazy = D == 128;
        static_assert(!kLazy || S::KBITS % 32 == 0, "a lane's code run starts at a word");
        const unsigned kr0 = sbs + (unsigned)(r * CB + c4 * (S::KBITS / 8)), kr1 = kr0 + 8 * CB;
        if constexpr (!kLazy) {
          stream_words<NWK, S::KBITS % 32 == 0>(sbp + r * CB, c4 * S::KBITS, kw0);
          stream_words<NWK, S::KBITS % 32 == 0>(sbp + (r + 8) * CB, c4 * S::KBITS, kw1);
        }
        float sa[4] = {0.f, 0.f, 0.f, 0.f}, sb[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          unsigned X0[2], Y0[2], X1[2], Y1[2];
          if constexpr (kLazy) {
            // the last word k-step ks reads, unless an earlier k-step read it already
            constexpr int kBits = 8 * BITS;  // code bits per lane and k-step
            const int wl = (kBits * ks + kBits - 1) >> 5, wp = ks > 0 ? (kBits * ks - 1) >> 5 : -1;
            if (wl > wp) {
              kw0[wl] = ld_shared_u32(kr0 + 4 * wl);
              kw1[wl] = ld_shared_u32(kr1 + 4 * wl);
            }
          }
          key_step<BITS>(kw0, ks, kbk, X0, Y0);
          key_step<BITS>(kw1, ks, kbk, X1, Y1);
          const uint4 cs0 = lds128(cs_s + (unsigned)(((tt0 + r) * RSC + ks * 4 + c4) * 16));
          const uint4 cs1 = lds128(cs_s + (unsigned)(((tt0 + r + 8) * RSC + ks * 4 + c4) * 16));
          // A rows: token r (a0, a2) and r + 8 (a1, a3); a0/a1 pairs 0-1, a2/a3 pairs 2-3 of the step
          mma_16816<__half>(sa, hmul2(X0[0], cs0.x), hmul2(X1[0], cs1.x), hmul2(X0[1], cs0.y), hmul2(X1[1], cs1.y),
                            qb[0][ks][0], qb[0][ks][1]);
          mma_16816<__half>(sb, hmul2(Y0[0], cs0.x), hmul2(Y1[0], cs1.x), hmul2(Y0[1], cs0.y), hmul2(Y1[1], cs1.y),
                            qb[1][ks][0], qb[1][ks][1]);
          mma_16816<__half>(sa, hmul2(X0[0], cs0.z), hmul2(X1[0], cs1.z), hmul2(X0[1], cs0.w), hmul2(X1[1], cs1.w),
                            qb[2][ks][0], qb[2][ks][1]);
          mma_16816<__half>(sb, hmul2(Y0[0], cs0.z), hmul2(Y1[0], cs1.z), hmul2(Y0[1], cs0.w), hmul2(Y1[1], cs1.w),
                            qb[3][ks][0], qb[3][ks][1]);
          const uint2 qc = qcsp[(ks * 2) * 32 + lane], qsn = qcsp[(ks * 2 + 1) * 32 + lane];
          mma_16816<__half>(sa, cs0.x, cs1.x, cs0.y, cs1.y, qc.x, qc.y);
          mma_16816<__half>(sb, cs0.z, cs1.z, cs0.w, cs1.w, qsn.x, qsn.y);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[e] = sa[e] + sb[e];  // (token r | r + 8) x (head 2 c4 | 2 c4 + 1)
      }
      // ---- key outliers: exact - (a cb + b), rotated, into the scores of the token's heads.
      // Lane 2 t + u takes slots u, u + 2, ... of token t: it rotates each slot's difference and
      // multiplies it with the G query heads itself, summing one correction per head in shared
      // memory (the value tile, free until this tile's values are staged: [token][head][u] fp32,
      // rows of kCorrRow floats); the lanes holding the token's scores then read theirs with two
      // 16-byte loads. (The rotated differences shuffled to the score lanes, each reading q for its
      // two heads, took 12 shuffles and 16 query loads per lane and tile.)
      if (nk > 0) {
        const int tl = lane >> 1, u = lane & 1, tt = t0 + tl;
        const unsigned cp = vt + (unsigned)((tl * kCorrRow + u) * 4);  // + 8 per head
        const bool tok_ok = tt < t_end && tt >= g.sink;
        const uint8_t* me = metap + tl * MB;
        // slot so of the token: exact - (a cb + b), rotated into (dx, dy) at RoPE pair pi
        auto rotated = [&](int so, float& dx, float& dy, int& pi) {
          const int ch = min((int)me[4 + 2 * ns + so], D - 1);
          const float ex = half_bits(me + 4 + 2 * so);
          const int code = kvq::get_code(sbp + tl * CB, kvq::key_element(ch, D), BITS);
          const float lx = __ldg(g.key_lo + (long long)h * D + ch), a_ = 0.5f * (__ldg(g.key_hi + (long long)h * D + ch) - lx);
          const float delta = ex - fmaf(a_, kbook[code], lx + a_);
          const bool xh = ch < HALF;
          pi = xh ? ch : ch - HALF;
          // cos, sin of the pair from the chunk's table (fp16: the correction's own rounding)
          const uint8_t* cs = smem + (cs_s - base) + ((tt0 + tl) * RSC + ((pi >> 2) % KS) * 4 + (pi >> 2) / KS) * 16 + (pi & 3) * 2;
          const float cn = half_bits(cs), sn = half_bits(cs + 8);
          dx = xh ? cn * delta : -sn * delta;
          dy = xh ? sn * delta : cn * delta;
        };
        // the lane's first slot (u) is written straight, zeros where there is none
        float dx = 0.f, dy = 0.f;
        int pi = 0;
        if (tok_ok && u < nk) rotated(u, dx, dy, pi);
        for (int hh = 0; hh < G; ++hh)
          tc::sts32(cp + 8 * hh, fmaf(to_f(qrow[hh * D + pi]), dx, to_f(qrow[hh * D + pi + HALF]) * dy));
        // more than two slots per token: the rest are summed in place
        if (tok_ok)
          for (int so = u + 2; so < nk; so += 2) {
            rotated(so, dx, dy, pi);
            for (int hh = 0; hh < G; ++hh)
              tc::sts32(cp + 8 * hh, fmaf(to_f(qrow[hh * D + pi]), dx, fmaf(to_f(qrow[hh * D + pi + HALF]), dy, tc::lds32(cp + 8 * hh))));
          }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float4 c = tc::lds128f(vt + (unsigned)(((r + 8 * j) * kCorrRow + 4 * c4) * 4));  // heads 2 c4, 2 c4 + 1
          if (2 * c4 < G) sc[2 * j] += qs * (c.x + c.y);
          if (2 * c4 + 1 < G) sc[2 * j + 1] += qs * (c.z + c.w);
        }
        __syncwarp();  // the value tile is written again below
      }
      // ---- tokens past the end, and sink tokens (taken before the tiles)
      if (t0 + r >= t_end || t0 + r < g.sink) sc[0] = sc[1] = -INFINITY;
      if (t0 + r + 8 >= t_end || t0 + r + 8 < g.sink) sc[2] = sc[3] = -INFINITY;
      // ---- value scale and offset per token (an outlier may widen the scale, see tc_kernel);
      // masked tokens (past the end, sink) keep 0, 0: their p is 0
      {
        const int tl = lane & 15, tt = t0 + tl;
        float sv = 0.f, av = 0.f;
        if (tt < t_end && tt >= g.sink) {
          const uint8_t* me = metap + tl * MB;
          const float vlo = half_bits(me), vhi = half_bits(me + 2);
          sv = 0.5f * (vhi - vlo);
          av = vlo + sv;
          for (int s_ = lane >> 4; s_ < nv; s_ += 2) sv = fmaxf(sv, fabsf(half_bits(me + 4 + 2 * (nk + s_)) - av) * (1.f / 16384.f));
          if (nv > 0) sv = fmaxf(sv, 1e-30f);
        }
        sv = fmaxf(sv, __shfl_xor_sync(0xffffffffu, sv, 16));  // the two halves of the token's slots
        if (lane < kTok) vsc[lane] = make_float2(sv, av);
      }
      __syncwarp();
      // ---- online softmax per head (log2 domain); P^T carries p * the token's value scale
      unsigned b0, b1;
      {
        const float2 v0 = vsc[r], v1 = vsc[r + 8];
        float alpha[2], pv[4];
        bool grew = false;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float mx = fmaxf(sc[e], sc[2 + e]);
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
          alpha[e] = online_max(m_run[e], mx, grew);
          const float mn = m_run[e];
          const float p0 = exp2f(sc[e] - mn), p1 = exp2f(sc[2 + e] - mn);
          l_run[e] = fmaf(l_run[e], alpha[e], p0 + p1);
          pa_run[e] = fmaf(pa_run[e], alpha[e], fmaf(p0, v0.y, p1 * v1.y));
          pv[e] = p0 * v0.x;
          pv[2 + e] = p1 * v1.x;
        }
        b0 = movtrans(h2u(__floats2half2_rn(pv[0], pv[1])));  // (tokens 2 c4, 2 c4 + 1) x head r
        b1 = movtrans(h2u(__floats2half2_rn(pv[2], pv[3])));  // (tokens 8 + 2 c4, 9 + 2 c4) x head r
        if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
          for (int mt = 0; mt < S::MT; ++mt) {
            acc[mt][0] *= alpha[0];
            acc[mt][1] *= alpha[1];
            acc[mt][2] *= alpha[0];
            acc[mt][3] *= alpha[1];
          }
        }
      }
      // ---- value tile: codebook values per token row (tc's staging order)
      {
        const Book<TW> vbk = book(1);
        const int tl = lane & 15;
        const uint8_t* vrow = sbp + 16 * CB + tl * CB;
        static_assert(S::NB % 2 == 0, "two lanes per token row");
#pragma unroll
        for (int jj = 0; jj < S::NB / 2; ++jj) {
          const int j = 2 * jj + (lane >> 4);
          unsigned w[2], v[8];
          stream_words<2, BITS != 3>(vrow, 16 * BITS * j, w);
          tc::value_block<BITS, TW>(w, 0, vbk, v);
          sts128(vt + swz<RS>(tl, 2 * j), v[0], v[1], v[2], v[3]);
          sts128(vt + swz<RS>(tl, 2 * j + 1), v[4], v[5], v[6], v[7]);
        }
      }
      __syncwarp();
      for (int s0 = 0; s0 < nv; s0 += 2) {  // value outliers: (exact - offset) / scale
        const int tl = lane >> 1, so = s0 + (lane & 1), tt = t0 + tl;
        if (so < nv && tt < t_end && tt >= g.sink) {
          const uint8_t* me = metap + tl * MB;
          const int col = tc::value_column<BITS>(min((int)me[4 + 2 * ns + nk + so], D - 1));
          const float2 sa = vsc[tl];
          // fast division (2 ulp): the quotient is rounded to fp16 next
          const float x = __fdividef(half_bits(me + 4 + 2 * (nk + so)) - sa.y, sa.x);
          tc::sts16(vt + swz<RS>(tl, col >> 3) + (col & 7) * 2, __half_as_ushort(__float2half_rn(x)));
        }
      }
      __syncwarp();
      // ---- out^T[channels x heads] += V^T P^T
      {
        const int m = lane >> 3, row = (m >> 1) * 8 + (lane & 7);
#pragma unroll
        for (int mt = 0; mt < S::MT; ++mt) {
          unsigned a[4];
          ldmatrix_x4_trans(vt + swz<RS>(row, 2 * mt + (m & 1)), a[0], a[1], a[2], a[3]);
          mma_16816<__half>(acc[mt], a[0], a[1], a[2], a[3], b0, b1);
        }
      }
      __syncwarp();
    }
  }
  if constexpr (!TMA) cp_async_wait<0>();  // (TMA: every issued stage was waited for in the loop)
  if (!active || sink_split) return;  // the sink split wrote its partial above
  // ---- partials: acc (unnormalised) + value offsets, m (natural log), l; per head 2 c4 + e
#pragma unroll
  for (int e = 0; e < 2; ++e)
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      l_run[e] += __shfl_xor_sync(0xffffffffu, l_run[e], o);
      pa_run[e] += __shfl_xor_sync(0xffffffffu, pa_run[e], o);
    }
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int head = 2 * c4 + e;
    if (head >= G) continue;
    // partial x of gridDim.x (the sink splits first, then the token splits)
    float* pr = part + (((long long)n * hq_total + (long long)h * G + head) * gridDim.x + blockIdx.x) * (D + 2);
#pragma unroll
    for (int mt = 0; mt < S::MT; ++mt) {
      pr[tc::value_channel<BITS>(16 * mt + r)] = acc[mt][e] + pa_run[e];
      pr[tc::value_channel<BITS>(16 * mt + r + 8)] = acc[mt][2 + e] + pa_run[e];
    }
    if (r == 0) {
      pr[D] = partial_max(m_run[e]);
      pr[D + 1] = l_run[e];
    }
  }
}

// The tensor maps of the key codes, value codes and metadata as [pages * page_size, H * bytes] byte
// matrices (boxes of one kv head's row of 16 tokens), where the TMA kernel can take the call: pages of
// whole tiles, metadata rows a multiple of 16 bytes (2 + 2 outlier slots), Hopper kernels built, the
// driver's encoder present. SQUEEZELM_KVQ_TMA=0 keeps the cp.async copies (A/B runs).
inline bool tma_maps(const Geo& g, int CB, CUtensorMap& km, CUtensorMap& vm, CUtensorMap& mm) {
  if (g.page_size % kTok != 0 || g.mbytes % 16 != 0 || !hopper_kernels_available()) return false;
  if (env_int("SQUEEZELM_KVQ_TMA", 1) == 0) return false;
  const long long rows = (long long)g.pages * g.page_size;
  if (rows <= 0 || rows > INT32_MAX) return false;
  const long long krow = (long long)g.H * CB, mrow = (long long)g.H * g.mbytes;
  return encode_2d_map(&km, CU_TENSOR_MAP_DATA_TYPE_UINT8, g.kc, rows, krow, krow, CB, kTok, false) &&
         encode_2d_map(&vm, CU_TENSOR_MAP_DATA_TYPE_UINT8, g.vc, rows, krow, krow, CB, kTok, false) &&
         encode_2d_map(&mm, CU_TENSOR_MAP_DATA_TYPE_UINT8, g.meta, rows, mrow, mrow, g.mbytes, kTok, false);
}

// The kernel with TMA boxes or with cp.async copies (TMA: 128 more bytes of shared memory, for the
// boxes' alignment; the maps are unused without TMA).
template <class T, int D, int BITS, bool TMA>
void launch_copies(const Tensor& q, const Geo& g, const Tensor& inv_freq, float scale, const tc::Plan& pl, int nsink,
                   float* part, int stage, size_t smem, const CUtensorMap& km, const CUtensorMap& vm,
                   const CUtensorMap& mm, cudaStream_t stream) {
  const int N = (int)q.dim(0), Hq = (int)q.dim(1);
  const size_t bytes = smem + (TMA ? 128 : 0);
  allow_dynamic_smem<planes_kernel<T, D, BITS, TMA>>(bytes, "kvqAttention");
  launch_pdl(planes_kernel<T, D, BITS, TMA>, dim3(pl.splits + nsink, N, pl.groups), dim3(pl.hpb * 32), bytes, stream,
             g, static_cast<const T*>(q.data()), inv_freq.ptr<float>(), scale, Hq, pl, part, stage, nsink, km, vm, mm);
}

template <class T, int D, int BITS>
void launch(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& inv_freq, float scale, const tc::Plan& pl,
            int nsink, float* part, cudaStream_t stream) {
  const int N = (int)q.dim(0), Hq = (int)q.dim(1);
  const int stage = stage_bytes_for(Shape<D, BITS>::CB, g.mbytes);
  const size_t smem = table_bytes<D, BITS>() + (size_t)pl.hpb * warp_bytes<D, BITS>(stage);
  CUtensorMap km{}, vm{}, mm{};
  if (tma_maps(g, Shape<D, BITS>::CB, km, vm, mm))
    launch_copies<T, D, BITS, true>(q, g, inv_freq, scale, pl, nsink, part, stage, smem, km, vm, mm, stream);
  else
    launch_copies<T, D, BITS, false>(q, g, inv_freq, scale, pl, nsink, part, stage, smem, km, vm, mm, stream);
  fast::launch_combine<T>(part, pl.splits + nsink, N * Hq, D, static_cast<T*>(out.data()), stream);
}
template <class T, int D>
void launch_bits(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, const tc::Plan& pl,
                 int nsink, float* part, cudaStream_t s) {
  if (g.bits == 2) launch<T, D, 2>(out, q, g, f, scale, pl, nsink, part, s);
  else if (g.bits == 3) launch<T, D, 3>(out, q, g, f, scale, pl, nsink, part, s);
  else launch<T, D, 4>(out, q, g, f, scale, pl, nsink, part, s);
}
// tc's plan at 32-token granularity (8 warps per block, two blocks per SM), with the sink splits'
// blocks in the resident wave. One sink split per 32-token batch of the sink (up to kSinkSplits)
// where the wave holds them beside the token splits; otherwise one. (Blocks the wave does not hold
// push token splits into a second round: H200, 2-bit, 64 sink tokens, two sink splits against
// one: batch 8 x 32q/8kv at 4K 58.7 against 45.0 us; where they fit, 32q/8kv at 8K 23.1 against
// 33.9.) One sink split: where the token splits leave room for it, or make room without a split
// taking more chunks, the token splits are planned around it; otherwise (long contexts, where one
// more chunk per split costs more than a late start) the wave holds the sink blocks, which end
// first, and as many token-split blocks start in the slots they free. H200, 7B shapes (32 kv
// heads), 2-bit, one sink token, 1M tokens: planned around the sink blocks, the splits took 481
// chunks instead of 474 and the step 124.6 ms, against 123.1 ms this way.
struct SinkPlan {
  tc::Plan pl;
  int nsink;  // sink splits
};
inline SinkPlan plan_with_sink(int sms, int N, const Geo& g, int G, int L) {
  const tc::Plan plain = tc::plan(sms, N, g.H, G, g.D, L, kSplit);
  if (g.sink == 0) return {plain, 0};
  const long long wave = tc::wave_warps(sms, g.D, G);
  const long long per_split = (long long)N * plain.groups * plain.hpb;
  for (int k = std::min(kSinkSplits, sink_batches(g)); k >= 1; --k)
    if ((plain.splits + k) * per_split <= wave) return {plain, k};
  const tc::Plan room = tc::plan(sms, N, g.H, G, g.D, L, kSplit, 1);
  return {room.sub == plain.sub ? room : plain, 1};
}
// Covered: head_dim 64, 96, 128 (the RoPE half a multiple of 16) and up to 8 query heads per kv head.
inline bool covers(int D, int G) { return G >= 1 && G <= 8 && (D == 64 || D == 96 || D == 128); }
template <class T>
bool dispatch(const Tensor& out, const Tensor& q, const Geo& g, const Tensor& f, float scale, int L, float* work,
              int64_t work_floats, cudaStream_t s) {
  const int N = (int)q.dim(0), Hq = (int)q.dim(1), dev = q.device.index, G = Hq / g.H;
  if (!covers(g.D, G)) return false;
  if (N == 0) return true;
  const SinkPlan sp = plan_with_sink(sm_count(dev), N, g, G, L);
  const tc::Plan& pl = sp.pl;
  const int64_t need = (int64_t)N * Hq * (pl.splits + sp.nsink) * (g.D + 2);
  if (work && need > work_floats) fail("ERR_ARG", "kvqAttention: the workspace holds " + std::to_string(work_floats) +
                                                      " floats, this call needs " + std::to_string(need));
  float* part = work ? work : partials(dev, (size_t)need * sizeof(float), s);
  switch (g.D) {
    case 64: launch_bits<T, 64>(out, q, g, f, scale, pl, sp.nsink, part, s); return true;
    case 96: launch_bits<T, 96>(out, q, g, f, scale, pl, sp.nsink, part, s); return true;
    case 128: launch_bits<T, 128>(out, q, g, f, scale, pl, sp.nsink, part, s); return true;
    default: return false;
  }
}
int64_t workspace_floats(int sms, int64_t N, int64_t Hq, int64_t H, int64_t D, int max_seq_len) {
  // + the sink splits (plan_with_sink() never gives more token splits than tc's plan)
  return covers((int)D, (int)(Hq / H)) ? tc::workspace_floats(sms, N, Hq, H, D, max_seq_len, kSplit) + kSinkSplits * N * Hq * (D + 2) : 0;
}
}  // namespace planes
