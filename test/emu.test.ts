/**
 * The CUDA kernels written without a GPU at hand (batched LoRA, Squeezed Attention) run in the
 * host kernel emulator (test/emu/cuda_emu.h: threads, barriers and warp shuffles on the CPU)
 * against float64 references. Where no C++20 compiler or no CUDA headers (for __half, dim3) are
 * present the suite skips; it runs where the addon builds with CUDA. The GPU suites still have the
 * last word on these kernels.
 */
import { execFileSync, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

function cudaInclude(): string | undefined {
  const cands = [process.env.CUDA_HOME, process.env.CUDA_PATH, '/usr/local/cuda'].filter(Boolean) as string[];
  try {
    const nvcc = execFileSync('sh', ['-c', 'command -v nvcc'], { encoding: 'utf8' }).trim();
    if (nvcc) {
      // a wrapper script may exec the real nvcc: take the toolkit from its text, else from its folder
      const text = fs.readFileSync(nvcc, 'utf8');
      const m = /(\/\S+)\/bin\/nvcc/.exec(text);
      if (m) cands.push(m[1]);
      cands.push(path.dirname(path.dirname(fs.realpathSync(nvcc))));
    }
  } catch {
    // no nvcc on the PATH
  }
  return cands.map((c) => path.join(c, 'include')).find((d) => fs.existsSync(path.join(d, 'cuda_fp16.h')));
}

const inc = cudaInclude();
const gxx = spawnSync('g++', ['--version']).status === 0;
const describeEmu = inc && gxx ? describe : describe.skip;

describeEmu('CUDA kernels in the host emulator', () => {
  test('batched LoRA and Squeezed Attention kernels match float64 references', () => {
    const root = path.join(__dirname, '..');
    const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-emu-')), 'kernels_emu');
    try {
      execFileSync('g++', ['-std=c++20', '-O1', '-pthread', `-I${path.join(root, 'csrc')}`, `-I${inc}`,
        path.join(__dirname, 'emu', 'kernels_emu.cc'), '-o', out], { stdio: 'pipe' });
      const r = spawnSync(out, [], { encoding: 'utf8' });
      expect(r.stdout).toMatch(/emu: \d+ passed, 0 failed/);
      expect(r.status).toBe(0);
    } finally {
      fs.rmSync(path.dirname(out), { recursive: true, force: true });
    }
  });
});
