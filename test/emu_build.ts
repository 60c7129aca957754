/**
 * Builds and runs the host kernel emulator's programs (test/emu): g++ (C++20) with the CUDA headers
 * for __half and dim3. Where either is missing, describeEmu skips.
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

// Builds one emulator program (g++, C++20, the CUDA headers for __half and dim3) and runs it; its
// last line must report no failure. extraInclude comes first on the include path (shim/: the
// emulator's ptx.cuh and pdl.cuh).
export function buildAndRun(main: string, sources: string[], extraInclude?: string): string {
  const root = path.join(__dirname, '..');
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-emu-')), 'emu');
  try {
    const includes = [...(extraInclude ? [extraInclude] : []), path.join(__dirname, 'emu'), path.join(root, 'csrc'), cudaInc as string];
    execFileSync('g++', ['-std=c++20', '-O1', '-pthread', ...includes.map((d) => `-I${d}`), path.join(__dirname, 'emu', main),
      ...sources.map((s) => path.join(root, s)), '-o', out], { stdio: 'pipe' });
    const r = spawnSync(out, [], { encoding: 'utf8', maxBuffer: 1 << 24 });
    const failedLines = r.stdout.split('\n').filter((l) => l.startsWith('FAIL'));
    if (failedLines.length) throw new Error(`${main}: ${failedLines.join('\n')}\n${r.stdout.split('\n')[0]}`);
    expect(r.stdout).toMatch(/emu: \d+ passed, 0 failed/);
    expect(r.status).toBe(0);
    return r.stdout;
  } finally {
    fs.rmSync(path.dirname(out), { recursive: true, force: true });
  }
}

const cudaInc = cudaInclude();
const gxx = spawnSync('g++', ['--version']).status === 0;
export const describeEmu = cudaInc && gxx ? describe : describe.skip;
