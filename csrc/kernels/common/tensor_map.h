// Tensor maps for 2-D TMA copies (cp.async.bulk.tensor), encoded on the host.
//
// cuTensorMapEncodeTiled comes from the driver at run time (the addon links no driver library): null
// where the driver does not offer it, and the callers then take a kernel without TMA. A map is a
// kernel parameter (__grid_constant__), so graph capture keeps it with the launch.
#pragma once
#include <cuda.h>  // CUtensorMap and its enums (the types only)
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace sqz::cuda {

using TensorMapEncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                       const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                       CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
inline TensorMapEncodeFn tensor_map_encoder() {
  static const TensorMapEncodeFn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return TensorMapEncodeFn(nullptr);
    }
    return reinterpret_cast<TensorMapEncodeFn>(p);
  }();
  return fn;
}

// A 2-D tensor of rows x cols elements (type dt, elem_bytes each), row_bytes from one row to the next
// (a multiple of 16), read as boxes of box_rows x box_cols elements (box_cols * elem_bytes a multiple of
// 16), stored in shared memory densely (box row after box row) or with the 128-byte swizzle (16-byte
// chunk c of box row r at chunk c ^ (r % 8) of its 128-byte line; box_cols * elem_bytes = 128); zeros
// outside. The base must be 16-byte aligned. False where the driver has no encoder or rejects the map.
inline bool encode_2d_map(CUtensorMap* map, CUtensorMapDataType dt, int elem_bytes, const void* base, long long rows,
                          long long cols, long long row_bytes, int box_cols, int box_rows, bool swizzle128) {
  const TensorMapEncodeFn encode = tensor_map_encoder();
  if (!encode) return false;
  (void)elem_bytes;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)row_bytes};
  const cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows};
  const cuuint32_t elem[2] = {1, 1};
  return encode(map, dt, 2, const_cast<void*>(base), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// A row-major [rows, cols] f16/bf16 matrix with `row_elems` elements from one row to the next (a
// multiple of 8, >= cols), read as boxes of box_rows x 64 elements with the 128-byte swizzle.
template <class T>
bool encode_rows_map(CUtensorMap* map, const T* p, long long rows, long long cols, long long row_elems, int box_rows) {
  const CUtensorMapDataType dt =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode_2d_map(map, dt, (int)sizeof(T), p, rows, cols, row_elems * (long long)sizeof(T), 64, box_rows, true);
}

}  // namespace sqz::cuda
