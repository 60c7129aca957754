import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { isSqueezeError } from '../ts/errors';
import { writeSafetensors } from '../ts/model/safetensors';
import {
  calibrateFromSamples, kmeans1d, kmeans1dWeighted, loadKvqCalibration, normalFloatCodebook, saveKvqCalibration, KvqCalibration,
} from '../ts/quant/kvquant';
import { randn, rng } from './gpu';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

function codeOf(fn: () => unknown): string | undefined {
  try { fn(); } catch (e) { return isSqueezeError(e) ? (e as { code: string }).code : 'not a SqueezeError'; }
  return undefined;
}

/** Keys [T, H*D] with a per-channel offset and scale; values [T, H*D] gaussian with a few spikes. */
function samples(T: number, H: number, D: number, seed: number): { keys: Float32Array; values: Float32Array; off: Float32Array; sc: Float32Array } {
  const r = rng(seed), HD = H * D;
  const off = new Float32Array(HD), sc = new Float32Array(HD);
  for (let c = 0; c < HD; c++) { off[c] = (r() - 0.5) * 4; sc[c] = 0.5 + r() * 2; }
  const keys = randn(T * HD, r), values = randn(T * HD, r);
  for (let i = 0; i < keys.length; i++) keys[i] = keys[i] * sc[i % HD] + off[i % HD];
  for (let i = 0; i < values.length; i += 41) values[i] *= 10;
  return { keys, values, off, sc };
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-kvq-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe('kvquant calibration', () => {
  for (const bits of [2, 3, 4]) {
    test(`bounds at the key clip percentile (default half the outlier share), sorted codebooks in [-1, 1] (${bits}-bit)`, () => {
      const T = 2000, H = 2, D = 16, HD = H * D, share = 0.02, clip = share / 2;
      const layers = [samples(T, H, D, 10 + bits), samples(T, H, D, 20 + bits)];
      const cal = calibrateFromSamples(layers.map((l) => l.keys), layers.map((l) => l.values),
        { bits, outliers: share, sink: 4, kvHeads: H, headDim: D, iterations: 10 });
      expect(cal).toMatchObject({ bits, outliers: share, sink: 4, kvHeads: H, headDim: D });
      expect(cal.layers).toHaveLength(2);
      cal.layers.forEach((l, li) => {
        expect(l.keyLo).toHaveLength(HD);
        expect(l.keyHi).toHaveLength(HD);
        const K = layers[li].keys;
        for (let c = 0; c < HD; c++) {
          // the share of samples outside each bound is clip/2 (up to one sample of interpolation)
          let below = 0, above = 0;
          for (let t = 0; t < T; t++) { if (K[t * HD + c] < l.keyLo[c]) below++; if (K[t * HD + c] > l.keyHi[c]) above++; }
          expect(Math.abs(below - (clip / 2) * T)).toBeLessThanOrEqual(1.5);
          expect(Math.abs(above - (clip / 2) * T)).toBeLessThanOrEqual(1.5);
          // and the bounds follow the channel's own scale: about +-2.58 sigma for a 0.5% tail
          const z = (l.keyHi[c] - layers[li].off[c]) / layers[li].sc[c];
          expect(z).toBeGreaterThan(2.1);
          expect(z).toBeLessThan(3.2);
        }
        for (const cb of [l.keyCodebook, l.valueCodebook]) {
          expect(cb).toHaveLength(1 << bits);
          for (let i = 0; i < cb.length; i++) {
            expect(cb[i]).toBeGreaterThanOrEqual(-1);
            expect(cb[i]).toBeLessThanOrEqual(1);
            if (i > 0) expect(cb[i]).toBeGreaterThan(cb[i - 1]);
          }
        }
        // k-means moved the key codebook off its NormalFloat start towards the (gaussian) data
        expect(Array.from(l.keyCodebook)).not.toEqual(Array.from(normalFloatCodebook(bits)));
      });
    });
  }

  test('k-means on uniform samples spreads the codebook evenly', () => {
    const n = 20000, x = new Float32Array(n);
    for (let i = 0; i < n; i++) x[i] = -1 + (2 * (i + 0.5)) / n;
    const cb = kmeans1d(x, normalFloatCodebook(2), 100);
    const want = [-0.75, -0.25, 0.25, 0.75];
    cb.forEach((v, i) => expect(Math.abs(v - want[i])).toBeLessThan(0.01));
  });

  test('weighted k-means follows the weighted samples; zero weights are ignored', () => {
    const n = 20000, x = new Float32Array(n), w = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      x[i] = -1 + (2 * (i + 0.5)) / n;
      w[i] = x[i] > 0 ? 1 : 0;  // only the upper half counts
    }
    const cb = kmeans1dWeighted(x, w, Float32Array.from([0.1, 0.3, 0.6, 0.9]), 200);
    [0.125, 0.375, 0.625, 0.875].forEach((v, i) => expect(Math.abs(cb[i] - v)).toBeLessThan(0.01));
    // equal weights: the same as kmeans1d
    const one = new Float32Array(n).fill(1);
    const a = kmeans1dWeighted(x, one, normalFloatCodebook(2), 50), b = kmeans1d(x, normalFloatCodebook(2), 50);
    a.forEach((v, i) => expect(Math.abs(v - b[i])).toBeLessThan(1e-6));
  });

  test('save and load round trip (safetensors)', () => {
    const s = samples(300, 2, 8, 3);
    const cal = calibrateFromSamples([s.keys, s.keys, s.keys], [s.values, s.values, s.values],
      { bits: 3, outliers: 0.01, sink: 2, kvHeads: 2, headDim: 8, iterations: 5 });
    const file = path.join(tmp, 'cal.safetensors');
    saveKvqCalibration(file, cal);
    const back = loadKvqCalibration(file, { layers: 3, kvHeads: 2, headDim: 8, bits: 3 });
    expect(back.bits).toBe(3);
    expect(back.outliers).toBe(0.01);
    expect(back.sink).toBe(2);
    expect(back.kvHeads).toBe(2);
    expect(back.headDim).toBe(8);
    expect(back.layers).toHaveLength(3);
    back.layers.forEach((l, i) => {
      for (const k of ['keyLo', 'keyHi', 'keyCodebook', 'valueCodebook'] as const)
        expect(Array.from(l[k])).toEqual(Array.from(cal.layers[i][k]));
    });
    // without expectations it loads as well
    expect(loadKvqCalibration(file).layers).toHaveLength(3);
  });

  test('a calibration of another model is ERR_FORMAT', () => {
    const s = samples(100, 2, 8, 4);
    const cal = calibrateFromSamples([s.keys], [s.values], { bits: 4, kvHeads: 2, headDim: 8, iterations: 3 });
    const file = path.join(tmp, 'other.safetensors');
    saveKvqCalibration(file, cal);
    expect(codeOf(() => loadKvqCalibration(file, { layers: 2 }))).toBe('ERR_FORMAT');
    expect(codeOf(() => loadKvqCalibration(file, { kvHeads: 4 }))).toBe('ERR_FORMAT');
    expect(codeOf(() => loadKvqCalibration(file, { headDim: 16 }))).toBe('ERR_FORMAT');
    expect(codeOf(() => loadKvqCalibration(file, { layers: 1, kvHeads: 2, headDim: 8 }))).toBeUndefined();
    // tensors that do not match the header, or a header without the fields
    const bad = path.join(tmp, 'bad.safetensors');
    writeSafetensors(bad, {
      'layers.0.key_lo': { dtype: 'f32', shape: [3], data: new Float32Array(3) },
      'layers.0.key_hi': { dtype: 'f32', shape: [16], data: new Float32Array(16) },
      'layers.0.key_codebook': { dtype: 'f32', shape: [4], data: new Float32Array(4) },
      'layers.0.value_codebook': { dtype: 'f32', shape: [4], data: new Float32Array(4) },
    }, { format: 'squeezelm-kvquant', bits: '2', outliers: '0', sink: '0', layers: '1', kv_heads: '2', head_dim: '8' });
    expect(codeOf(() => loadKvqCalibration(bad))).toBe('ERR_FORMAT');
    const noMeta = path.join(tmp, 'nometa.safetensors');
    writeSafetensors(noMeta, { x: { dtype: 'f32', shape: [1], data: new Float32Array(1) } }, { format: 'squeezelm-kvquant' });
    expect(codeOf(() => loadKvqCalibration(noMeta))).toBe('ERR_FORMAT');
  });

  test('damaged values are ERR_FORMAT naming the tensor: non-finite, key_lo above key_hi, a codebook out of order', () => {
    const s = samples(200, 2, 8, 6);
    const good = calibrateFromSamples([s.keys, s.keys], [s.values, s.values], { bits: 2, kvHeads: 2, headDim: 8, iterations: 3 });
    const damage: Array<[string, (c: KvqCalibration) => void]> = [
      ["'layers.1.key_lo' holds NaN at index 5", (c) => { c.layers[1].keyLo[5] = NaN; }],
      ["'layers.0.key_hi' holds Infinity at index 0", (c) => { c.layers[0].keyHi[0] = Infinity; }],
      ['layers.1 key channel 3 has key_lo', (c) => { c.layers[1].keyLo[3] = c.layers[1].keyHi[3] + 1; }],
      ["'layers.0.value_codebook' holds NaN", (c) => { c.layers[0].valueCodebook[2] = NaN; }],
      ["'layers.1.key_codebook' is not in ascending order (entry 2)", (c) => { const b = c.layers[1].keyCodebook; [b[1], b[2]] = [b[2], b[1]]; }],
    ];
    damage.forEach(([msg, hurt], i) => {
      const c: KvqCalibration = { ...good, layers: good.layers.map((l) => ({
        keyLo: l.keyLo.slice(), keyHi: l.keyHi.slice(), keyCodebook: l.keyCodebook.slice(), valueCodebook: l.valueCodebook.slice() })) };
      hurt(c);
      const file = path.join(tmp, `damaged-${i}.safetensors`);
      saveKvqCalibration(file, c);
      let err: unknown;
      try { loadKvqCalibration(file); } catch (e) { err = e; }
      expect(err).toMatchObject({ code: 'ERR_FORMAT' });
      expect((err as Error).message).toContain(msg);
    });
    // a channel whose bounds meet (a constant channel) is valid
    const flat: KvqCalibration = { ...good, layers: good.layers.map((l) => ({ ...l, keyLo: l.keyHi.slice() })) };
    saveKvqCalibration(path.join(tmp, 'flat.safetensors'), flat);
    expect(loadKvqCalibration(path.join(tmp, 'flat.safetensors')).layers).toHaveLength(2);
  });

  test('bits outside 2..4 are ERR_ARG', () => {
    const s = samples(50, 1, 8, 5);
    for (const bits of [1, 5, 8, 2.5])
      expect(codeOf(() => calibrateFromSamples([s.keys], [s.values], { bits, kvHeads: 1, headDim: 8 }))).toBe('ERR_ARG');
    expect(codeOf(() => normalFloatCodebook(5))).toBe('ERR_ARG');
    const cal: KvqCalibration = calibrateFromSamples([s.keys], [s.values], { bits: 2, kvHeads: 1, headDim: 8, iterations: 2 });
    const file = path.join(tmp, 'b5.safetensors');
    saveKvqCalibration(file, { ...cal, bits: 5 });
    expect(codeOf(() => loadKvqCalibration(file))).toBe('ERR_ARG');
    saveKvqCalibration(file, cal);
    expect(codeOf(() => loadKvqCalibration(file, { bits: 3 }))).toBe('ERR_FORMAT');
  });

  test('bad sample shapes and options are coded errors', () => {
    const s = samples(10, 1, 8, 6);
    expect(codeOf(() => calibrateFromSamples([s.keys], [s.values.subarray(1)], { bits: 2, kvHeads: 1, headDim: 8 }))).toBe('ERR_SHAPE');
    expect(codeOf(() => calibrateFromSamples([s.keys], [], { bits: 2, kvHeads: 1, headDim: 8 }))).toBe('ERR_ARG');
    expect(codeOf(() => calibrateFromSamples([s.keys], [s.values], { bits: 2, kvHeads: 1, headDim: 8, outliers: 0.7 }))).toBe('ERR_ARG');
    expect(codeOf(() => calibrateFromSamples([s.keys], [s.values], { bits: 2, kvHeads: 1, headDim: 8, keyClip: 0.5 }))).toBe('ERR_ARG');
  });

  test('an explicit key clip share sets the bounds', () => {
    const T = 4000, s = samples(T, 1, 8, 9), clip = 0.04;
    const cal = calibrateFromSamples([s.keys], [s.values], { bits: 3, outliers: 0.01, keyClip: clip, kvHeads: 1, headDim: 8, iterations: 5 });
    for (let c = 0; c < 8; c++) {
      let below = 0, above = 0;
      for (let t = 0; t < T; t++) { if (s.keys[t * 8 + c] < cal.layers[0].keyLo[c]) below++; if (s.keys[t * 8 + c] > cal.layers[0].keyHi[c]) above++; }
      expect(Math.abs(below - (clip / 2) * T)).toBeLessThanOrEqual(1.5);
      expect(Math.abs(above - (clip / 2) * T)).toBeLessThanOrEqual(1.5);
    }
  });
});
