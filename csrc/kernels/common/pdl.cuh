// Programmatic dependent launch (Hopper): the next kernel of a decode step is launched while
// the current one is still running, its blocks take the SM slots the current one frees, and it
// waits in griddepcontrol.wait until the current grid has completed and its writes are visible.
// That hides the launch latency and the ramp-up/drain of ~10 kernels per layer, which is what
// separates a decode step from the bandwidth floor once each GEMV is near full speed.
//
// The contract for a kernel launched through launch_pdl():
//   - it calls pdl_wait() before it reads anything an earlier kernel writes and before its first
//     global write (reading weights or prefetching them before the wait is the point);
//   - it calls pdl_wait() on every path, even when it needs nothing from its predecessor: a grid
//     that finished without waiting would let the kernel after it run ahead of the one before.
// pdl_trigger() lets the next kernel launch early; the wait still covers this grid's writes.
// Kernels launched the ordinary way may call both: they are no-ops without the attribute.
// SQUEEZELM_NO_PDL=1 turns the attribute off (A/B measurements); pre-Hopper devices never get it.
//
// Launches captured into a CUDA graph go without it (SQUEEZELM_GRAPH_PDL=1 keeps it): replayed
// graphs already start each kernel right after the previous one, and there the early launch
// measured slower on the H200 (LLaMA-2-7B decode step at context 512: 3948 us without, 3969 us
// with; the 8B GQA shape 4580 vs 4640 us), while ordinary launches still gain from it (4199 ->
// 4026 us).
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

#include "core/cuda_stream.h"

namespace sqz::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}


// True when launches on the current device may carry the PDL attribute.
bool pdl_enabled();
// True when a launch on `stream` should carry it: pdl_enabled() and, unless SQUEEZELM_GRAPH_PDL=1,
// the stream is not capturing a graph.
bool pdl_for(cudaStream_t stream);

template <class... KArgs, class... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_for(stream) ? 1 : 0;
  cuda_check(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...), "kernel launch");
}

}  // namespace sqz::cuda
