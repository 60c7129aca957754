// Host-side launch facts shared by the kernel families: SM count and the dynamic shared-memory
// opt-in, each looked up once per device and then read lock-free.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "core/cuda_stream.h"
#include "core/error.h"

namespace sqz::cuda {

// SMs of `device` (cached per device).
inline int sm_count(int device) {
  static std::atomic<int> counts[64];
  std::atomic<int>& slot = counts[device & 63];
  int n = slot.load(std::memory_order_relaxed);
  if (n == 0) {
    cuda_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "SM count");
    if (n <= 0) n = 1;
    slot.store(n, std::memory_order_relaxed);
  }
  return n;
}

// query() for (device, key), run once with `device` current and then cached: per-device launch
// facts such as a kernel's resident blocks per SM. Each call site (its lambda's type) has its own
// cache.
template <class Query>
int cached_per_device(int device, int key, Query query) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find({device, key});
  if (it != cache.end()) return it->second;
  int cur = 0;
  cudaGetDevice(&cur);
  if (cur != device) cudaSetDevice(device);
  const int v = query();
  if (cur != device) cudaSetDevice(cur);
  cache.emplace(std::make_pair(device, key), v);
  return v;
}

// Lets kernel K take `bytes` of dynamic shared memory on the current device: its limit is raised
// once per device to the device's opt-in maximum (less K's static shared memory), so no attribute
// call happens while a graph is being captured after the first eager launch. ERR_UNSUPPORTED,
// naming `op`, when `bytes` exceed what the device allows.
template <auto K>
void allow_dynamic_smem(size_t bytes, const char* op) {
  static std::atomic<size_t> limits[64];  // per device; 0 = not raised yet
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), op);
  std::atomic<size_t>& slot = limits[dev & 63];
  size_t limit = slot.load(std::memory_order_acquire);
  if (limit == 0) {
    int optin = 0;
    cuda_check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), op);
    cudaFuncAttributes fa{};
    cuda_check(cudaFuncGetAttributes(&fa, reinterpret_cast<const void*>(K)), op);
    limit = (size_t)optin > fa.sharedSizeBytes ? (size_t)optin - fa.sharedSizeBytes : 0;
    if (limit < bytes)
      fail("ERR_UNSUPPORTED", std::string(op) + ": needs " + std::to_string(bytes) + " bytes of shared memory per block");
    const cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(K), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)limit);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: keep it from being reported by a later launch check
      cuda_check(e, (std::string(op) + " (shared memory limit)").c_str());
    }
    slot.store(limit, std::memory_order_release);
  }
  if (limit < bytes)
    fail("ERR_UNSUPPORTED", std::string(op) + ": needs " + std::to_string(bytes) + " bytes of shared memory per block");
}

}  // namespace sqz::cuda
