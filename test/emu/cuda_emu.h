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
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
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

using std::max;
using std::min;

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned long long> slots;  // one 8-byte exchange slot per thread
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

template <class T> T exchange(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const unsigned t = linear_tid(), w = t / 32;
  unsigned long long raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  g_block->slots[t] = raw;
  g_block->warps[w]->arrive_and_wait();
  T out;
  const unsigned long long got = g_block->slots[32 * w + (src_lane & 31)];
  std::memcpy(&out, &got, sizeof(T));
  g_block->warps[w]->arrive_and_wait();
  return out;
}
}  // namespace emu

inline void __syncthreads() { emu::g_block->block->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int lane_mask) { return emu::exchange(v, (emu::linear_tid() & 31) ^ (unsigned)lane_mask); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, (unsigned)src); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
