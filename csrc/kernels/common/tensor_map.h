// Tensor maps for 2-D TMA copies (cp.async.bulk.tensor), encoded on the host (tensor_map_encode.h). A
// map is a kernel parameter (__grid_constant__), so graph capture keeps it with the launch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/common/tensor_map_encode.h"

namespace sqz::cuda {

// A 2-D tensor of rows x cols elements of type dt, row_bytes from one row to the next (a multiple of
// 16), read as boxes of box_rows x box_cols elements (box_cols times the element size a multiple of 16),
// stored in shared memory densely (box row after box row) or with the 128-byte swizzle (16-byte chunk c
// of box row r at chunk c ^ (r % 8) of its 128-byte line; box rows of 128 bytes); zeros outside. The
// base must be 16-byte aligned. False where the driver has no encoder or rejects the map.
inline bool encode_2d_map(CUtensorMap* map, CUtensorMapDataType dt, const void* base, long long rows, long long cols,
                          long long row_bytes, int box_cols, int box_rows, bool swizzle128) {
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows};
  return encode_tiled_2d(map, dt, base, dims, (cuuint64_t)row_bytes, box,
                         swizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE);
}

// A row-major [rows, cols] f16/bf16 matrix with `row_elems` elements from one row to the next (a
// multiple of 8, >= cols), read as boxes of box_rows x 64 elements with the 128-byte swizzle.
template <class T>
bool encode_rows_map(CUtensorMap* map, const T* p, long long rows, long long cols, long long row_elems, int box_rows) {
  const CUtensorMapDataType dt =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode_2d_map(map, dt, p, rows, cols, row_elems * (long long)sizeof(T), 64, box_rows, true);
}

}  // namespace sqz::cuda
