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
// Inside a CUDA graph capture the dense fp16/bf16 GEMVs launch without it and every other kernel
// with it (SQUEEZELM_GRAPH_PDL=0: none with it, =1: all). Measured on the H200 with graph replay:
// a LLaMA-2-7B fp16 decode step at context 512 took 3955 us with no PDL in the graph, 3986 us with
// it for every kernel and 3959 us as shipped (the 8B GQA shape 4555 / 4607 / 4573 us), while a
// step over SqueezeLLM LUT kernels was faster with it (8 layers: 770 / 724 / 725 us); ordinary
// launches gain from it in both.
// Why the early launch of a dense GEMV loses inside a graph was not established.
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
// Whether a launch inside a graph capture carries the attribute by default (see above).
enum class GraphPdl { On, Off };
// True when a launch on `stream` should carry it: pdl_enabled(), and while the stream captures a
// graph, SQUEEZELM_GRAPH_PDL (0 / 1) or else the launch's own default.
bool pdl_for(cudaStream_t stream, GraphPdl in_graph);

template <class... KArgs, class... Args>
void launch_pdl(GraphPdl in_graph, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_for(stream, in_graph) ? 1 : 0;
  cuda_check(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...), "kernel launch");
}

template <class... KArgs, class... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  launch_pdl(GraphPdl::On, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace sqz::cuda
