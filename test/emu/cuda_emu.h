// A CUDA kernel emulator for the tests: runs a __global__ function's blocks one after another on the
// host, a block's threads as OS threads, with __syncthreads as a block barrier and the warp
// shuffles through a per-warp exchange and barrier. Block-static __shared__ arrays become function
// statics (one block runs at a time), dynamic shared memory (SQZ_DYNAMIC_SMEM) is one host buffer. It checks what a
// kernel computes and how its threads cooperate (indexing, barriers, shuffles, merges), not speed
// or the memory model: a kernel that passes here still has to pass its GPU suite.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline

namespace emu {
alignas(16) inline unsigned char g_dynamic_smem[1 << 20];
}
#define SQZ_DYNAMIC_SMEM(name) unsigned char* name = ::emu::g_dynamic_smem

using std::isfinite;
using std::max;
using std::min;

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned long long> slots;  // one word per thread for the block-wide votes (__syncthreads_or)
  std::vector<std::array<uint32_t, 8>> wide;  // the fragments of a warp-wide matrix instruction, per thread
  std::mutex named_mu;  // named barriers (bar.sync id, count), made at first use
  std::unique_ptr<std::barrier<>> named[16];
};
inline Block* g_block = nullptr;

// One OS thread per CUDA thread of a block, made once per launch: the threads run the blocks one
// after another, meeting at a barrier of their own between two blocks (block-static shared memory is
// one host array).
inline void run(dim3 grid, dim3 block, const std::function<void()>& body) {
  gridDim = grid;
  blockDim = block;
  const unsigned n = block.x * block.y * block.z;
  Block b;
  b.block = std::make_unique<std::barrier<>>(n);
  for (unsigned w = 0; w < (n + 31) / 32; ++w) b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
  b.slots.assign(n, 0);
  b.wide.assign(n, {});
  std::barrier<> between(n);
  g_block = &b;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < n; ++t)
    ts.emplace_back([&, t] {
      threadIdx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = make_uint3(x, y, z);
            body();
            between.arrive_and_wait();
          }
    });
  for (auto& t : ts) t.join();
  g_block = nullptr;
}

inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

// A warp-wide instruction: every lane publishes N words, then f(word) reads any lane's words
// (word(lane, i)); the warp meets before and after, as the instruction's lanes do.
template <int N, class F> auto warp_collective(const std::array<uint32_t, N>& mine, F f) {
  static_assert(N <= 8, "at most 8 words per lane");
  const unsigned t = linear_tid(), w = t / 32;
  std::copy(mine.begin(), mine.end(), g_block->wide[t].begin());
  g_block->warps[w]->arrive_and_wait();
  auto out = f([w](unsigned lane, int i) { return g_block->wide[32 * w + (lane & 31)][i]; });
  g_block->warps[w]->arrive_and_wait();
  return out;
}

// bar.sync id, threads: the first `threads` threads of the block meet (the same count every use).
inline void named_barrier(int id, int threads) {
  std::barrier<>* b;
  {
    std::lock_guard<std::mutex> lock(g_block->named_mu);
    auto& slot = g_block->named[id & 15];
    if (!slot) slot = std::make_unique<std::barrier<>>(threads);
    b = slot.get();
  }
  b->arrive_and_wait();
}

// A shuffle: lane src_lane's value (a warp collective of two words).
template <class T> T exchange(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  std::array<uint32_t, 2> mine{};
  std::memcpy(mine.data(), &v, sizeof(T));
  return warp_collective<2>(mine, [src_lane](auto word) {
    const uint32_t got[2] = {word(src_lane, 0), word(src_lane, 1)};
    T out;
    std::memcpy(&out, got, sizeof(T));
    return out;
  });
}
}  // namespace emu

inline void __syncthreads() { emu::g_block->block->arrive_and_wait(); }
inline int __syncthreads_or(int pred) {
  const unsigned t = emu::linear_tid();
  emu::g_block->slots[t] = pred != 0;
  __syncthreads();
  int any = 0;
  for (unsigned long long v : emu::g_block->slots) any |= (int)v;
  __syncthreads();
  return any;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::g_block->warps[emu::linear_tid() / 32]->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int lane_mask) { return emu::exchange(v, (emu::linear_tid() & 31) ^ (unsigned)lane_mask); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, (unsigned)src); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }

// Integer and float intrinsics of the device, as the PTX ISA defines them.
inline unsigned __byte_perm(unsigned a, unsigned b, unsigned s) {
  const unsigned long long x = ((unsigned long long)b << 32) | a;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((x >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned sh) {
  sh &= 31;
  return sh ? (lo >> sh) | (hi << (32 - sh)) : lo;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned sh) {
  sh &= 31;
  return sh ? (hi << sh) | (lo >> (32 - sh)) : hi;
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <class T> T __ldg(const T* p) { return *p; }
template <class T> T __ldcg(const T* p) { return *p; }
template <class T> T __ldcs(const T* p) { return *p; }
template <class T> T __ldlu(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __saturatef(float a) { return std::fmin(std::fmax(a, 0.f), 1.f); }
template <class T> T __shfl_down_sync(unsigned, T v, int d) {
  const unsigned l = emu::linear_tid() & 31;
  return emu::exchange(v, l + d < 32 ? l + d : l);
}
template <class T> T __shfl_up_sync(unsigned, T v, int d) {
  const unsigned l = emu::linear_tid() & 31;
  return emu::exchange(v, l >= (unsigned)d ? l - d : l);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  return emu::warp_collective<1>({(uint32_t)(pred != 0)}, [](auto word) {
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l) m |= word(l, 0) << l;
    return m;
  });
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
