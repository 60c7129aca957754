/**
 * The paged fp16/bf16 attention launchers (csrc/kernels/attention: append, the split-KV decode kernels
 * with their in-kernel merge, the tensor-core decode, prefill) compiled for the host, each .cu file a
 * translation unit of its own, and run in the kernel emulator against the CPU ops of the same
 * signature on fresh random caches (test/emu/attention_emu.cc). The GPU suite (attention.test.ts)
 * still has the last word: the emulator checks what the kernels compute, not the memory model or speed.
 */
import * as path from 'path';
import { buildAndRun, describeEmu } from './emu_build';

describeEmu('attention CUDA launchers in the host emulator', () => {
  test('append bytes and decode / prefill attention match the CPU ops', () => {
    buildAndRun('attention_emu.cc', ['csrc/cpu/attention.cc', 'csrc/cpu/vec.cc', 'csrc/core/tensor.cc', 'csrc/core/parallel.cc',
      'csrc/core/cuda_backend_nocuda.cc'], path.join(__dirname, 'emu', 'shim'),
    ['append', 'attention', 'decode', 'decode_mma', 'prefill'].map((f) => `csrc/kernels/attention/${f}.cu`),
    // as an sm_90a build on a compute capability 9.0 device: the TMA decode kernels run
    ['SQUEEZELM_CUDA_ARCHS_STR="90a"']);
  });
});
