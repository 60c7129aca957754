// The emulator's tensor_map.h (see ptx.cuh here): encode_rows_map writes the map's parameters into the
// opaque CUtensorMap in a layout of the emulator's own, and tma_load_2d (bulk_copy.cuh here) copies a
// box from them with the hardware's 128-byte swizzle and zeros outside the tensor.
#pragma once
#include <cuda.h>  // CUtensorMap (the type only)

#include <cstdint>
#include <cstring>

namespace sqz::cuda {

struct EmuMap {
  const unsigned char* base;
  long long rows, cols, row_bytes;
  int box_cols, box_rows, elem_bytes;
  bool swizzle128;
};
static_assert(sizeof(EmuMap) <= sizeof(CUtensorMap), "the emulated map fits the opaque one");

inline bool encode_2d_map(CUtensorMap* map, CUtensorMapDataType, int elem_bytes, const void* base, long long rows, long long cols,
                          long long row_bytes, int box_cols, int box_rows, bool swizzle128) {
  // the hardware's rules the real encoder checks (and the kernels rely on)
  if (row_bytes % 16 != 0 || (box_cols * elem_bytes) % 16 != 0 || (reinterpret_cast<uintptr_t>(base) & 15) != 0) return false;
  if (swizzle128 && box_cols * elem_bytes != 128) return false;
  const EmuMap m{static_cast<const unsigned char*>(base), rows, cols, row_bytes, box_cols, box_rows, elem_bytes, swizzle128};
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof m);
  return true;
}
template <class T>
bool encode_rows_map(CUtensorMap* map, const T* p, long long rows, long long cols, long long row_elems, int box_rows) {
  return encode_2d_map(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, (int)sizeof(T), p, rows, cols, row_elems * (long long)sizeof(T), 64,
                       box_rows, true);
}

}  // namespace sqz::cuda
