import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { isSqueezeError } from '../ts/errors';
import { writeSafetensors } from '../ts/model/safetensors';
import {
  calibrateFromSamples, calibrateLayer, kmeans1d, kmeans1dWeighted, layerSlots, loadKvqCalibration, normalFloatCodebook, saveKvqCalibration,
  KvqCalibration, largestMagnitudes, stableOrder, kmeans1dNative,
} from '../ts/quant/kvquant';
import { allocateSlots, slotCandidates, SlotCosts } from '../ts/quant/kvquant-allocate';
import { kvqMetaBytes } from '../ts/ops/kvquant';
import { quantizedBytesPerToken } from '../ts/runtime/kvq-attention';
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
  test('stableOrder is the order of a stable sort by value (ties and signed zeros in index order)', () => {
    const r = rng(11);
    for (let trial = 0; trial < 100; trial++) {
      const n = 1 + Math.floor(r() * 2000);
      const a = Float32Array.from({ length: n }, () => {
        const u = r();
        return u < 0.1 ? -0 : u < 0.2 ? 0 : Math.round((2 * r() - 1) * 40) / 40 + (r() < 0.3 ? 1e-6 : 0);
      });
      const want = Array.from(a.keys()).sort((i, j) => a[i] - a[j]);
      expect(Array.from(stableOrder(a))).toEqual(want);
    }
  });

  test('largestMagnitudes picks what sorting by decreasing |v|, then index, puts first', () => {
    const r = rng(7);
    const skip = new Uint8Array(24), top = new Int32Array(16);
    for (let trial = 0; trial < 300; trial++) {
      // few distinct magnitudes of both signs: many ties
      const v = Float32Array.from({ length: 24 }, () => (r() < 0.5 ? -1 : 1) * Math.floor(r() * 5));
      for (const n of [0, 1, 2, 3, 8, 16]) {
        largestMagnitudes(v, n, top, skip);
        const order = Array.from(v.keys()).sort((a, b) => Math.abs(v[b]) - Math.abs(v[a]) || a - b);
        const want = new Uint8Array(24);
        order.slice(0, n).forEach((c) => { want[c] = 1; });
        expect(Array.from(skip)).toEqual(Array.from(want));
      }
    }
  });

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

  test('the native k-means is the TypeScript one bit for bit (ties, signed zeros, few samples, a collapsed codebook)', () => {
    const seed = Date.now() % 1e9, r = rng(seed);
    const same = (a: Float32Array, b: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
    for (const [n, bits] of [[20000, 2], [20000, 3], [5000, 4], [3, 2], [17, 4]] as const) {
      // samples on a grid of 1/64 (many ties), zeros of both signs, the rest spread
      const x = Float32Array.from({ length: n }, () => {
        const u = r();
        return u < 0.1 ? 0 : u < 0.2 ? -0 : u < 0.5 ? Math.round((r() * 2 - 1) * 64) / 64 : Math.tanh((r() + r() + r() - 1.5) * 2);
      });
      const w = Float32Array.from({ length: n }, () => (r() < 0.1 ? 0 : r() * 3));
      const init = normalFloatCodebook(bits);
      for (const it of [1, 25]) {
        if (!same(kmeans1dNative(x, null, init, it), kmeans1d(x, init, it))) throw new Error(`unweighted n ${n} bits ${bits} it ${it} (seed ${seed})`);
        if (!same(kmeans1dNative(x, w, init, it), kmeans1dWeighted(x, w, init, it))) throw new Error(`weighted n ${n} bits ${bits} it ${it} (seed ${seed})`);
      }
    }
    // two entries clamped to 1 together: not strictly increasing, so both hand back init as given
    const flat = Float32Array.from({ length: 100 }, (_, i) => 2 + (i % 2)), init = Float32Array.from([3, -1, 0, 2]);
    expect(Array.from(kmeans1d(flat, init))).toEqual(Array.from(init));
    expect(Array.from(kmeans1dNative(flat, null, init))).toEqual(Array.from(init));
    const code = (f: () => unknown) => { try { f(); } catch (e) { return (e as { code?: string }).code; } return undefined; };
    expect(code(() => kmeans1dNative(flat, new Float32Array(3), init))).toBe('ERR_SHAPE');
    expect(code(() => kmeans1dNative(flat, null, new Float32Array(0)))).toBe('ERR_ARG');
    expect(code(() => kmeans1dNative(new Float64Array(4) as unknown as Float32Array, null, init))).toBe('ERR_ARG');
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

  test('outlier slots per layer: fitted with their own key clip and value slots, saved, loaded, counted in bytes per token', () => {
    const T = 3000, s = samples(T, 1, 16, 11), opts = { bits: 2, outliers: 0.07, sink: 1, kvHeads: 1, headDim: 16, iterations: 4 };
    // 0.07 of 16 channels: 2 uniform slots, key clip 3.5%
    const slots = { key: [0, 2, 6], value: [3, 2, 0] };
    const cal = calibrateFromSamples([s.keys, s.keys, s.keys], [s.values, s.values, s.values], { ...opts, slots });
    expect(cal.slots).toEqual(slots);
    expect(layerSlots(cal, 2)).toEqual({ keyOutliers: 6, valueOutliers: 0 });
    const uniform = calibrateFromSamples([s.keys], [s.values], opts);
    expect(uniform.slots).toBeUndefined();
    expect(layerSlots(uniform, 0)).toEqual({ keyOutliers: 2, valueOutliers: 2 });
    // the uniform count fits exactly as without slots; none gives the channel's min/max; 6 triples the clip
    for (const k of ['keyLo', 'keyHi', 'keyCodebook', 'valueCodebook'] as const) expect(Array.from(cal.layers[1][k])).toEqual(Array.from(uniform.layers[0][k]));
    for (let c = 0; c < 16; c++) {
      let mn = Infinity, mx = -Infinity, out6 = 0;
      for (let t = 0; t < T; t++) {
        const x = s.keys[t * 16 + c];
        mn = Math.min(mn, x); mx = Math.max(mx, x);
        if (x < cal.layers[2].keyLo[c] || x > cal.layers[2].keyHi[c]) out6++;
      }
      expect(cal.layers[0].keyLo[c]).toBe(Math.fround(mn));
      expect(cal.layers[0].keyHi[c]).toBe(Math.fround(mx));
      expect(Math.abs(out6 - 3 * 0.035 * T)).toBeLessThanOrEqual(3);
    }
    // the value codebook follows the value slots: calibrateLayer with the same counts gives the same layer
    const l0 = calibrateLayer(s.keys, s.values, opts, 0, 0, 3);
    expect(Array.from(l0.valueCodebook)).toEqual(Array.from(cal.layers[0].valueCodebook));
    expect(Array.from(cal.layers[2].valueCodebook)).not.toEqual(Array.from(cal.layers[0].valueCodebook));

    const file = path.join(tmp, 'slots.safetensors');
    saveKvqCalibration(file, cal);
    const back = loadKvqCalibration(file, { layers: 3, kvHeads: 1, headDim: 16, bits: 2 });
    expect(back.slots).toEqual(slots);
    saveKvqCalibration(path.join(tmp, 'noslots.safetensors'), { ...cal, slots: undefined });
    expect(loadKvqCalibration(path.join(tmp, 'noslots.safetensors')).slots).toBeUndefined();
    // bytes per token: each layer's codes (4 bytes per 16 channels at 2 bits, rows padded to 16) and its own metadata
    const cfg = { numLayers: 3, numKvHeads: 1, headDim: 16 } as Parameters<typeof quantizedBytesPerToken>[0];
    expect(quantizedBytesPerToken(cfg, back)).toBe(3 * 32 + kvqMetaBytes(0, 3) + kvqMetaBytes(2, 2) + kvqMetaBytes(6, 0));
    expect(quantizedBytesPerToken(cfg, { ...back, slots: undefined })).toBe(3 * 32 + 3 * kvqMetaBytes(2, 2));
  });

  test('bad per-layer slots: ERR_ARG as options, ERR_FORMAT in a file, naming the layer', () => {
    const s = samples(200, 1, 8, 12), opts = { bits: 3, kvHeads: 1, headDim: 8, iterations: 2 };
    expect(codeOf(() => calibrateFromSamples([s.keys, s.keys], [s.values, s.values], { ...opts, slots: { key: [1], value: [1, 1] } }))).toBe('ERR_ARG');
    expect(codeOf(() => calibrateFromSamples([s.keys], [s.values], { ...opts, slots: { key: [17], value: [1] } }))).toBe('ERR_ARG');
    const cal = calibrateFromSamples([s.keys, s.keys], [s.values, s.values], { ...opts, slots: { key: [1, 2], value: [0, 1] } });
    const cases: Array<[Record<string, string>, string]> = [
      [{ key_slots: '1,2,3' }, 'key slots must list 2 layers'],
      [{ value_slots: '0,17' }, 'layer 1 has 17 value slots'],
      [{ key_slots: '9,1' }, 'layer 0 has 9 key slots (0..8)'],
      [{ key_slots: '1,x' }, 'layer 1 has NaN key slots'],
      [{ key_slots: '1,-1' }, 'layer 1 has NaN key slots'],
      [{ key_slots: '1.5,1' }, 'layer 0 has NaN key slots'],
      [{ value_slots: undefined as unknown as string }, 'key_slots without value_slots'],
    ];
    const good = path.join(tmp, 'slots-good.safetensors');
    saveKvqCalibration(good, cal);
    cases.forEach(([meta, msg], i) => {
      const f = path.join(tmp, `slots-bad-${i}.safetensors`);
      // rewrite the metadata only
      const buf = fs.readFileSync(good), n = Number(buf.readBigUInt64LE(0));
      const header = JSON.parse(buf.subarray(8, 8 + n).toString());
      for (const [k, v] of Object.entries(meta)) { if (v === undefined) delete header.__metadata__[k]; else header.__metadata__[k] = v; }
      const h = Buffer.from(JSON.stringify(header)), pad = Buffer.alloc((8 - (h.length % 8)) % 8, 0x20), len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(h.length + pad.length));
      fs.writeFileSync(f, Buffer.concat([len, h, pad, buf.subarray(8 + n)]));
      let err: unknown;
      try { loadKvqCalibration(f); } catch (e) { err = e; }
      expect(err).toMatchObject({ code: 'ERR_FORMAT' });
      expect((err as Error).message).toContain(msg);
    });
    expect(loadKvqCalibration(good).slots).toEqual({ key: [1, 2], value: [0, 1] });
  });

  test('slot allocation: the least summed cost within the byte budget (checked against every allocation)', () => {
    expect(slotCandidates(1, 64)).toEqual({ key: [0, 1, 2, 3, 4, 6, 8], value: [0, 1, 2, 3] });
    expect(slotCandidates(2, 128)).toEqual({ key: [0, 1, 2, 3, 4, 6, 8, 12, 16], value: [0, 1, 2, 3, 4] });
    expect(slotCandidates(2, 6)).toEqual({ key: [0, 1, 2, 3, 4, 6], value: [0, 1, 2, 3, 4] });
    const r = rng(21);
    for (let trial = 0; trial < 20; trial++) {
      const L = 1 + (trial % 3), candidates = { key: [0, 1, 2, 4, 8], value: [0, 1, 3] };
      // decreasing costs with noise, one layer now and then much more sensitive
      const curve = (opts: number[], scale: number) => opts.map((n) => scale / (1 + n) + 0.01 * r());
      const costs: SlotCosts = {
        base: 2, candidates,
        key: Array.from({ length: L }, () => curve(candidates.key, r() < 0.3 ? 1 : 0.05)),
        value: Array.from({ length: L }, () => curve(candidates.value, 0.03)),
      };
      const budget = L * kvqMetaBytes(1, 1) + 4 * (trial % 2);
      const got = allocateSlots(costs, budget);
      const cost = (l: number, nk: number, nv: number) => costs.key[l][candidates.key.indexOf(nk)] + costs.value[l][candidates.value.indexOf(nv)];
      const gotBytes = got.key.reduce((a, nk, l) => a + kvqMetaBytes(nk, got.value[l]), 0);
      expect(gotBytes).toBeLessThanOrEqual(budget);
      const gotCost = got.key.reduce((a, nk, l) => a + cost(l, nk, got.value[l]), 0);
      // exhaustive search
      let best = Infinity;
      const pairs = candidates.key.flatMap((nk) => candidates.value.map((nv) => [nk, nv]));
      const walk = (l: number, bytes: number, c: number): void => {
        if (bytes > budget) return;
        if (l === L) { best = Math.min(best, c); return; }
        for (const [nk, nv] of pairs) walk(l + 1, bytes + kvqMetaBytes(nk, nv), c + cost(l, nk, nv));
      };
      walk(0, 0, 0);
      expect(gotCost).toBeCloseTo(best, 12);
    }
    // a budget below the metadata header of every layer is an error
    const one: SlotCosts = { base: 0, candidates: { key: [0], value: [0] }, key: [[0]], value: [[0]] };
    expect(codeOf(() => allocateSlots(one, 3))).toBe('ERR_ARG');
  });
});
