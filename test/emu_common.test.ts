/**
 * The decode step's small CUDA ops (csrc/kernels/common: add, cast, siluMul, gatherRows, fillRandom,
 * rmsNorm, addRmsNorm, rope, ropeAppend, argmax, sample) compiled for the host, each .cu file a
 * translation unit of its own, and run in the kernel emulator against the CPU ops of the same
 * signature in f16, bf16 and f32 on fresh random inputs (test/emu/common_emu.cc). The GPU suite
 * (elementwise.test.ts, fused.test.ts) still has the last word.
 */
import * as path from 'path';
import { buildAndRun, describeEmu } from './emu_build';

describeEmu('elementwise, norm, RoPE and sampling CUDA ops in the host emulator', () => {
  test('match the CPU ops (integers and caches byte for byte)', () => {
    buildAndRun('common_emu.cc', ['csrc/cpu/elementwise.cc', 'csrc/cpu/fused.cc', 'csrc/cpu/sampling.cc', 'csrc/cpu/gemm.cc', 'csrc/cpu/vec.cc',
      'csrc/core/tensor.cc', 'csrc/core/parallel.cc', 'csrc/core/cuda_backend_nocuda.cc'], path.join(__dirname, 'emu', 'shim'),
    ['elementwise', 'norm', 'rope', 'fused', 'sampling'].map((f) => `csrc/kernels/common/${f}.cu`));
  });
});
