/**
 * Builds and runs the host kernel emulator's programs (test/emu): g++ (C++20) with the CUDA headers
 * for __half and dim3. Where either is missing, and in GPU runs (REQUIRE_GPU=1), describeEmu skips.
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

// Builds one emulator program (g++, C++20, the CUDA headers for __half and dim3) and runs it; no line
// of its output may start with FAIL and its last line must report no failure. sources: host C++
// linked in (the CPU ops); extraInclude comes first on the include path (shim/: the emulator's
// ptx.cuh, pdl.cuh and bulk_copy.cuh); emulated: .cu files compiled as translation units of their
// own with cuda_emu.h in front (where one program needs several .cu files); defines: -D flags of every
// translation unit (NAME=VALUE).
export function buildAndRun(main: string, sources: string[], extraInclude?: string, emulated: string[] = [],
  defines: string[] = []): string {
  const root = path.join(__dirname, '..');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-emu-'));
  const out = path.join(dir, 'emu');
  try {
    const includes = [...(extraInclude ? [extraInclude] : []), path.join(__dirname, 'emu'), path.join(root, 'csrc'), cudaInc as string];
    const flags = ['-std=c++20', '-O1', '-pthread', ...includes.map((d) => `-I${d}`), ...defines.map((d) => `-D${d}`)];
    const objects = emulated.map((src, i) => {
      const o = path.join(dir, `tu${i}.o`);
      execFileSync('g++', [...flags, '-c', '-x', 'c++', '-include', path.join(__dirname, 'emu', 'cuda_emu.h'), path.join(root, src), '-o', o],
        { stdio: 'pipe' });
      return o;
    });
    execFileSync('g++', [...flags, path.join(__dirname, 'emu', main), ...objects, ...sources.map((s) => path.join(root, s)), '-o', out],
      { stdio: 'pipe' });
    // the program draws fresh inputs from its seed (printed first); SQUEEZELM_TEST_SEED replays one
    const seed = process.env.SQUEEZELM_TEST_SEED;
    const r = spawnSync(out, seed ? [seed] : [], { encoding: 'utf8', maxBuffer: 1 << 24 });
    const failedLines = r.stdout.split('\n').filter((l) => l.startsWith('FAIL'));
    if (failedLines.length) throw new Error(`${main}: ${failedLines.join('\n')}\n${r.stdout.split('\n')[0]}`);
    expect(r.stdout).toMatch(/emu: \d+ passed, 0 failed/);
    expect(r.status).toBe(0);
    return r.stdout;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const cudaInc = cudaInclude();
const gxx = spawnSync('g++', ['--version']).status === 0;
// A GPU run (REQUIRE_GPU=1, npm run test:gpu) tests the kernels themselves: the emulator's minutes
// of CPU time are left out there.
export const describeEmu = cudaInc && gxx && process.env.REQUIRE_GPU !== '1' ? describe : describe.skip;
