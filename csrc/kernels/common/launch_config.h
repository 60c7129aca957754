// Host-side launch facts shared by the kernel families: SM count and the dynamic shared-memory
// opt-in, each looked up once per device and then read lock-free.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <mutex>
#include <string>

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

// query() for (device, key), key in [0, 64): run once with `device` current and then cached:
// per-device launch facts such as a kernel's resident blocks per SM, read on every launch. Each
// call site (its lambda's type) has its own cache; reads are one atomic load, only the first
// measurement of a slot takes the lock.
template <class Query>
int cached_per_device(int device, int key, Query query) {
  if (device < 0 || device >= 64 || key < 0 || key >= 64)
    fail("ERR_INTERNAL", "cached_per_device: device " + std::to_string(device) + " or key " + std::to_string(key) +
                             " out of range");
  static std::atomic<int> slots[64][64];  // value + 1; 0 = not measured yet
  std::atomic<int>& slot = slots[device][key];
  const int known = slot.load(std::memory_order_acquire);
  if (known != 0) return known - 1;
  static std::mutex mu;  // a measurement may switch the current device: one at a time
  std::lock_guard<std::mutex> lock(mu);
  if (const int again = slot.load(std::memory_order_acquire); again != 0) return again - 1;
  int cur = 0;
  cudaGetDevice(&cur);
  if (cur != device) cudaSetDevice(device);
  const int v = query();
  if (cur != device) cudaSetDevice(cur);
  slot.store(v + 1, std::memory_order_release);
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
