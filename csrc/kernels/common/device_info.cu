#include <cuda_runtime.h>

#include <atomic>

#include "core/cuda_stream.h"
#include "device_info.h"

namespace sqz::cuda {

int current_sm_count() {
  static std::atomic<int> cached[64] = {};
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  std::atomic<int>& slot = cached[dev & 63];
  int n = slot.load();
  if (n == 0) {
    cuda_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "multiprocessor count");
    slot.store(n);
  }
  return n;
}

}  // namespace sqz::cuda
