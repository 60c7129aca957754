// Small vector loops shared by the CPU ops, in an AVX2+FMA form where the CPU has it and a
// portable one (8 lane sums the compiler vectorises without reassociating) elsewhere, picked once
// per process; SQUEEZELM_CPU_PORTABLE=1 forces the portable forms (tests run both).
#pragma once
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#define SQZ_X86 1
#include <immintrin.h>
#endif

namespace sqz::cpu::vec {

// The loops of this process. Hot callers take the table once (vec::loops()) and call through it.
struct Loops {
  bool avx2;  // whether the AVX2+FMA forms are in use
  // sum_i a[i] * b[i]
  float (*dot)(const float* a, const float* b, int64_t n);
  // y[i] += a * x[i]
  void (*axpy)(float* y, float a, const float* x, int64_t n);
};
const Loops& loops();
inline bool avx2() { return loops().avx2; }

#ifdef SQZ_X86
// The sum of a register's 8 lanes.
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace sqz::cpu::vec
