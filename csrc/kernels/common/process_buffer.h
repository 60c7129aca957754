// Device buffers that live as long as the process, one per (device, purpose): allocated and zeroed
// once, outside any graph capture. Kernels keep cross-block bookkeeping in them (per-tile or per-head
// counters that the last block to arrive resets to 0, so every launch finds them zeroed without a
// memset of its own) or scratch that one launch writes and the next reads (the LUT GEMV's xT).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>

#include "core/cuda_stream.h"

namespace sqz::cuda {

enum class ProcessBuffer { kDecodeCounters, kGemvBulk, kGemvTma, kLutXt, kCount };

// The buffer of `which` on `device` (the current device), at least `bytes` long; nullptr where it
// cannot be had: a graph capture is in progress on the device's stream before the first eager call
// made it (an allocation cannot join a capture; the first call of a process is never captured), the
// allocation failed, or an earlier call made it smaller. Callers then take a path without it.
inline void* zeroed_process_buffer(int device, ProcessBuffer which, size_t bytes) {
  constexpr int kDevices = 64, kKinds = static_cast<int>(ProcessBuffer::kCount);
  static std::mutex mu;
  static void* buffers[kDevices][kKinds] = {};
  static size_t sizes[kDevices][kKinds] = {};
  const int k = static_cast<int>(which);
  if (device < 0 || device >= kDevices) return nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (buffers[device][k]) return sizes[device][k] >= bytes ? buffers[device][k] : nullptr;
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(cuda_stream(device), &st) != cudaSuccess || st != cudaStreamCaptureStatusNone) return nullptr;
  void* p = nullptr;
  if (cudaMalloc(&p, bytes) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  if (cudaMemset(p, 0, bytes) != cudaSuccess) {
    cudaGetLastError();
    cudaFree(p);
    return nullptr;
  }
  buffers[device][k] = p;
  sizes[device][k] = bytes;
  return p;
}

}  // namespace sqz::cuda
