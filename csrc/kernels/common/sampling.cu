// argmax and sample: one block per row. The CPU sorts candidates by (logit desc, index
// asc) and walks integer cumulative mass; here the same cut points are found without
// sorting, by a radix search on the 32-bit order key of each logit (4 bits a pass,
// integer weights: counts for top-k, 2^40-scaled probabilities for top-p and the draw),
// then a scan in index order among tokens tied on the final key. Integer sums are exact in
// any order, so the result is deterministic and equal to the CPU's.
#include <cstdint>

#include "kernels/common/pdl.cuh"
#include "common.h"
#include "core/cuda_stream.h"
#include "dtype_cuda.cuh"
#include "random.h"

namespace sqz::cuda {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float key_to_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// A prefix of the candidate order: every token with key > v, and those with key == v and
// index <= cut.
struct Cut {
  uint32_t v;
  int cut;
};
__device__ __forceinline__ bool in_cut(uint32_t k, int j, Cut c) { return k > c.v || (k == c.v && j <= c.cut); }

struct Smem {
  unsigned long long hist[16];
  unsigned long long total;
  uint32_t best_key[32];
  int best_idx[32];
  int wcount[32];
  int sel;
  int found;
  unsigned long long above;
};

__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Same expression as the CPU's: q = floor(exp((l - lmax) / T) * 2^40), 0 for NaN.
__device__ __forceinline__ unsigned long long mass_of(uint32_t k, float l, float lmax, float temp) {
  if (k == 0) return 0;
  const float e = expf((l - lmax) / temp);
  return (unsigned long long)((double)e * rnd::kMassScale);
}

// Argmax of a row by (key desc, index asc); every thread gets the result.
template <class T>
__device__ int row_argmax(const T* row, int V, Smem& sm) {
  uint32_t bk = 0;
  int bi = 0x7fffffff;
  auto take = [&](T v, int j) {
    const uint32_t k = rnd::order_key(to_f32(v));
    if (k > bk || (k == bk && j < bi)) bk = k, bi = j;
  };
  // 16-byte loads over the aligned middle of the row, several in flight per thread (a scalar
  // loop would wait one memory latency per element it reads); scalar head and tail.
  constexpr int PER = 16 / sizeof(T);
  const int mis = (int)((reinterpret_cast<uintptr_t>(row) & 15) / sizeof(T));
  const int head = min(V, mis ? PER - mis : 0);
  const int vecs = (V - head) / PER;
  if ((reinterpret_cast<uintptr_t>(row) & (sizeof(T) - 1)) == 0) {
    const uint4* vp = reinterpret_cast<const uint4*>(row + head);
#pragma unroll 4
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
      const uint4 u = vp[i];
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int t = 0; t < PER; ++t) take(e[t], head + i * PER + t);
    }
    for (int j = threadIdx.x; j < head; j += blockDim.x) take(row[j], j);
    for (int j = head + vecs * PER + threadIdx.x; j < V; j += blockDim.x) take(row[j], j);
  } else {
    for (int j = threadIdx.x; j < V; j += blockDim.x) take(row[j], j);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t ok = __shfl_xor_sync(0xffffffffu, bk, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ok > bk || (ok == bk && oi < bi)) bk = ok, bi = oi;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) sm.best_key[warp] = bk, sm.best_idx[warp] = bi;
  __syncthreads();
  bk = 0, bi = 0x7fffffff;
  for (int w = 0; w < nw; ++w) {
    const uint32_t k = sm.best_key[w];
    const int i = sm.best_idx[w];
    if (k > bk || (k == bk && i < bi)) bk = k, bi = i;
  }
  return bi < V ? bi : 0;
}

// Total weight of the tokens in P (MASS: q, else 1 each).
template <class T>
__device__ unsigned long long prefix_mass(const T* row, int V, Cut P, float lmax, float temp, Smem& sm) {
  unsigned long long acc = 0;
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    const float l = to_f32(row[j]);
    const uint32_t k = rnd::order_key(l);
    if (in_cut(k, j, P)) acc += mass_of(k, l, lmax, temp);
  }
  acc = warp_sum_u64(acc);
  __syncthreads();
  if (threadIdx.x == 0) sm.total = 0;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) atomicAdd(&sm.total, acc);  // integer: order does not matter
  __syncthreads();
  return sm.total;
}

// Index of the m-th token (1-based, in index order) with key == v inside P; -1 if none.
template <class T>
__device__ int select_tied(const T* row, int V, uint32_t v, Cut P, long long m, Smem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  long long seen = 0;  // block-uniform
  __syncthreads();
  if (threadIdx.x == 0) sm.found = -1;
  for (int base = 0; base < V; base += blockDim.x) {
    const int j = base + threadIdx.x;
    const bool f = j < V && rnd::order_key(to_f32(row[j])) == v && in_cut(v, j, P);
    const unsigned bal = __ballot_sync(0xffffffffu, f);
    if (lane == 0) sm.wcount[warp] = __popc(bal);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < nw; ++w) {
      const int c = sm.wcount[w];
      if (w < warp) before += c;
      total += c;
    }
    const long long rank = seen + before + __popc(bal & ((1u << lane) - 1u)) + 1;
    if (f && rank == m) sm.found = j;
    seen += total;
    __syncthreads();
    if (seen >= m) break;
  }
  return sm.found;
}

// The shortest prefix of P (in candidate order) whose weight reaches `target` (1 <= target
// <= weight of P). Returns that prefix; *cum = its exact weight.
template <class T, bool MASS>
__device__ Cut search(const T* row, int V, Cut P, unsigned long long target, float lmax, float temp, int fallback,
                      unsigned long long* cum, Smem& sm) {
  unsigned long long above = 0;  // weight of tokens in P with a key above the current range
  uint32_t prefix = 0;
  const int lane = threadIdx.x & 31;
  for (int shift = 28; shift >= 0; shift -= 4) {
    const uint32_t hi_mask = shift == 28 ? 0u : (0xffffffffu << (shift + 4));
    unsigned long long acc[16];
#pragma unroll
    for (int b = 0; b < 16; ++b) acc[b] = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const float l = to_f32(row[j]);
      const uint32_t k = rnd::order_key(l);
      if ((k & hi_mask) != prefix || !in_cut(k, j, P)) continue;
      const unsigned long long w = MASS ? mass_of(k, l, lmax, temp) : 1ull;
      const uint32_t d = (k >> shift) & 15u;
#pragma unroll
      for (int b = 0; b < 16; ++b) acc[b] += (d == (uint32_t)b) ? w : 0ull;
    }
    __syncthreads();  // the previous pass's hist and sel have been read
    if (threadIdx.x < 16) sm.hist[threadIdx.x] = 0;
    __syncthreads();
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const unsigned long long s = warp_sum_u64(acc[b]);
      if (lane == 0 && s) atomicAdd(&sm.hist[b], s);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long run = above;
      int sel = -1;
      for (int b = 15; b >= 0; --b) {
        if (run + sm.hist[b] >= target) { sel = b; break; }
        run += sm.hist[b];
      }
      if (sel < 0) {  // cannot happen for a valid target; stay deterministic anyway
        sel = 0;
        run = above;
      }
      sm.sel = sel;
      sm.above = run;
    }
    __syncthreads();
    prefix |= (uint32_t)sm.sel << shift;
    above = sm.above;
  }
  const uint32_t v = prefix;
  const unsigned long long wv = MASS ? mass_of(v, key_to_float(v), lmax, temp) : 1ull;
  if (wv == 0 || target <= above) {  // not reached for a valid target
    *cum = above;
    return Cut{v, fallback};
  }
  const unsigned long long m = (target - above + wv - 1) / wv;
  int idx = select_tied(row, V, v, P, (long long)m, sm);
  if (idx < 0) idx = fallback;
  *cum = above + m * wv;
  return Cut{v, idx};
}

template <class T>
__global__ void __launch_bounds__(kThreads) sample_kernel(int* __restrict__ out, const T* __restrict__ logits, int V,
                                                          const float* __restrict__ temperature,
                                                          const int* __restrict__ top_k,
                                                          const float* __restrict__ top_p, uint32_t* __restrict__ rng) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  __shared__ Smem sm;
  const int b = blockIdx.x;
  const T* row = logits + (size_t)b * V;
  const uint32_t seed = rng[2 * b], counter = rng[2 * b + 1];
  const float temp = temperature[b], tp = top_p[b];
  const int tk = top_k[b];
  const int greedy = row_argmax(row, V, sm);
  const float lmax = to_f32(row[greedy]);
  int token = greedy;
  if (temp > 0.f && isfinite(lmax)) {
    Cut P{0u, V - 1};  // everything
    unsigned long long mass;
    if (tk > 0 && tk < V) {
      unsigned long long cnt;
      P = search<T, false>(row, V, P, (unsigned long long)tk, lmax, temp, greedy, &cnt, sm);
    }
    mass = prefix_mass(row, V, P, lmax, temp, sm);
    if (tp < 1.f) {
      unsigned long long target = (unsigned long long)ceil((double)tp * (double)mass);
      target = target < 1ull ? 1ull : (target > mass ? mass : target);
      P = search<T, true>(row, V, P, target, lmax, temp, greedy, &mass, sm);
    }
    const uint32_t u = (uint32_t)(rnd::hash2(seed, counter) >> 32);
    const unsigned long long r = rnd::scale_draw(mass, u);
    unsigned long long cum;
    token = search<T, true>(row, V, P, r + 1, lmax, temp, greedy, &cum, sm).cut;
  }
  if (threadIdx.x == 0) {
    out[b] = token;
    rng[2 * b + 1] = counter + 1u;  // in place, so a replayed graph draws anew each step
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) argmax_kernel(int* __restrict__ out, const T* __restrict__ logits, int V) {
  pdl_wait();  // see pdl.cuh: before any global access
  pdl_trigger();
  __shared__ Smem sm;
  const int r = row_argmax(logits + (size_t)blockIdx.x * V, V, sm);
  if (threadIdx.x == 0) out[blockIdx.x] = r;
}

}  // namespace

void argmax(const Tensor& out, const Tensor& logits, cudaStream_t s) {
  const int64_t rows = logits.dim(0), V = logits.dim(1);
  if (rows == 0) return;
  dispatch_float(logits.dtype, "argmax", [&](auto t) {
    using T = decltype(t);
    launch_pdl(argmax_kernel<T>, dim3((unsigned)rows), dim3(kThreads), 0, s, out.ptr<int>(), logits.ptr<T>(), (int)V);
  });
}

void sample(const Tensor& out, const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
            const Tensor& top_p, const Tensor& rng, cudaStream_t s) {
  const int64_t rows = logits.dim(0), V = logits.dim(1);
  if (rows == 0) return;
  dispatch_float(logits.dtype, "sample", [&](auto t) {
    using T = decltype(t);
    launch_pdl(sample_kernel<T>, dim3((unsigned)rows), dim3(kThreads), 0, s, out.ptr<int>(), logits.ptr<T>(), (int)V,
                                                         temperature.ptr<float>(), top_k.ptr<int>(),
                                                         top_p.ptr<float>(), rng.ptr<uint32_t>());
  });
}

}  // namespace sqz::cuda
