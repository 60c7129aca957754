// The emulator's tensor_map.h (see ptx.cuh here): encode_rows_map writes the map's parameters into the
// opaque CUtensorMap in a layout of the emulator's own, and tma_load_2d (bulk_copy.cuh here) copies a
// box from them with the hardware's 128-byte swizzle and zeros outside the tensor.
#pragma once
#include <cuda.h>  // CUtensorMap (the type only)

#include <cstdint>
#include <cstring>

namespace sqz::cuda {

// dims[0] innermost; strides in bytes for dims 1 and 2; box[2] = 1 for 2-D maps
struct EmuMap {
  const unsigned char* base;
  long long dims[3], strides[2];
  int box[3], elem_bytes;
  bool swizzle128;
};
static_assert(sizeof(EmuMap) <= sizeof(CUtensorMap), "the emulated map fits the opaque one");

inline bool emu_store_map(CUtensorMap* map, const EmuMap& m) {
  // the hardware's rules the real encoder checks (and the kernels rely on)
  if (m.strides[0] % 16 != 0 || m.strides[1] % 16 != 0 || (m.box[0] * m.elem_bytes) % 16 != 0 ||
      (reinterpret_cast<uintptr_t>(m.base) & 15) != 0)
    return false;
  if (m.swizzle128 && m.box[0] * m.elem_bytes != 128) return false;
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof m);
  return true;
}
inline bool encode_2d_map(CUtensorMap* map, CUtensorMapDataType, int elem_bytes, const void* base, long long rows, long long cols,
                          long long row_bytes, int box_cols, int box_rows, bool swizzle128) {
  return emu_store_map(map, EmuMap{static_cast<const unsigned char*>(base), {cols, rows, 1}, {row_bytes, 16}, {box_cols, box_rows, 1},
                                   elem_bytes, swizzle128});
}
inline bool encode_3d_map(CUtensorMap* map, CUtensorMapDataType, int elem_bytes, const void* base, const long long (&dims)[3],
                          const long long (&strides)[2], const int (&box)[3]) {
  return emu_store_map(map, EmuMap{static_cast<const unsigned char*>(base), {dims[0], dims[1], dims[2]}, {strides[0], strides[1]},
                                   {box[0], box[1], box[2]}, elem_bytes, true});
}
template <class T>
bool encode_rows_map(CUtensorMap* map, const T* p, long long rows, long long cols, long long row_elems, int box_rows) {
  return encode_2d_map(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, (int)sizeof(T), p, rows, cols, row_elems * (long long)sizeof(T), 64,
                       box_rows, true);
}

}  // namespace sqz::cuda
