// Grow-only device scratch, one buffer per (purpose, device): split partials and flags that a launch
// writes and the next kernel of the same op reads. A larger request waits for the stream, frees the
// old buffer and allocates half again as much, so a first call of a shape sizes it before any
// graph capture of the same shape.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "core/cuda_stream.h"
#include "core/error.h"

namespace sqz::cuda {

enum class Scratch { kKvqPartials, kSqueezed, kLora, kCount };

inline void* grow_scratch(Scratch which, int dev, size_t bytes, cudaStream_t stream, const char* op) {
  constexpr int kDevices = 64, kKinds = static_cast<int>(Scratch::kCount);
  static std::mutex mu;
  static void* ptr[kKinds][kDevices] = {};
  static size_t size[kKinds][kDevices] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (dev < 0 || dev >= kDevices) fail("ERR_DEVICE", std::string(op) + ": device index out of range");
  const int k = static_cast<int>(which);
  if (size[k][dev] < bytes) {
    if (ptr[k][dev]) {
      cuda_check(cudaStreamSynchronize(stream), op);
      cuda_free(dev, ptr[k][dev], size[k][dev]);
      ptr[k][dev] = nullptr;
      size[k][dev] = 0;
    }
    const size_t nb = bytes + bytes / 2;
    ptr[k][dev] = cuda_alloc(dev, nb);
    size[k][dev] = nb;
  }
  return ptr[k][dev];
}

}  // namespace sqz::cuda
