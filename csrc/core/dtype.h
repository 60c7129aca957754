// Element types and the host-side conversions between fp16/bf16 bits and float.
// Kept header-only and free of CUDA so the CPU backend, the binding and nvcc all share it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace sqz {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, I32 = 3, U32 = 4, I8 = 5, U8 = 6 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: case DType::I32: case DType::U32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::I8: case DType::U8: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::I32: return "i32";
    case DType::U32: return "u32";
    case DType::I8: return "i8";
    case DType::U8: return "u8";
  }
  return "?";
}

inline bool dtype_from_name(const std::string& s, DType* out) {
  static const char* names[] = {"f32", "f16", "bf16", "i32", "u32", "i8", "u8"};
  for (int i = 0; i < 7; ++i)
    if (s == names[i]) { *out = static_cast<DType>(i); return true; }
  return false;
}

inline bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half -> float, exact (handles subnormals, inf, nan).
inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  if (exp == 0) {
    if (man == 0) return bits_f32(sign);
    // subnormal: value = man * 2^-24
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
  return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

// float -> IEEE half with round-to-nearest-even (what CUDA's __float2half does).
inline uint16_t float_to_half(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // rounds to inf
  if (ax < 0x38800000u) {                                     // subnormal half or zero
    // add 0.5 to move the bits into place, then round by float hardware
    float v = bits_f32(ax) + 0.5f;
    return (uint16_t)(sign | (f32_bits(v) - 0x3f000000u));
  }
  uint32_t mant_odd = (ax >> 13) & 1;
  ax += 0xc8000fffu + mant_odd;  // re-bias exponent (-112 << 23) and round to nearest even
  return (uint16_t)(sign | (ax >> 13));
}

inline float bf16_to_float(uint16_t b) { return bits_f32((uint32_t)b << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

// Reads element i of a float tensor of any float dtype as float.
inline float load_as_float(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return 0.f;
  }
}

inline void store_from_float(void* p, DType t, size_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: break;
  }
}

// Converts n contiguous elements to float (a row of weights or activations).
void convert_to_float(const void* src, DType t, float* dst, size_t n);
// Converts n floats to dtype t.
void convert_from_float(const float* src, void* dst, DType t, size_t n);

}  // namespace sqz
