// The emulator's tensor_map.h (see ptx.cuh here): encode_rows_map writes the map's parameters into the
// opaque CUtensorMap in a layout of the emulator's own, and tma_load_2d (bulk_copy.cuh here) copies a
// box from them with the hardware's 128-byte swizzle and zeros outside the tensor.
#pragma once
#include <cuda.h>  // CUtensorMap (the type only)

#include <cstdint>
#include <cstring>

namespace sqz::cuda {

struct EmuRowsMap {
  const unsigned char* base;
  long long rows, cols, row_bytes;
  int box_rows, elem_bytes;
};
static_assert(sizeof(EmuRowsMap) <= sizeof(CUtensorMap), "the emulated map fits the opaque one");

template <class T>
bool encode_rows_map(CUtensorMap* map, const T* p, long long rows, long long cols, long long row_elems, int box_rows) {
  const EmuRowsMap m{reinterpret_cast<const unsigned char*>(p), rows, cols, row_elems * (long long)sizeof(T), box_rows, (int)sizeof(T)};
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof m);
  return true;
}

}  // namespace sqz::cuda
