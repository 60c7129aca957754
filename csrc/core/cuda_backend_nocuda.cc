// The device layer of a CPU-only build: no CUDA devices, and a reason that says so.
#include "backend.h"
#include "error.h"

namespace sqz {

static const char* kNoCuda = "this squeezelm build has no CUDA backend (compiled without nvcc)";

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_unavailable_reason() { return kNoCuda; }
std::vector<DeviceInfo> cuda_device_infos() { return {}; }
void* cuda_alloc(int, size_t) { fail("ERR_DEVICE", kNoCuda); }
void cuda_free(int, void*, size_t) {}
PoolStats cuda_pool_stats(int) { return {}; }
void cuda_empty_cache(int) {}
void cuda_copy_h2d(int, void*, const void*, size_t) { fail("ERR_DEVICE", kNoCuda); }
void cuda_copy_d2h_sync(int, void*, const void*, size_t) { fail("ERR_DEVICE", kNoCuda); }
void cuda_copy_d2d(int, void*, const void*, size_t) { fail("ERR_DEVICE", kNoCuda); }
void cuda_memset(int, void*, int, size_t) { fail("ERR_DEVICE", kNoCuda); }
void cuda_synchronize(int) {}
void cuda_check_launch(int, const char*) {}
void cuda_capture_begin(int) { fail("ERR_DEVICE", kNoCuda); }
void* cuda_capture_end(int) { fail("ERR_DEVICE", kNoCuda); }
void cuda_graph_launch(int, void*) { fail("ERR_DEVICE", kNoCuda); }
void cuda_graph_destroy(void*) {}
bool cuda_capturing(int) { return false; }
void* cuda_readback_begin(int, const void*, size_t) { fail("ERR_DEVICE", kNoCuda); }
void cuda_readback_wait(void*, void*, size_t) { fail("ERR_DEVICE", kNoCuda); }
void cuda_readback_release(void*) {}
void* cuda_event_create(int) { fail("ERR_DEVICE", kNoCuda); }
void cuda_event_record(int, void*) { fail("ERR_DEVICE", kNoCuda); }
float cuda_event_elapsed_ms(void*, void*) { fail("ERR_DEVICE", kNoCuda); }
void cuda_event_destroy(void*) {}

}  // namespace sqz
