/**
 * The SqueezeLLM CUDA launchers (csrc/kernels/lut_gemm/lut_gemm.cu, whole: the repack, the pair-LUT
 * GEMVs with their code rings, mbarriers and bulk copies, the fused RMSNorm and the epilogues, the
 * tiled GEMM) compiled for the host and run in the kernel emulator against the CPU ops of the same
 * signature on fresh random weights (test/emu/lut_emu.cc). mma, ldmatrix, cp.async, the mbarriers
 * and the bulk copies come from test/emu/shim/kernels/common. The GPU suite (lut.test.ts) still has
 * the last word: the emulator checks what the kernels compute, not the memory model or speed (a
 * bulk copy lands when issued, so a missing wait on a full slot goes unseen here).
 */
import * as path from 'path';
import { buildAndRun, describeEmu } from './emu_build';

describeEmu('SqueezeLLM CUDA launchers in the host emulator', () => {
  test('repack bytes and LUT products (M 1..70, 3/4-bit, outliers, norm, epilogues) match the CPU ops', () => {
    buildAndRun('lut_emu.cc', ['csrc/cpu/lut_gemm.cc', 'csrc/cpu/vec.cc', 'csrc/cpu/elementwise.cc', 'csrc/cpu/gemm.cc', 'csrc/cpu/fused.cc',
      'csrc/core/tensor.cc', 'csrc/core/parallel.cc', 'csrc/core/cuda_backend_nocuda.cc'], path.join(__dirname, 'emu', 'shim'));
  });
});
