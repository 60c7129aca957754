// Error compensation with table refits (ts/quant/gptq.ts) on random layers with correlated inputs.
import { cholesky, gptqFactor, gptqRefit, gptqRefitReference, outputError } from '../ts/quant/gptq';
import { quantizeLinear, dequantize } from '../ts/quant/squeezellm';
import { rng, randn } from './gpu';

/** Inputs with correlated channels of uneven scale: x = z·Mix, M samples of K channels. */
function calibration(M: number, K: number, r: () => number): { x: Float32Array; h: Float64Array; sens: Float32Array } {
  const mix = randn(K * K, r, 1 / Math.sqrt(K));
  for (let k = 0; k < K; k++) mix[k * K + k] += 1;
  const scale = new Float32Array(K).map(() => Math.exp(1.5 * (r() - 0.5)));
  const z = randn(M * K, r, 1);
  const x = new Float32Array(M * K);
  for (let m = 0; m < M; m++)
    for (let j = 0; j < K; j++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += z[m * K + k] * mix[k * K + j];
      x[m * K + j] = s * scale[j];
    }
  const h = new Float64Array(K * K);
  for (let m = 0; m < M; m++)
    for (let i = 0; i < K; i++) for (let j = 0; j < K; j++) h[i * K + j] += (x[m * K + i] * x[m * K + j]) / M;
  const sens = Float32Array.from({ length: K }, (_, k) => h[k * K + k]);
  return { x, h, sens };
}

/** mean over samples and rows of (x·(w − q)ᵀ)². */
function sampleError(x: Float32Array, M: number, w: Float32Array, q: Float32Array, N: number, K: number): number {
  let s = 0;
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let y = 0;
      for (let k = 0; k < K; k++) y += x[m * K + k] * (w[n * K + k] - q[n * K + k]);
      s += y * y;
    }
  return s / M;
}

describe('gptq', () => {
  test('factor: Uᵀ U is the inverse of the damped, permuted H', () => {
    const r = rng(21), K = 24;
    const { h } = calibration(200, K, r);
    const f = gptqFactor(h, K, 0.01, true);
    // act order: the damped diagonal is non-increasing
    for (let i = 1; i < K; i++) expect(f.h[i * K + i]).toBeLessThanOrEqual(f.h[(i - 1) * K + i - 1] + 1e-12);
    for (let i = 0; i < K; i++)
      for (let j = 0; j < K; j++) {
        // (Uᵀ U H)_ij = δ_ij
        let s = 0;
        for (let a = 0; a < K; a++) {
          let hinv = 0;
          for (let b = 0; b < K; b++) hinv += f.u[b * K + i] * f.u[b * K + a];
          s += hinv * f.h[a * K + j];
        }
        expect(Math.abs(s - (i === j ? 1 : 0))).toBeLessThan(1e-8);
        if (j < i) expect(f.u[i * K + j]).toBe(0);
      }
    const l = cholesky(f.h, K);
    expect(l[1]).toBe(0);
  });

  for (const bits of [3, 4] as const)
    test(`${bits}-bit: compensation with refits lowers the calibration output error vs k-means`, async () => {
      const r = rng(30 + bits), N = 24, K = 64, M = 400;
      const { x, h, sens } = calibration(M, K, r);
      const w = randn(N * K, r, 0.05);
      for (let i = 0; i < 10; i++) w[Math.floor(r() * N * K)] = (r() - 0.5) * 0.8;
      const f = gptqFactor(h, K, 0.01);
      const opts = { bits, sens, outliers: 0.01, sensitive: 0.002, iters: 30 };
      const km = await quantizeLinear(w, N, K, opts);
      const rounds: number[] = [];
      for (const n of [0, 1, 3]) {
        const g = await quantizeLinear(w, N, K, { ...opts, gptq: f, gptqRounds: n });
        // same sparse pattern, still exact dense + sparse in the format
        expect(Array.from(g.cols!)).toEqual(Array.from(km.cols!));
        rounds.push(sampleError(x, M, w, dequantize(g), N, K));
      }
      const eKm = sampleError(x, M, w, dequantize(km), N, K);
      expect(rounds[0]).toBeLessThanOrEqual(eKm * 1.0001);
      expect(rounds[1]).toBeLessThan(0.9 * eKm);
      expect(rounds[2]).toBeLessThanOrEqual(rounds[1] * 1.0001);
      // outputError with the sample H agrees with the sampled error (H is the exact second moment)
      expect(Math.abs(outputError(w, dequantize(km), N, K, h) - eKm)).toBeLessThan(1e-6 * eKm + 1e-12);
    });

  test('native gptqRefit matches the TypeScript reference; never ends worse than its start', async () => {
    const r = rng(41), N = 8, K = 32, E = 8;
    const { h } = calibration(300, K, r);
    for (const act of [false, true]) {
      const f = gptqFactor(h, K, 0.01, act);
      const w = randn(N * K, r, 0.1);
      const codes = new Uint8Array(N * K).map(() => Math.floor(r() * E));
      const lut = randn(N * E, r, 0.1);
      const isOut = new Uint8Array(N * K).map(() => (r() < 0.05 ? 1 : 0));
      const g = await gptqRefit(w, N, K, codes, lut, E, isOut, f, 2);
      const ref = gptqRefitReference(w, N, K, codes, lut, E, isOut, f, 2);
      expect(g.errorAfter).toBeLessThanOrEqual(g.errorBefore);
      expect(Math.abs(g.errorAfter - ref.errorAfter)).toBeLessThan(1e-3 * ref.errorAfter);
      let same = 0;
      for (let i = 0; i < N * K; i++) same += g.codes[i] === ref.codes[i] || isOut[i] ? 1 : 0;
      expect(same).toBeGreaterThan(0.98 * N * K);
      for (let n = 0; n < N; n++)
        for (let k = 0; k < K; k++)
          if (!isOut[n * K + k]) expect(g.q[n * K + k]).toBe(g.lut[n * E + g.codes[n * K + k]]);
    }
  });

  test('bad arguments are coded errors', async () => {
    const K = 4, f = gptqFactor(new Float64Array(16).map((_, i) => (i % 5 === 0 ? 1 : 0)), K);
    const w = new Float32Array(8), c = new Uint8Array(8), l = new Float32Array(4), o = new Uint8Array(8);
    await expect(gptqRefit(w, 2, K, c, l, 2, o, f, -1)).rejects.toMatchObject({ code: 'ERR_ARG' });
    await expect(gptqRefit(w, 2, K, c, l, 4, o, f, 1)).rejects.toMatchObject({ code: 'ERR_SHAPE' });
    expect(() => gptqFactor(new Float64Array(15), K)).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
  });
});
