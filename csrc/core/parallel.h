// CPU parallelism for the reference backend: a fixed pool of worker threads and a
// parallel_for that splits [0, n) into chunks. Nested calls run inline, so an op may
// call helpers that themselves use parallel_for.
#pragma once
#include <cstdint>
#include <functional>

namespace sqz {

// Number of threads parallel_for uses (SQUEEZELM_THREADS overrides hardware_concurrency).
int cpu_threads();

// Calls fn(begin, end) over disjoint chunks covering [0, n); chunks hold >= grain items.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace sqz
