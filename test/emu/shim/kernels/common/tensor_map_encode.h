// The emulator's tensor_map_encode.h (see ptx.cuh here): encode_tiled_2d writes the map's parameters into
// the opaque CUtensorMap in a layout of the emulator's own, checking what the driver's encoder checks and
// the kernels rely on; tma_load_2d (bulk_copy.cuh here) copies a box from them. The maps themselves are
// built by the real csrc/kernels/common/tensor_map.h on top of this.
#pragma once
#include <cuda.h>  // CUtensorMap and its enums (the types only)

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

inline bool encode_tiled_2d(CUtensorMap* map, CUtensorMapDataType dt, const void* base, const cuuint64_t (&dims)[2],
                            cuuint64_t row_bytes, const cuuint32_t (&box)[2], CUtensorMapSwizzle swizzle) {
  const int eb = dt == CU_TENSOR_MAP_DATA_TYPE_UINT8 ? 1 : dt == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || dt == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ? 2 : 0;
  const bool swz = swizzle == CU_TENSOR_MAP_SWIZZLE_128B;
  if (eb == 0 || (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && !swz)) return false;  // (what the kernels use)
  if (row_bytes % 16 != 0 || (box[0] * eb) % 16 != 0 || box[0] > 256 || box[1] > 256 ||
      (reinterpret_cast<uintptr_t>(base) & 15) != 0)
    return false;
  if (swz && box[0] * eb != 128) return false;
  const EmuMap m{static_cast<const unsigned char*>(base), (long long)dims[1], (long long)dims[0], (long long)row_bytes,
                 (int)box[0], (int)box[1], eb, swz};
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof m);
  return true;
}

}  // namespace sqz::cuda
