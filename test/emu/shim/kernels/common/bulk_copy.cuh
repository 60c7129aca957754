// The emulator's bulk_copy.cuh (see ptx.cuh here): mbarriers with their arrival count, phase and
// transaction bytes kept in the barrier's own 8 bytes of shared memory, updated atomically; a bulk
// copy lands when issued and then completes its bytes on the barrier; a waiting thread yields until
// the phase it waits for has completed (the other threads of the block keep running, as warps do).
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>

#include "ptx.cuh"
#include "tensor_map_encode.h"

namespace sqz::cuda {

// bits 0-19: arrivals still due in this phase; 20-30: the arrival count; 31: the phase parity;
// high word: transaction bytes still due (signed).
inline std::atomic_ref<uint64_t> mbar_word(uint32_t bar) {
  return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(shared_ptr(bar)));
}
// Applies an arrival (arrive = 1 or 0) and a transaction change; completes the phase when both
// counts reach zero.
inline void mbar_update(uint32_t bar, uint32_t arrive, int32_t tx) {
  auto w = mbar_word(bar);
  uint64_t old = w.load(), nw;
  do {
    uint32_t lo = (uint32_t)old;
    int32_t t = (int32_t)(old >> 32) + tx;
    uint32_t due = (lo & 0xfffffu) - arrive;
    const uint32_t count = (lo >> 20) & 0x7ffu;
    uint32_t phase = lo >> 31;
    if (due == 0 && t == 0) {
      due = count;
      phase ^= 1u;
    }
    lo = due | count << 20 | phase << 31;
    nw = (uint64_t)(uint32_t)t << 32 | lo;
  } while (!w.compare_exchange_weak(old, nw));
}

inline void mbar_init(uint32_t bar, uint32_t count) { mbar_word(bar).store((uint64_t)(count | count << 20)); }
inline void mbar_fence_init() {}
inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) { mbar_update(bar, 1, (int32_t)bytes); }
inline void mbar_arrive(uint32_t bar) { mbar_update(bar, 1, 0); }
inline void mbar_wait(uint32_t bar, uint32_t parity) {
  while (((uint32_t)mbar_word(bar).load() >> 31) == (parity & 1u)) std::this_thread::yield();
}

inline uint64_t l2_evict_first_policy() { return 0; }
inline void bulk_prefetch_l2(const void*, uint32_t) {}

inline void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar, uint64_t) {
  std::memcpy(shared_ptr(dst), src, bytes);
  mbar_update(bar, 0, -(int32_t)bytes);
}

// One box at (c0 innermost, c1) of a map from encode_tiled_2d (tensor_map_encode.h here), stored densely or as
// the 128-byte swizzle stores it (16-byte chunk j of box row r at chunk j ^ (r % 8) of the row's
// 128-byte line; the destination is 1 KB aligned); elements outside the tensor arrive as zeros and
// count as bytes.
inline void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar) {
  EmuMap m;
  std::memcpy(&m, tmap, sizeof m);
  const int eb = m.elem_bytes, row_bytes = m.box_cols * eb;
  for (int r = 0; r < m.box_rows; ++r)
    for (int e = 0; e < m.box_cols; ++e) {
      const long long row = (long long)c1 + r, col = (long long)c0 + e;
      const int byte = e * eb, at = m.swizzle128 ? ((((byte >> 4) ^ (r & 7)) << 4) | (byte & 15)) : byte;
      unsigned char* d = shared_ptr(dst + r * row_bytes + at);
      if (row >= 0 && row < m.rows && col >= 0 && col < m.cols) std::memcpy(d, m.base + row * m.row_bytes + col * eb, eb);
      else std::memset(d, 0, eb);
    }
  mbar_update(bar, 0, -(int32_t)(m.box_rows * row_bytes));
}
inline void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar, uint64_t) { tma_load_2d(dst, tmap, c0, c1, bar); }

inline uint4 ld_ring_v4(uint32_t addr) {
  uint4 r;
  std::memcpy(&r, shared_ptr(addr), 16);
  return r;
}
inline void fence_proxy_async_shared() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline void named_barrier(int id, int threads) { ::emu::named_barrier(id, threads); }

}  // namespace sqz::cuda
