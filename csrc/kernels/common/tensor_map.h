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

// A row-major [rows, cols] f16/bf16 matrix with `row_elems` elements from one row to the next (a
// multiple of 8, >= cols), read as boxes of box_rows x 64 elements with the 128-byte swizzle (16-byte
// chunk c of box row r lands at chunk c ^ (r % 8) of its 128-byte line), zeros outside. The base must be
// 16-byte aligned. False where the driver has no encoder or rejects the map.
template <class T>
bool encode_rows_map(CUtensorMap* map, const T* p, long long rows, long long cols, long long row_elems, int box_rows) {
  const TensorMapEncodeFn encode = tensor_map_encoder();
  if (!encode) return false;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)row_elems * sizeof(T)};
  const cuuint32_t box[2] = {64, (cuuint32_t)box_rows};
  const cuuint32_t elem[2] = {1, 1};
  const CUtensorMapDataType dt =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, dt, 2, const_cast<T*>(p), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace sqz::cuda
