// Facts about the current CUDA device that launchers size grids by (cached per device).
#pragma once

namespace sqz::cuda {

// Multiprocessors of the current device.
int current_sm_count();

}  // namespace sqz::cuda
