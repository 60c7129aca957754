// Whether a launch may carry the programmatic-dependent-launch attribute (see pdl.cuh).
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "core/env.h"

#include "pdl.cuh"

namespace sqz::cuda {

bool pdl_enabled() {
  // Read per launch (a getenv, negligible next to a launch) so a benchmark can compare both
  // settings in one process; CUDA graphs keep what was set when they were captured.
  const char* v = std::getenv("SQUEEZELM_NO_PDL");
  if (v && *v && *v != '0') return false;
  // Per device: known / capable bits (compute capability 9.0 and newer).
  static std::atomic<uint64_t> known{0}, capable{0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  const uint64_t bit = 1ull << (dev & 63);
  if (!(known.load() & bit)) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9)
      capable.fetch_or(bit);
    known.fetch_or(bit);
  }
  return (capable.load() & bit) != 0;
}

void prefer_carveout(const void* kernel) {
  // Tuning knob under test: SQUEEZELM_CARVEOUT = percent of the L1/shared array given to shared
  // memory for every kernel launched through launch_pdl (-1: the driver's choice).
  const int pct = env_int("SQUEEZELM_CARVEOUT", -1);
  static std::mutex mu;
  static std::unordered_map<const void*, int> set;
  std::lock_guard<std::mutex> lock(mu);
  auto it = set.find(kernel);
  if (it != set.end() && it->second == pct) return;
  set[kernel] = pct;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, pct) != cudaSuccess) cudaGetLastError();
}

}  // namespace sqz::cuda
