/**
 * The CUDA kernels written without a GPU at hand (batched LoRA, Squeezed Attention) run in the
 * host kernel emulator (test/emu/cuda_emu.h: a block's threads as OS threads, its barriers and warp
 * shuffles on the CPU) against float64 references. The KVQuant and SqueezeLLM launchers have
 * suites of their own there (emu_kvquant.test.ts, emu_lut.test.ts). Where no C++20 compiler or no
 * CUDA headers (for __half, dim3) are present these suites skip; they run where the addon builds
 * with CUDA. The GPU suites still have the last word on these kernels.
 */
import { buildAndRun, describeEmu } from './emu_build';

describeEmu('CUDA kernels in the host emulator', () => {
  test('batched LoRA and Squeezed Attention kernels match float64 references', () => {
    buildAndRun('kernels_emu.cc', []);
  });
});
