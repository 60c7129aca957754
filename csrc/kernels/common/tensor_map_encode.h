// The driver's tensor-map encoder (cuTensorMapEncodeTiled), taken at run time: the addon links no
// driver library. Null where the driver does not offer it; the callers then take a kernel without TMA.
// This is the one file the emulator replaces (test/emu/shim): tensor_map.h's maps are built on it.
#pragma once
#include <cuda.h>  // CUtensorMap and its enums (the types only)
#include <cuda_runtime.h>

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

// A 2-D map: dims[0] innermost, row_bytes from one row to the next, boxes of box[0] x box[1] elements,
// zeros outside. False where the driver has no encoder or rejects the map.
inline bool encode_tiled_2d(CUtensorMap* map, CUtensorMapDataType dt, const void* base, const cuuint64_t (&dims)[2],
                            cuuint64_t row_bytes, const cuuint32_t (&box)[2], CUtensorMapSwizzle swizzle) {
  const TensorMapEncodeFn encode = tensor_map_encoder();
  if (!encode) return false;
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t elem[2] = {1, 1};
  return encode(map, dt, 2, const_cast<void*>(base), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace sqz::cuda
