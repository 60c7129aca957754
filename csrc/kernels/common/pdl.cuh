// Programmatic dependent launch (Hopper): the next kernel of a decode step is launched while
// the current one is still running, its blocks take the SM slots the current one frees, and it
// waits in griddepcontrol.wait until the current grid has completed and its writes are visible.
// That hides the launch latency and the ramp-up/drain of ~10 kernels per layer, which is what
// separates a decode step from the bandwidth floor once each GEMV is near full speed.
//
// The contract for a kernel launched through launch_pdl():
//   - it calls pdl_wait() before it reads anything an earlier kernel writes and before its first
//     global write (loading weights into registers or shared memory before the wait is the point);
//   - it calls pdl_wait() on every path, even when it needs nothing from its predecessor: a grid
//     that finished without waiting would let the kernel after it run ahead of the one before.
// pdl_trigger() lets the next kernel launch early; the wait still covers this grid's writes.
// Kernels launched the ordinary way may call both: they are no-ops without the attribute.
// SQUEEZELM_NO_PDL=1 turns the attribute off (A/B measurements); pre-Hopper devices never get it.
//
// Graph captures keep the attribute (SQUEEZELM_GRAPH_PDL=0 drops it there, for A/B runs).
//
// What a kernel does before its wait matters. The dense GEMVs used to prefetch their first round
// of weights into L2 there. Every kernel triggers its successor right after its own wait, so that
// prefetch ran a whole GEMV ahead, while the previous GEMV streamed its weights through L2 and
// evicted the lines again: DRAM bandwidth spent twice. On the H200 (LLaMA-2-7B fp16, batch 1,
// context 512, graph replay, one process) the step took 3971 us with the prefetch (dense GEMVs then
// launched without PDL inside graphs, their best setting with it) and 3831 us without it and with
// PDL for every kernel (3884 us without it and without PDL for the GEMVs; 8B GQA: 4609 / 4450 us;
// ordinary launches 4032 / 3898 us). Pulling the o projection's weights into L2 from the
// latency-bound attention kernel instead also lost (3895 us with half the L2 of them): the bytes
// are read once either way, and the prefetch slowed attention. The SqueezeLLM LUT kernels load
// their first codes into registers and shared memory before the wait, which cannot be evicted,
// and gain from it (8 layers: 725 us against 770 without PDL).
//
// Where a kernel triggers matters too. The dense GEMVs do not: their successor launches as they
// exit. Same process, H200, graph replay, trigger right after the wait / after the main loop /
// none: 7B step 3829 / 3808 / 3825 us, 8B GQA 4449 / 4410 / 4439 us, 7B batch 8 5110 / 5127 /
// 5050 us; the GEMV benchmark's M = 16 4096x4096 13.66 / 13.69 / 12.65 us and M = 1 4096x11008
// 23.4 / 29.1 / 23.5 us. Early-launched blocks hold SM slots a multi-wave grid still needs.
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
// True when a launch on `stream` should carry it: pdl_enabled(), unless the stream captures a
// graph and SQUEEZELM_GRAPH_PDL=0 (the capture state is only asked for when that is set).
bool pdl_for(cudaStream_t stream);

// launch_pdl: with the attribute where pdl_for allows it; launch_plain: without it (what
// <<<grid, block, smem, stream>>> does; a family launched only through these two can be run by the
// tests' host emulator, whose pdl.cuh stands in for this one).
template <class... KArgs, class... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
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
  cfg.numAttrs = pdl ? 1 : 0;
  cuda_check(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...), "kernel launch");
}
template <class... KArgs, class... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  launch_kernel(kernel, grid, block, smem, stream, pdl_for(stream), std::forward<Args>(args)...);
}
template <class... KArgs, class... Args>
void launch_plain(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  launch_kernel(kernel, grid, block, smem, stream, false, std::forward<Args>(args)...);
}

}  // namespace sqz::cuda
