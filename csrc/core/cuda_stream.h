// CUDA-only helpers shared by kernels and CUDA host code.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "error.h"

namespace sqz {

// The one stream of a device; every op on that device is ordered on it.
cudaStream_t cuda_stream(int device);

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("ERR_CUDA", std::string(what) + ": " + cudaGetErrorString(e));
}

inline unsigned ceil_div(long long a, long long b) { return (unsigned)((a + b - 1) / b); }

}  // namespace sqz
