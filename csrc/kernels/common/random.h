// Counter-based random numbers shared by the CPU backend and the CUDA kernels, so one seed
// gives the same tensor (fillRandom) and the same sampled token (sample) on both. Pure
// integer mixing (splitmix64's finaliser): no state, any element computable on its own.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SQZ_HD __host__ __device__ __forceinline__
#else
#define SQZ_HD inline
#endif

namespace sqz::rnd {

SQZ_HD uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// 64 random bits for (seed, counter). Seeds that differ in any bit give unrelated streams.
SQZ_HD uint64_t hash2(uint64_t seed, uint64_t counter) { return mix64(mix64(seed) ^ counter); }

// 24-bit uniforms are exact in float, so CPU and CUDA see the same value.
SQZ_HD float uniform24_open0(uint64_t h) { return (float)((h >> 40) + 1) * (1.0f / 16777216.0f); }  // (0, 1]
SQZ_HD float uniform24(uint64_t h) { return (float)((h >> 16) & 0xffffffull) * (1.0f / 16777216.0f); }  // [0, 1)

// Order-preserving map of a float onto uint32 (larger float -> larger key); NaN maps to 0,
// below every number, so it never wins an argmax or a top-k.
SQZ_HD uint32_t order_key(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  __builtin_memcpy(&u, &f, 4);
#endif
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Sampling works on integer probability mass so every sum is exact and the same in any
// order: q = floor(exp((logit - max) / T) * 2^40). The top token weighs 2^40; tokens below
// e^-27.7 of it weigh 0 (together < V * 2^-40 of the mass) and are never drawn.
constexpr double kMassScale = 1099511627776.0;  // 2^40

// floor(m * u / 2^32): a draw in [0, m) from 32 random bits, exact in integers.
// Split into 32-bit halves: (mh*2^32 + ml)*u >> 32 == mh*u + (ml*u >> 32) exactly (m < 2^63).
SQZ_HD uint64_t scale_draw(uint64_t m, uint32_t u) {
  return (m >> 32) * u + (((m & 0xffffffffull) * u) >> 32);
}

}  // namespace sqz::rnd
