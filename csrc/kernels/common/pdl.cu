// Whether a launch may carry the programmatic-dependent-launch attribute (see pdl.cuh).
#include <atomic>
#include <cstdint>
#include <cstdlib>

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

bool pdl_for(cudaStream_t stream) {
  if (!pdl_enabled()) return false;
  const char* v = std::getenv("SQUEEZELM_GRAPH_PDL");
  if (!v || *v != '0') return true;
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &st) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return st == cudaStreamCaptureStatusNone;
}

}  // namespace sqz::cuda
