/**
 * GPU suites: `describeGpu` runs its tests only where a CUDA device is visible; with
 * REQUIRE_GPU=1 a missing device fails the suite at load instead of skipping it.
 */
import { devices } from '../ts/device';
import { mulberry32 } from '../ts/util/random';

// Math and Number as module constants: jest runs a test file in a sandbox whose global object
// makes every lookup of a global in a hot loop slow (randn of 6M values took 6.1 s through the
// global Math, 0.26 s through this binding, with the same bits). The test files do the same.
const Math = globalThis.Math, Number = globalThis.Number;

export function gpuAvailable(): boolean {
  return devices().some((d) => d.type === 'cuda');
}

export const describeGpu: (name: string, fn: () => void) => void = (name, fn) => {
  const ok = gpuAvailable();
  if (!ok && process.env.REQUIRE_GPU === '1')
    throw new Error(`REQUIRE_GPU=1 but no CUDA device is usable: ${devices()[0].cudaUnavailable ?? 'unknown reason'}`);
  (ok ? describe : describe.skip)(name, fn);
};

/** Relative L2 error ||a - b|| / ||b||. */
export function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0, den = 0;
  for (let i = 0; i < b.length; i++) {
    const d = a[i] - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  if (!Number.isFinite(num)) return Infinity;
  return Math.sqrt(num / Math.max(den, 1e-30));
}

/** Largest absolute difference over the largest |b| (Infinity when a has a non-finite value). */
export function maxAbsErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let d = 0, s = 0;
  for (let i = 0; i < b.length; i++) {
    if (!Number.isFinite(a[i])) return Infinity;
    d = Math.max(d, Math.abs(a[i] - b[i]));
    s = Math.max(s, Math.abs(b[i]));
  }
  return d / Math.max(s, 1e-30);
}

/** Deterministic pseudo-random numbers for tests (mulberry32), fresh per seed. */
export const rng = mulberry32;

export function randn(n: number, r: () => number, scale = 1): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u = Math.max(r(), 1e-12), v = r();
    const m = Math.sqrt(-2 * Math.log(u)) * scale;
    out[i] = m * Math.cos(2 * Math.PI * v);
    if (i + 1 < n) out[i + 1] = m * Math.sin(2 * Math.PI * v);
  }
  return out;
}

/**
 * A fresh seed per run, printed on failure by the caller; SQUEEZELM_TEST_SEED=n replays a failed
 * run's inputs.
 */
export function freshSeed(): number {
  const fixed = process.env.SQUEEZELM_TEST_SEED;
  if (fixed !== undefined && /^\d+$/.test(fixed)) return Number(fixed) >>> 0;
  return (Date.now() ^ (Math.random() * 0x7fffffff)) >>> 0;
}
