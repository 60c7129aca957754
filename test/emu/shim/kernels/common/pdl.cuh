// The emulator's pdl.cuh (see ptx.cuh here): both launches run the kernel in the emulator, at
// once, with the dynamic shared memory poisoned first (a kernel that reads shared memory it never
// wrote then sees NaN patterns, not zeros).
#pragma once
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <utility>

#include "core/cuda_stream.h"

namespace sqz::cuda {

inline void pdl_wait() {}
inline void pdl_trigger() {}
inline bool pdl_enabled() { return false; }
inline bool pdl_for(cudaStream_t) { return false; }

template <class... KArgs, class... Args>
void launch_plain(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  if (smem > sizeof(::emu::g_dynamic_smem)) throw std::runtime_error("emulated launch: too much dynamic shared memory");
  std::memset(::emu::g_dynamic_smem, 0xff, sizeof(::emu::g_dynamic_smem));
  ::emu::run(grid, block, [&] { kernel(KArgs(args)...); });
}
template <class... KArgs, class... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  launch_plain(kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace sqz::cuda
