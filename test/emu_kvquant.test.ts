/**
 * The KVQuant CUDA launchers (csrc/kernels/kvquant/kvquant.cu, whole: planning, the three attention
 * kernels and their split combine, quantize-and-append, rope-append, dequantize) compiled for the
 * host and run in the kernel emulator, against the CPU ops of the same signature on fresh random
 * caches (test/emu/kvquant_emu.cc). The tensor-core kernels' mma, ldmatrix, movmatrix and cp.async
 * come from test/emu/shim/kernels/common/ptx.cuh. The GPU suite (kvquant_gpu.test.ts) still has
 * the last word: the emulator checks what the kernels compute, not the memory model or speed.
 */
import * as path from 'path';
import { buildAndRun, describeEmu } from './emu_build';

describeEmu('KVQuant CUDA launchers in the host emulator', () => {
  test('append, rope-append and dequantize bytes and attention values match the CPU ops', () => {
    buildAndRun('kvquant_emu.cc', ['csrc/cpu/kvquant.cc', 'csrc/cpu/vec.cc', 'csrc/core/tensor.cc', 'csrc/core/parallel.cc',
      'csrc/core/cuda_backend_nocuda.cc'], path.join(__dirname, 'emu', 'shim'));
  });
});
