// Tensor-core flash attention for prefill (and chunked prefill over an already filled
// cache).
//
// A block owns 64 query rows of one query head of one sequence (4 warps x 16 rows). K/V
// tiles of BN tokens are gathered through the page table into shared memory with cp.async
// (double-buffered: the next tile loads while this one is multiplied), S = Q K^T and
// O += P V run on mma.sync m16n8k16 with ldmatrix operands, and the softmax is online in
// fp32 (base 2). Causal: a tile only visits keys up to the position of its last row, and
// tiles are issued longest first so the diagonal's short blocks fill the tail.

#include "kernels/common/dynamic_smem.cuh"
#include "kernels/common/launch_config.h"
#include "kernels/common/pdl.cuh"
#include "common.cuh"
#include "core/cuda_stream.h"
#include "core/error.h"
#include "launch.h"

namespace sqz::cuda::attn {

namespace {

constexpr int BM = 64;
constexpr int kThreads = 128;

template <class T, int D, int BN>
struct Smem {
  static constexpr int SD = D + 8;  // row pitch: +16 bytes makes ldmatrix rows conflict-free
  static constexpr size_t bytes = (size_t)(BM * SD + 4 * BN * SD) * sizeof(T) + 2 * BN * sizeof(int);
};

template <class T, int D, int BN>
__global__ void __launch_bounds__(kThreads) prefill_kernel(Params p) {
  static_assert(D % 16 == 0 && BN % 16 == 0, "tile shapes");
  constexpr int SD = Smem<T, D, BN>::SD, CH = D / 8, NB = BN / 8, ND = D / 8;
  SQZ_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * SD;  // [2][BN][SD]
  T* sV = sK + 2 * BN * SD;
  int* sOk = reinterpret_cast<int*>(sV + 2 * BN * SD);  // [2][BN]: key readable

  const int h = blockIdx.y, b = blockIdx.z;
  const int g = p.Hq / p.Hkv, kvh = h / g;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int q0 = __ldg(p.cu_q + b);
  const int n = max(0, __ldg(p.cu_q + b + 1) - q0);
  const int len = max(__ldg(p.seq_lens + b), 0);
  const int kend = (int)min((int64_t)len, (int64_t)p.max_pages * p.page_size);
  const int ntiles = (n + BM - 1) / BM;
  const T* qg = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  T* og = static_cast<T*>(p.out);

  for (int it = blockIdx.x; it < ntiles; it += gridDim.x) {
    const int i0 = (ntiles - 1 - it) * BM;
    const int pos0 = len - n + i0;  // position of the tile's first row
    const int klim = min(kend, len - n + min(i0 + BM, n));  // keys any row may see (exclusive)
    const int nkt = klim > 0 ? (klim + BN - 1) / BN : 0;

    for (int idx = tid; idx < BM * CH; idx += kThreads) {
      const int r = idx / CH, c = idx % CH;
      const bool ok = i0 + r < n;
      const T* src = ok ? qg + ((int64_t)(q0 + i0 + r) * p.Hq + h) * D + c * 8 : qg;
      cp_async16(sQ + r * SD + c * 8, src, ok);
    }
    auto load_kv = [&](int kt, int st) {
      for (int idx = tid; idx < BN * CH; idx += kThreads) {
        const int r = idx / CH, c = idx % CH;
        const int t = kt * BN + r;
        const int page = t < klim ? page_of(p, b, t) : -1;
        const bool ok = page >= 0;
        const int64_t off = ok ? cache_offset(p, page, t, kvh) + c * 8 : 0;
        // Unreadable keys become zeros (a zero V row keeps 0 * garbage from making NaN)
        // and are masked out of the softmax below.
        cp_async16(sK + (st * BN + r) * SD + c * 8, kc + off, ok);
        cp_async16(sV + (st * BN + r) * SD + c * 8, vc + off, ok);
        if (c == 0) sOk[st * BN + r] = ok;
      }
    };
    if (nkt > 0) load_kv(0, 0);
    cp_async_commit();

    float o[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int row_a = warp * 16 + (lane >> 2);  // this thread's rows: row_a and row_a + 8

    for (int kt = 0; kt < nkt; ++kt) {
      const int st = kt & 1;
      if (kt + 1 < nkt) load_kv(kt + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();

      float s[NB][4];
#pragma unroll
      for (int i = 0; i < NB; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, sQ + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + ks * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
          uint32_t bb[4];
          ldmatrix_x4(bb, sK + (st * BN + nb2 * 16 + (lane & 7) + (lane >> 4) * 8) * SD + ks * 16 +
                              ((lane >> 3) & 1) * 8);
          Mma<T>::run(s[2 * nb2], a, bb[0], bb[1]);
          Mma<T>::run(s[2 * nb2 + 1], a, bb[2], bb[3]);
        }
      }

      // Mask (causal and unreadable keys), then the online softmax update per row.
      const int kbase = kt * BN;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rr = e >> 1;
          const int key = nb * 8 + (lane & 3) * 2 + (e & 1);
          float v = s[nb][e] * p.scale_log2;
          if (kbase + key > pos0 + row_a + rr * 8 || !sOk[st * BN + key]) v = -INFINITY;
          s[nb][e] = v;
        }
      online_softmax_tile(s, m, l, o);

#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                               pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int nd2 = 0; nd2 < D / 16; ++nd2) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb, sV + (st * BN + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + nd2 * 16 +
                                    (lane >> 4) * 8);
          Mma<T>::run(o[2 * nd2], a, bb[0], bb[1]);
          Mma<T>::run(o[2 * nd2 + 1], a, bb[2], bb[3]);
        }
      }
      __syncthreads();  // this stage is reloaded two tiles from now
    }
    cp_async_wait<0>();

#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 1);
      l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 2);
      const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;  // no visible key: zero row
      const int i = i0 + row_a + rr * 8;
      if (i < n) {
        T* dst = og + ((int64_t)(q0 + i) * p.Hq + h) * D + (lane & 3) * 2;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd)
          *reinterpret_cast<uint32_t*>(dst + nd * 8) = pack2<T>(o[nd][rr * 2] * inv, o[nd][rr * 2 + 1] * inv);
      }
    }
    __syncthreads();  // sQ is refilled by the next tile of this block
  }
}

template <class T, int D, int BN>
void launch(const Params& p, cudaStream_t stream) {
  constexpr size_t smem = Smem<T, D, BN>::bytes;
  allow_dynamic_smem<prefill_kernel<T, D, BN>>(smem, "attention (prefill)");
  const int tiles = (p.max_q + BM - 1) / BM;
  dim3 grid(tiles < 65535 ? tiles : 65535, p.Hq, p.B);
  launch_plain(prefill_kernel<T, D, BN>, grid, dim3(kThreads), smem, stream, p);
}

template <class T>
void launch_t(const Params& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: launch<T, 64, 64>(p, stream); break;
    case 80: launch<T, 80, 64>(p, stream); break;
    case 96: launch<T, 96, 64>(p, stream); break;
    case 128: launch<T, 128, 64>(p, stream); break;
    case 256: launch<T, 256, 32>(p, stream); break;
    default: fail("ERR_INTERNAL", "attention: no prefill kernel for head_dim " + std::to_string(p.D));
  }
}

}  // namespace

bool prefill_supported(int D) { return D == 64 || D == 80 || D == 96 || D == 128 || D == 256; }

void launch_prefill(const Params& p, DType dt, cudaStream_t stream) {
  if (dt == DType::F16) launch_t<__half>(p, stream);
  else launch_t<__nv_bfloat16>(p, stream);
}

}  // namespace sqz::cuda::attn
