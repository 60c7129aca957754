// The CUDA device layer: device discovery, one non-blocking stream per device, a caching
// memory pool, copies, graph capture and events. Linked against the static CUDA runtime.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "cuda_stream.h"
#include "error.h"

namespace sqz {
namespace {

bool forced_cpu() {
  const char* d = std::getenv("SQUEEZELM_DEVICE");
  return d && std::string(d) == "cpu";
}

struct DeviceState {
  cudaStream_t stream = nullptr;
  // Caching pool: freed blocks are kept by rounded size and handed out again. Every op of a
  // device runs on its single stream, so a block freed by one op can be reused by the next
  // queued op without synchronisation (stream order protects it).
  std::multimap<size_t, void*> free_blocks;
  int64_t allocated = 0, cached = 0, peak = 0;
  int64_t total_memory = 0;
  cudaGraph_t capturing_graph = nullptr;
  bool capturing = false;
};

std::mutex g_mutex;
std::vector<DeviceState>* g_devices = nullptr;
int g_count = -1;
std::string g_reason;

void init_locked() {
  if (g_count >= 0) return;
  g_devices = new std::vector<DeviceState>();
  if (forced_cpu()) {
    g_count = 0;
    g_reason = "disabled by SQUEEZELM_DEVICE=cpu";
    return;
  }
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    cudaGetLastError();
    g_count = 0;
    g_reason = e != cudaSuccess ? std::string("no usable CUDA device: ") + cudaGetErrorString(e)
                                : "no CUDA device is visible";
    return;
  }
  g_count = n;
  g_devices->resize(n);
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) == cudaSuccess) (*g_devices)[i].total_memory = (int64_t)p.totalGlobalMem;
  }
}

DeviceState& state(int device) {
  std::lock_guard<std::mutex> lk(g_mutex);
  init_locked();
  if (device < 0 || device >= g_count)
    fail("ERR_DEVICE", "cuda:" + std::to_string(device) + " does not exist (" + std::to_string(g_count) +
                           " CUDA device(s) visible)");
  return (*g_devices)[device];
}

size_t round_size(size_t bytes) {
  if (bytes <= (1u << 20)) return std::max<size_t>(512, (bytes + 511) & ~size_t(511));
  return (bytes + (2u << 20) - 1) & ~size_t((2u << 20) - 1);
}

}  // namespace

cudaStream_t cuda_stream(int device) {
  DeviceState& s = state(device);
  if (!s.stream) {
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  cudaSetDevice(device);
  return s.stream;
}

bool cuda_compiled() { return true; }

int cuda_device_count() {
  std::lock_guard<std::mutex> lk(g_mutex);
  init_locked();
  return g_count;
}

std::string cuda_unavailable_reason() {
  std::lock_guard<std::mutex> lk(g_mutex);
  init_locked();
  return g_reason;
}

std::vector<DeviceInfo> cuda_device_infos() {
  std::vector<DeviceInfo> out;
  int n = cuda_device_count();
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    DeviceInfo d;
    d.id = "cuda:" + std::to_string(i);
    d.name = p.name;
    d.total_memory = (int64_t)p.totalGlobalMem;
    size_t fr = 0, tot = 0;
    cudaSetDevice(i);
    if (cudaMemGetInfo(&fr, &tot) == cudaSuccess) d.free_memory = (int64_t)fr;
    d.sm_count = p.multiProcessorCount;
    d.cc_major = p.major;
    d.cc_minor = p.minor;
    d.l2_bytes = p.l2CacheSize;
    out.push_back(d);
  }
  return out;
}

void* cuda_alloc(int device, size_t bytes) {
  DeviceState& s = state(device);
  size_t sz = round_size(bytes);
  std::lock_guard<std::mutex> lk(g_mutex);
  auto it = s.free_blocks.lower_bound(sz);
  // Reuse a cached block if it is not wastefully larger than asked.
  if (it != s.free_blocks.end() && it->first <= sz + sz / 8 + 512) {
    void* p = it->second;
    s.cached -= (int64_t)it->first;
    s.free_blocks.erase(it);
    s.allocated += (int64_t)sz;
    s.peak = std::max(s.peak, s.allocated);
    return p;
  }
  if ((int64_t)sz > s.total_memory)
    fail("ERR_OUT_OF_MEMORY", "cannot allocate " + std::to_string(bytes) + " bytes on cuda:" + std::to_string(device) +
                                  ", which has " + std::to_string(s.total_memory) + " bytes in all");
  cudaSetDevice(device);
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, sz);
  if (e == cudaErrorMemoryAllocation && !s.free_blocks.empty() && !s.capturing) {
    cudaGetLastError();
    // Give the cache back to the driver and try once more.
    cudaStreamSynchronize(s.stream);
    for (auto& kv : s.free_blocks) cudaFree(kv.second);
    s.free_blocks.clear();
    s.cached = 0;
    e = cudaMalloc(&p, sz);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    fail("ERR_OUT_OF_MEMORY", "cannot allocate " + std::to_string(bytes) + " bytes on cuda:" + std::to_string(device) +
                                  " (" + std::to_string(fr) + " of " + std::to_string(tot) + " bytes free)");
  }
  s.allocated += (int64_t)sz;
  s.peak = std::max(s.peak, s.allocated);
  return p;
}

void cuda_free(int device, void* ptr, size_t bytes) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lk(g_mutex);
  if (!g_devices || device >= (int)g_devices->size()) return;
  DeviceState& s = (*g_devices)[device];
  size_t sz = round_size(bytes);
  s.allocated -= (int64_t)sz;
  s.cached += (int64_t)sz;
  s.free_blocks.emplace(sz, ptr);
}

PoolStats cuda_pool_stats(int device) {
  DeviceState& s = state(device);
  std::lock_guard<std::mutex> lk(g_mutex);
  PoolStats p;
  p.allocated = s.allocated;
  p.cached = s.cached;
  p.reserved = s.allocated + s.cached;
  p.peak = s.peak;
  return p;
}

void cuda_empty_cache(int device) {
  DeviceState& s = state(device);
  cudaStream_t st = cuda_stream(device);
  cuda_check(cudaStreamSynchronize(st), "cudaStreamSynchronize");
  std::lock_guard<std::mutex> lk(g_mutex);
  for (auto& kv : s.free_blocks) cudaFree(kv.second);
  s.free_blocks.clear();
  s.cached = 0;
}

void cuda_copy_h2d(int device, void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cuda_stream(device)), "copy to device");
}

void cuda_copy_d2h_sync(int device, void* dst, const void* src, size_t bytes) {
  cudaStream_t st = cuda_stream(device);
  if (bytes) cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st), "copy to host");
  cuda_check(cudaStreamSynchronize(st), "copy to host");
}

void cuda_copy_d2d(int device, void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda_stream(device)), "device copy");
}

void cuda_memset(int device, void* dst, int value, size_t bytes) {
  if (!bytes) return;
  cuda_check(cudaMemsetAsync(dst, value, bytes, cuda_stream(device)), "memset");
}

void cuda_synchronize(int device) {
  cuda_check(cudaStreamSynchronize(cuda_stream(device)), "synchronize");
}

void cuda_check_launch(int device, const char* op) {
  (void)device;
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail("ERR_CUDA", std::string(op) + ": kernel launch failed: " + cudaGetErrorString(e));
}

void cuda_capture_begin(int device) {
  DeviceState& s = state(device);
  cudaStream_t st = cuda_stream(device);
  if (s.capturing) fail("ERR_STATE", "cuda:" + std::to_string(device) + " is already capturing a graph");
  cuda_check(cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
  s.capturing = true;
}

void* cuda_capture_end(int device) {
  DeviceState& s = state(device);
  cudaStream_t st = cuda_stream(device);
  if (!s.capturing) fail("ERR_STATE", "cuda:" + std::to_string(device) + " is not capturing a graph");
  s.capturing = false;
  cudaGraph_t g = nullptr;
  cuda_check(cudaStreamEndCapture(st, &g), "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
  cudaGraphDestroy(g);
  cuda_check(e, "cudaGraphInstantiate");
  return exec;
}

bool cuda_capturing(int device) { return state(device).capturing; }

void cuda_graph_launch(int device, void* graph) {
  cuda_check(cudaGraphLaunch((cudaGraphExec_t)graph, cuda_stream(device)), "cudaGraphLaunch");
}

void cuda_graph_destroy(void* graph) {
  if (graph) cudaGraphExecDestroy((cudaGraphExec_t)graph);
}

namespace {
// A pinned staging buffer and the event that marks its copy done; kept for reuse (pinned
// allocation costs tens of microseconds, a decode step reads its tokens every few milliseconds).
struct Readback {
  void* host = nullptr;
  size_t capacity = 0;
  cudaEvent_t done = nullptr;
  int device = 0;
};
std::mutex g_readback_mutex;
std::vector<Readback*> g_readback_free;

Readback* readback_get(int device, size_t bytes) {
  {
    std::lock_guard<std::mutex> lk(g_readback_mutex);
    for (size_t i = 0; i < g_readback_free.size(); ++i) {
      Readback* r = g_readback_free[i];
      if (r->device == device && r->capacity >= bytes) {
        g_readback_free.erase(g_readback_free.begin() + (long)i);
        return r;
      }
    }
  }
  auto* r = new Readback();
  r->device = device;
  r->capacity = std::max<size_t>(256, bytes);
  int cur = 0;
  cudaGetDevice(&cur);
  if (cur != device) cudaSetDevice(device);
  cudaError_t e = cudaHostAlloc(&r->host, r->capacity, cudaHostAllocDefault);
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&r->done, cudaEventDisableTiming);
  if (cur != device) cudaSetDevice(cur);
  if (e != cudaSuccess) {
    if (r->host) cudaFreeHost(r->host);
    delete r;
    cuda_check(e, "readback staging");
  }
  return r;
}

void readback_put(Readback* r) {
  std::lock_guard<std::mutex> lk(g_readback_mutex);
  g_readback_free.push_back(r);
}
}  // namespace

void* cuda_readback_begin(int device, const void* src, size_t bytes) {
  if (bytes > kReadbackMax)
    fail("ERR_ARG", "readback: " + std::to_string(bytes) + " bytes is more than " + std::to_string(kReadbackMax) + " (use toArray)");
  if (cuda_capturing(device)) fail("ERR_STATE", "readback: cuda:" + std::to_string(device) + " is capturing a graph");
  Readback* r = readback_get(device, bytes);
  cudaStream_t st = cuda_stream(device);
  cudaError_t e = bytes ? cudaMemcpyAsync(r->host, src, bytes, cudaMemcpyDeviceToHost, st) : cudaSuccess;
  if (e == cudaSuccess) e = cudaEventRecord(r->done, st);
  if (e != cudaSuccess) {
    readback_put(r);
    cuda_check(e, "readback");
  }
  return r;
}

void cuda_readback_wait(void* handle, void* host_dst, size_t bytes) {
  auto* r = static_cast<Readback*>(handle);
  const cudaError_t e = cudaEventSynchronize(r->done);
  if (e == cudaSuccess && bytes) std::memcpy(host_dst, r->host, bytes);
  readback_put(r);
  cuda_check(e, "readback");
}

void cuda_readback_release(void* handle) {
  if (!handle) return;
  auto* r = static_cast<Readback*>(handle);
  cudaEventSynchronize(r->done);  // the copy may still be landing in the buffer
  cudaGetLastError();
  readback_put(r);
}

void* cuda_event_create(int device) {
  cuda_stream(device);
  cudaEvent_t ev;
  cuda_check(cudaEventCreate(&ev), "cudaEventCreate");
  return ev;
}

void cuda_event_record(int device, void* ev) {
  cuda_check(cudaEventRecord((cudaEvent_t)ev, cuda_stream(device)), "cudaEventRecord");
}

float cuda_event_elapsed_ms(void* a, void* b) {
  float ms = 0;
  cuda_check(cudaEventSynchronize((cudaEvent_t)b), "cudaEventSynchronize");
  cuda_check(cudaEventElapsedTime(&ms, (cudaEvent_t)a, (cudaEvent_t)b), "cudaEventElapsedTime");
  return ms;
}

void cuda_event_destroy(void* ev) {
  if (ev) cudaEventDestroy((cudaEvent_t)ev);
}

}  // namespace sqz
