// The device layer: which devices exist, memory, copies, and ordering. The CUDA backend
// implements it in cuda_backend_cuda.cc; a CPU-only build links cuda_backend_nocuda.cc,
// which reports no CUDA devices and why.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tensor.h"

namespace sqz {

struct DeviceInfo {
  std::string id;    // "cpu", "cuda:0", ...
  std::string name;  // CPU model or GPU name
  int64_t total_memory = 0;
  int64_t free_memory = 0;
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  int64_t l2_bytes = 0;
  int threads = 0;  // CPU threads used by the CPU backend
};

// True when this addon was compiled with the CUDA backend.
bool cuda_compiled();
// Visible CUDA devices (0 when not compiled, none visible, or SQUEEZELM_DEVICE=cpu).
int cuda_device_count();
// Why CUDA is not available ("" when it is).
std::string cuda_unavailable_reason();
std::vector<DeviceInfo> cuda_device_infos();

// Device memory through a caching pool (never called for CPU).
void* cuda_alloc(int device, size_t bytes);  // throws ERR_OUT_OF_MEMORY
void cuda_free(int device, void* ptr, size_t bytes);
struct PoolStats { int64_t allocated = 0, cached = 0, reserved = 0, peak = 0; };
PoolStats cuda_pool_stats(int device);
void cuda_empty_cache(int device);

// Stream-ordered copies on the device's stream. host_* pointers are pageable host memory.
void cuda_copy_h2d(int device, void* dst, const void* host_src, size_t bytes);
void cuda_copy_d2h_sync(int device, void* host_dst, const void* src, size_t bytes);
void cuda_copy_d2d(int device, void* dst, const void* src, size_t bytes);
void cuda_memset(int device, void* dst, int value, size_t bytes);
void cuda_synchronize(int device);  // throws ERR_CUDA on a sticky error
// Checks for a launch error right after a kernel launch; throws ERR_CUDA naming the op.
void cuda_check_launch(int device, const char* op);

// Graph capture of everything queued on the device's stream between begin and end.
void cuda_capture_begin(int device);
void* cuda_capture_end(int device);  // returns an executable graph handle
void cuda_graph_launch(int device, void* graph);
void cuda_graph_destroy(void* graph);
bool cuda_capturing(int device);

// Stream-ordered readback of a small device buffer (at most kReadbackMax bytes): the copy is
// queued now, behind the work already on the device's stream and ahead of anything queued later,
// into pinned host memory; cuda_readback_wait (any thread) blocks until it has landed, copies it
// out and releases the handle. Later work on the stream never waits for the reader. ERR_STATE
// while the device is capturing a graph.
constexpr size_t kReadbackMax = 1 << 20;
void* cuda_readback_begin(int device, const void* src, size_t bytes);
void cuda_readback_wait(void* handle, void* host_dst, size_t bytes);
void cuda_readback_release(void* handle);  // without waiting for the data (error paths)

// Events for timing.
void* cuda_event_create(int device);
void cuda_event_record(int device, void* ev);
float cuda_event_elapsed_ms(void* start, void* end);
void cuda_event_destroy(void* ev);

}  // namespace sqz
