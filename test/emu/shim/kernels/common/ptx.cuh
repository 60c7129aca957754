// The emulator's ptx.cuh (test/emu/shim comes before csrc on the include path, so the kernels
// include this file instead of csrc/kernels/common/ptx.cuh): the same functions, written for the
// host from the PTX ISA's definitions. Shared-window addresses are offsets from the emulated dynamic
// shared memory (signed 32-bit, so a block-static array, a host static nearby, maps too). The
// asynchronous copies complete when issued: a kernel that overwrote a stage before it was consumed,
// or read one before its copy was waited for, would compute wrong results here too.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sqz::cuda {

inline unsigned char* shared_ptr(uint32_t addr) { return ::emu::g_dynamic_smem + (int32_t)addr; }
inline uint32_t smem_u32(const void* p) {
  return (uint32_t)(int32_t)(static_cast<const unsigned char*>(p) - ::emu::g_dynamic_smem);
}

inline uint4 ld_stream(const void* p) {
  uint4 r;
  std::memcpy(&r, p, 16);
  return r;
}
inline int ld_pinned_s32(const int* p) { return *p; }
inline uint32_t ld_pinned_u32(const void* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline uint32_t ld_pinned_u16(const void* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

inline uint32_t ld_shared_u32(uint32_t addr) { uint32_t v; std::memcpy(&v, shared_ptr(addr), 4); return v; }
inline uint4 ld_shared_v4(uint32_t addr) { uint4 v; std::memcpy(&v, shared_ptr(addr), 16); return v; }
inline unsigned short ld_shared_u16(uint32_t addr) { unsigned short v; std::memcpy(&v, shared_ptr(addr), 2); return v; }
inline void st_shared_v4(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  const uint32_t w[4] = {a, b, c, d};
  std::memcpy(shared_ptr(addr), w, 16);
}
inline void st_shared_v2f(uint32_t addr, float a, float b) {
  const float w[2] = {a, b};
  std::memcpy(shared_ptr(addr), w, 8);
}
inline void st_shared_f32(uint32_t addr, float v) { std::memcpy(shared_ptr(addr), &v, 4); }
inline void st_shared_u16(uint32_t addr, unsigned short v) { std::memcpy(shared_ptr(addr), &v, 2); }

inline unsigned int ld_acquire_gpu_u32(const unsigned int* p) {
  return std::atomic_ref<unsigned int>(*const_cast<unsigned int*>(p)).load(std::memory_order_acquire);
}

inline int atom_add_acq_rel_gpu(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v, std::memory_order_acq_rel); }

inline void prefetch_l2(const void*) {}
inline void prefetch_l1(const void*) {}

inline void cp_async16(uint32_t dst, const void* src, bool ok) {
  if (ok) std::memcpy(shared_ptr(dst), src, 16);
  else std::memset(shared_ptr(dst), 0, 16);
}
inline void cp_async16(void* dst, const void* src, bool ok) { cp_async16(smem_u32(dst), src, ok); }
inline void cp_async4(uint32_t dst, const void* src, bool ok) {
  if (ok) std::memcpy(shared_ptr(dst), src, 4);
  else std::memset(shared_ptr(dst), 0, 4);
}
inline void cp_async4(void* dst, const void* src, bool ok) { cp_async4(smem_u32(dst), src, ok); }
inline void cp_async_commit() {}
template <int N> void cp_async_wait() {}

// 16-bit element (row, col) of an 8x8 fragment matrix held the way mma and ldmatrix hold it: lane
// 4 * row + col / 2, half col % 2 of its register.
inline uint16_t frag_half(uint32_t reg, int col) { return (uint16_t)(reg >> (16 * (col & 1))); }

// ldmatrix .x4: lanes 8j .. 8j + 7 give the row addresses of matrix j; lane l receives row l / 4,
// columns 2 (l % 4) and + 1 of each matrix (.trans: of each matrix's transpose).
inline void ldmatrix_x4_any(uint32_t addr, uint32_t (&r)[4], bool trans) {
  const unsigned lane = ::emu::linear_tid() & 31;
  ::emu::warp_collective<1>({addr}, [&](auto word) {
    for (int j = 0; j < 4; ++j) {
      uint16_t h[2];
      for (int e = 0; e < 2; ++e) {
        const int row = trans ? 2 * (lane % 4) + e : lane / 4, col = trans ? lane / 4 : 2 * (lane % 4) + e;
        std::memcpy(&h[e], shared_ptr(word(8 * j + row, 0) + 2 * col), 2);
      }
      r[j] = h[0] | (uint32_t)h[1] << 16;
    }
    return 0;
  });
}
inline void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  uint32_t r[4];
  ldmatrix_x4_any(addr, r, false);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_x4(smem_u32(p), r[0], r[1], r[2], r[3]); }
inline void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  uint32_t r[4];
  ldmatrix_x4_any(addr, r, true);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_x4_trans(smem_u32(p), r[0], r[1], r[2], r[3]); }

// movmatrix .trans: lane l receives element (l / 4, 2 (l % 4) + e) of the transpose, i.e. element
// (2 (l % 4) + e, l / 4) of the matrix the lanes hold.
inline uint32_t movmatrix_trans(uint32_t a) {
  const unsigned lane = ::emu::linear_tid() & 31;
  return ::emu::warp_collective<1>({a}, [&](auto word) {
    uint32_t out = 0;
    for (int e = 0; e < 2; ++e) {
      const int row = 2 * (lane % 4) + e, col = lane / 4;
      out |= (uint32_t)frag_half(word(4 * row + col / 2, 0), col) << (16 * e);
    }
    return out;
  });
}

template <class T> float emu_to_float(uint16_t bits) {
  if constexpr (std::is_same<T, __half>::value) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  } else {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
}

// c += a . b, m16n8k16: A row-major 16x16 (a0: rows 0-7 / k 0-7, a1: rows 8-15 / k 0-7, a2: rows
// 0-7 / k 8-15, a3: rows 8-15 / k 8-15), B 16x8 by columns (b0: k 0-7, b1: k 8-15), C rows g and
// g + 8, columns 2t and 2t + 1 of lane 4g + t. Products in fp32 (exact for fp16 and bf16 inputs).
template <class T>
void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  const unsigned lane = ::emu::linear_tid() & 31, g = lane / 4, t = lane % 4;
  ::emu::warp_collective<6>({a0, a1, a2, a3, b0, b1}, [&](auto word) {
    auto A = [&](int row, int k) {
      return emu_to_float<T>(frag_half(word(4 * (row % 8) + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)), k));
    };
    auto B = [&](int k, int n) { return emu_to_float<T>(frag_half(word(4 * n + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0)), k)); };
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
      c[i] += s;
    }
    return 0;
  });
}

}  // namespace sqz::cuda
