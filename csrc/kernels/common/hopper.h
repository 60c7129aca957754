// Where the Hopper-only kernels (bulk copies and mbarriers: common/bulk_copy.cuh; wgmma) may run:
// on a compute capability 9.0 device, in a build that carries sm_90a code. Everywhere else those
// kernels compile to empty bodies, so a launch would return garbage (or wait forever on a barrier
// no copy completes): the callers take their portable kernel instead.
#pragma once
#include <cuda_runtime.h>

#include <string_view>

#include "launch_config.h"

namespace sqz::cuda {

#ifndef SQUEEZELM_CUDA_ARCHS_STR
#define SQUEEZELM_CUDA_ARCHS_STR ""
#endif
inline constexpr bool kBuiltFor90a = std::string_view(SQUEEZELM_CUDA_ARCHS_STR).find("90a") != std::string_view::npos;

// The current device is compute capability 9.0 (cached per device).
inline bool device_is_sm90() {
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  return cached_per_device(dev, 0, [&] {
           int major = 0, minor = 0;
           cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "device attribute");
           cuda_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "device attribute");
           return major == 9 && minor == 0 ? 1 : 0;
         }) != 0;
}

// Both of the above: the bulk-copy kernels may run here.
inline bool hopper_kernels_available() { return kBuiltFor90a && device_is_sm90(); }

}  // namespace sqz::cuda
