/**
 * The KVQuant cache inside the decoder (CPU): loadModel options and their errors, what the
 * cache holds after a prompt and decode steps (keys pre-RoPE per channel, values per token,
 * outliers, fp16 sink), decode-style perplexity, batching and context overflow.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { isSqueezeError } from '../ts/errors';
import { Tensor } from '../ts/tensor';
import { SafetensorsFile } from '../ts/model/safetensors';
import { loadModel, Model } from '../ts/model/model';
import { setProjectionObserver } from '../ts/model/llama';
import { kvqDequantize } from '../ts/ops/kvquant';
import { KvqCalibration, layerSlots, loadKvqCalibration, saveKvqCalibration } from '../ts/quant/kvquant';
import { calibrateKv, snapshot } from '../ts/quant/kvquant-calibrate';
import { QuantizedAttention, quantizedBytesPerToken } from '../ts/runtime/kvq-attention';
import { measureSlotCosts, quantizedPrefillNll, residualStates } from '../ts/quant/kvquant-allocate';
import { f16ToFloat, floatToF16 } from '../ts/util/half';
import { oracleRoundTrip, Setup } from './kvquant_helpers';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

const PYCODER = path.join(__dirname, '..', 'models', 'pycoder-mini');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-kvqd-'));

function evalWindows(n: number, len: number): Int32Array[] {
  const st = SafetensorsFile.open(path.join(PYCODER, 'eval.safetensors'));
  try {
    const e = st.entry('ids');
    const ids = st.readInt32('ids'), L = e.shape[1];
    return Array.from({ length: n }, (_, w) => ids.slice(w * L, w * L + len));
  } finally {
    st.close();
  }
}

async function codeOf(p: Promise<unknown>): Promise<string | undefined> {
  try { await p; } catch (e) { return isSqueezeError(e) ? (e as { code: string }).code : `not a SqueezeError: ${e}`; }
  return undefined;
}

let base: Model;
const cals = new Map<string, KvqCalibration>();
async function calibration(bits: number,
  o: { sink?: number; outliers?: number; keyPerToken?: boolean; postRope?: boolean; codebook?: 'uniform' } = {}): Promise<KvqCalibration> {
  const key = JSON.stringify({ bits, ...o });
  let c = cals.get(key);
  if (!c) {
    const calib = SafetensorsFile.open(path.join(PYCODER, 'calib.safetensors'));
    const ids = calib.readInt32('ids'), L = calib.entry('ids').shape[1];
    calib.close();
    // uniform slots: the per-layer allocation (its own test below) measures with many prefills
    c = await calibrateKv(base, [ids.slice(0, 256), ids.slice(L, L + 256)], { bits, sink: 2, iterations: 8, slots: 'uniform', ...o });
    cals.set(key, c);
  }
  return c;
}

beforeAll(async () => {
  base = await loadModel(PYCODER, { device: 'cpu', maxBatch: 4, maxContext: 512 });
});
afterAll(async () => {
  await base.dispose();
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('KVQuant cache in the decoder (CPU)', () => {
  test('kvCache option errors: bits, bits vs calibration, calibration of another model', async () => {
    const cal = await calibration(4);
    const file = path.join(tmp, 'c4.safetensors');
    saveKvqCalibration(file, cal);
    expect(await codeOf(loadModel(PYCODER, { device: 'cpu', kvCache: { bits: 5, calibration: file } }))).toBe('ERR_ARG');
    expect(await codeOf(loadModel(PYCODER, { device: 'cpu', kvCache: { bits: 3, calibration: file } }))).toBe('ERR_FORMAT');
    expect(await codeOf(loadModel(PYCODER, { device: 'cpu', kvCache: { bits: 3, calibration: cal } }))).toBe('ERR_FORMAT');
    const other = path.join(tmp, 'other.safetensors');
    saveKvqCalibration(other, { ...cal, layers: cal.layers.slice(0, 2) });
    let err: unknown;
    try { await loadModel(PYCODER, { device: 'cpu', kvCache: { bits: 4, calibration: other } }); } catch (e) { err = e; }
    expect(isSqueezeError(err, 'ERR_FORMAT')).toBe(true);
    expect((err as Error).message).toContain(other);
    expect((err as Error).message).toContain('layers');
    saveKvqCalibration(other, { ...cal, kvHeads: 1, headDim: 128 });
    expect(await codeOf(loadModel(PYCODER, { device: 'cpu', kvCache: { bits: 4, calibration: other } }))).toBe('ERR_FORMAT');
    expect(await codeOf(loadModel(PYCODER, { device: 'cpu', kvCache: { bits: 4, calibration: { ...cal, headDim: 32 } } }))).toBe('ERR_FORMAT');
    const m = await loadModel(PYCODER, { device: 'cpu', maxContext: 64, kvCache: { bits: 4, calibration: file } });
    expect(m.kvCache).toMatchObject({ bits: 4, quantized: true });
    // 6 layers x 2 kv heads x (2 x 32 code bytes + 12 metadata bytes: scales, one key and one value outlier, padding)
    expect(m.kvCache.bytesPerToken).toBe(6 * 2 * (2 * 32 + 12));
    await m.dispose();
  });

  test('the cache holds pre-RoPE keys per channel, values per token, exact outliers and the fp16 sink', async () => {
    const cal = await calibration(3);
    const m = await loadModel(PYCODER, { device: 'cpu', maxBatch: 2, maxContext: 128, kvCache: { bits: 3, calibration: cal } });
    const dec = m.decoder, kv = dec.cache, attn = dec.attn as QuantizedAttention;
    const H = m.config.numKvHeads, D = m.config.headDim, HD = H * D, Hq = m.config.numHeads;
    const [w] = evalWindows(1, 40);
    // layer-1 pre-RoPE k and v of every pass, by position
    const rows = new Map<number, { k: Float32Array; v: Float32Array }>();
    const pending: Promise<void>[] = [];
    setProjectionObserver((l, qkv, positions) => {
      if (l !== 1) return;
      pending.push(Promise.all([snapshot(qkv), snapshot(positions)]).then(([a, p]) => {
        const W = qkv.shape[1];
        for (let t = 0; t < qkv.shape[0]; t++)
          rows.set((p as Int32Array)[t], { k: (a as Float32Array).slice(t * W + Hq * D, t * W + (Hq + H) * D), v: (a as Float32Array).slice(t * W + (Hq + H) * D, t * W + (Hq + 2 * H) * D) });
      }));
    });
    const seq = kv.createSequence();
    try {
      // a prompt of 24 tokens, then 16 decode steps
      kv.grow(seq, 24);
      const ws = dec.workspace(24, 1, false);
      dec.write(ws, dec.inputs([seq], [w.subarray(0, 24)]));
      dec.forward(ws, 24, 24);
      ws.dispose();
      const wd = dec.decodeWorkspace(1, 128);
      for (let t = 24; t < 40; t++) {
        kv.grow(seq, t + 1);
        dec.write(wd, dec.inputs([seq], [[w[t]]]));
        dec.forward(wd, 1, 128);
      }
      wd.dispose();
      await Promise.all(pending);
      setProjectionObserver(null);
      const pt = new Int32Array(kv.maxPagesPerSeq);
      kv.writePageTable(seq, pt, 0);
      const ko = Tensor.empty([40, H, D]), vo = Tensor.empty([40, H, D]);
      ko.write(new Float32Array(40 * HD).fill(NaN));
      vo.write(new Float32Array(40 * HD).fill(NaN));
      kvqDequantize(ko, vo, attn.caches[1], attn.cal[1], Tensor.from(pt, [1, kv.maxPagesPerSeq]), 0, kv.slot(seq));
      const k = await ko.toFloat32(), v = await vo.toFloat32();
      const l1 = cal.layers[1];
      const s = { D, calHost: { lo: l1.keyLo, hi: l1.keyHi, kcb: l1.keyCodebook, vcb: l1.valueCodebook } } as unknown as Setup;
      const r16 = (x: number) => f16ToFloat(floatToF16(x));
      let quantized = 0;
      for (let t = 0; t < 40; t++) {
        const raw = rows.get(t)!;
        if (!raw) throw new Error(`no row ${t}: have ${[...rows.keys()]}`);
        for (let h = 0; h < H; h++) {
          const kin = raw.k.subarray(h * D, (h + 1) * D), vin = raw.v.subarray(h * D, (h + 1) * D);
          const want = t < 2 ? { k: kin.map(r16), v: vin.map(r16) } : oracleRoundTrip(s, kin, vin, h, 1, 1);
          const kg = k.subarray((t * H + h) * D, (t * H + h + 1) * D), vg = v.subarray((t * H + h) * D, (t * H + h + 1) * D);
          for (let c = 0; c < D; c++) {
            // outlier entries are stored in fp16; everything else is a codebook value
            expect(Math.abs(kg[c] - want.k[c])).toBeLessThanOrEqual(1e-3 * Math.max(1, Math.abs(want.k[c])));
            expect(Math.abs(vg[c] - want.v[c])).toBeLessThanOrEqual(1e-3 * Math.max(1, Math.abs(want.v[c])));
            if (t >= 2 && Math.abs(kg[c] - kin[c]) > 1e-2) quantized++;
          }
        }
      }
      expect(quantized).toBeGreaterThan(38 * H * D * 0.5);
    } finally {
      setProjectionObserver(null);
      kv.free(seq);
      await m.dispose();
    }
  });

  test('decode-style perplexity: the fp cache matches prefill; 4/3/2-bit caches stay close', async () => {
    const wins = evalWindows(2, 160);
    const pre = await base.logitsBatch(wins);
    const V = base.config.vocabSize;
    const { windowNll } = await import('../ts/runtime/ppl');
    const ref = wins.map((w, i) => windowNll(pre[i], w, V));
    const dec = await base.decodeNll(wins);
    dec.forEach((x, i) => expect(Math.abs(x - ref[i])).toBeLessThan(1e-4));
    const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
    for (const [bits, tol] of [[4, 0.02], [3, 0.05], [2, 0.25]] as const) {
      const m = await loadModel(PYCODER, { device: 'cpu', maxBatch: 2, maxContext: 160, kvCache: { bits, calibration: await calibration(bits) } });
      const q = await m.decodeNll(wins);
      await m.dispose();
      const rel = Math.exp(mean(q)) / Math.exp(mean(ref)) - 1;
      expect(rel).toBeLessThan(tol);
      expect(rel).toBeGreaterThan(-tol);
    }
  });

  test('outlier slots per layer (the default): within the uniform bytes, in each layer\'s cache; the one-prefill oracle equals decode-style NLL', async () => {
    // the allocation measures with one prefill per layer, kind and slot count: short windows keep it quick
    const calib = SafetensorsFile.open(path.join(PYCODER, 'calib.safetensors'));
    const ids = calib.readInt32('ids'), CL = calib.entry('ids').shape[1];
    calib.close();
    const auto = await calibrateKv(base, [ids.slice(0, 128), ids.slice(CL, CL + 128)], { bits: 2, sink: 2, iterations: 8, allocateWindows: 1 });
    const uniform = await calibration(2);
    expect(auto.slots).toBeDefined();
    expect(uniform.slots).toBeUndefined();
    const cfg = base.config, L = cfg.numLayers;
    expect(auto.slots!.key).toHaveLength(L);
    expect(quantizedBytesPerToken(cfg, auto)).toBeLessThanOrEqual(quantizedBytesPerToken(cfg, uniform));
    const wins = evalWindows(2, 96);
    const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
    const results: number[] = [];
    for (const cal of [auto, uniform]) {
      const m = await loadModel(PYCODER, { device: 'cpu', maxBatch: 2, maxContext: 96, kvCache: { bits: 2, calibration: cal } });
      let dec: number[];
      try {
        const attn = m.decoder.attn as QuantizedAttention;
        attn.caches.forEach((c, l) => {
          expect(c.opts.keyOutliers).toBe(layerSlots(cal, l).keyOutliers);
          expect(c.opts.valueOutliers).toBe(layerSlots(cal, l).valueOutliers);
        });
        expect(m.kvCache.bytesPerToken).toBe(quantizedBytesPerToken(cfg, cal));
        dec = await m.decodeNll(wins);
      } finally {
        await m.dispose();
      }
      // every layer's keys and values through the quantizer in one prefill of the fp model
      const layers = new Map(cal.layers.map((l, i) => [i, { cal: l, ...layerSlots(cal, i), kinds: 'both' as const }]));
      const pre = await quantizedPrefillNll(base, wins, layers, { bits: 2, sink: cal.sink, batch: 2 });
      expect(Math.abs(pre - mean(dec))).toBeLessThan(2e-4);
      results.push(pre);
      // keys or values alone fall between the exact model and both
      const exact = await quantizedPrefillNll(base, wins, new Map(), { bits: 2, sink: cal.sink, batch: 2 });
      const last = L - 1;
      const one = (kinds: 'keys' | 'values' | 'both') => quantizedPrefillNll(base, wins,
        new Map([[last, { cal: cal.layers[last], ...layerSlots(cal, last), kinds }]]), { bits: 2, sink: cal.sink, batch: 1 });
      const [k, v, b] = [await one('keys'), await one('values'), await one('both')];
      for (const x of [k, v]) {
        expect(x).not.toBe(exact);
        expect(x).not.toBe(b);
      }
    }
    const pre = await base.logitsBatch(wins);
    const { windowNll } = await import('../ts/runtime/ppl');
    expect(Math.abs(mean(wins.map((w, i) => windowNll(pre[i], w, cfg.vocabSize))) -
      (await quantizedPrefillNll(base, wins, new Map(), { bits: 2, sink: 2, batch: 2 })))).toBeLessThan(1e-9);
  });

  test('slot costs measured from the saved residual stream equal full prefills, bit for bit', async () => {
    // three windows in batches of two: two residual states per layer, the second of one window
    const wins = evalWindows(3, 48), L = base.config.numLayers;
    const cal = await calibration(2);
    const o = { bits: 2, sink: cal.sink, batch: 2 };
    // a prefill that starts at layer l from the states equals the full prefill, for a quantized layer l
    let states: Awaited<ReturnType<typeof residualStates>> | undefined;
    try {
      for (let l = 0; l < L; l++) {
        const q = new Map([[l, { cal: cal.layers[l], ...layerSlots(cal, l), kinds: 'both' as const }]]);
        const full = await quantizedPrefillNll(base, wins, q, o);
        expect(await quantizedPrefillNll(base, wins, q, { ...o, from: l, states })).toBe(full);
        if (l > 0) {
          // a layer before the start cannot be quantized; a missing state is refused
          const before = new Map([[l - 1, q.get(l)!]]);
          await expect(quantizedPrefillNll(base, wins, before, { ...o, from: l, states })).rejects.toMatchObject({ code: 'ERR_ARG' });
          await expect(quantizedPrefillNll(base, wins, q, { ...o, from: l, states: states!.slice(1) })).rejects.toMatchObject({ code: 'ERR_ARG' });
        }
        if (l + 1 === L) {
          await expect(residualStates(base, wins, l, states, 2)).rejects.toMatchObject({ code: 'ERR_ARG' });
          break;
        }
        const next = await residualStates(base, wins, l, states, 2);
        expect(next).toHaveLength(2);
        states?.forEach((s) => { s.x.dispose(); s.mlp.dispose(); });
        states = next;
      }
    } finally {
      states?.forEach((s) => { s.x.dispose(); s.mlp.dispose(); });
    }
    // the whole measurement, with and without the reuse
    // (one calibration for every count: the costs then differ by the slots alone)
    const candidates = { key: [0, 2], value: [0, 1] };
    const a = await measureSlotCosts(base, wins, (l) => cal.layers[l], { ...o, candidates, uniform: 1 });
    const b = await measureSlotCosts(base, wins, (l) => cal.layers[l], { ...o, candidates, uniform: 1, reuse: false });
    expect(a).toEqual(b);
    expect(a.key.flat().every((x) => Number.isFinite(x))).toBe(true);
    expect(a.key.flat().some((x) => x !== 0)).toBe(true);
  });

  test('ablation options load and run: per-token keys, post-RoPE keys, uniform codebooks, no outliers, no sink', async () => {
    const wins = evalWindows(1, 40);
    const ref = await base.decodeNll(wins);
    const file = path.join(tmp, 'abl.safetensors');
    for (const o of [{ keyPerToken: true }, { postRope: true }, { codebook: 'uniform' as const }, { outliers: 0 }, { sink: 0 }]) {
      const cal = await calibration(4, o);
      saveKvqCalibration(file, cal);
      const back = loadKvqCalibration(file, { bits: 4 });
      expect({ ...back, layers: 0 }).toEqual({ ...cal, layers: 0 });
      const m = await loadModel(PYCODER, { device: 'cpu', maxBatch: 1, maxContext: 40, kvCache: { bits: 4, calibration: file } });
      const [a] = await m.decodeNll(wins);
      await m.dispose();
      expect(Math.abs(a - ref[0])).toBeLessThan(0.15);
    }
  });

  test('batched generation equals single; a sequence past the context fails alone', async () => {
    const cal = await calibration(2);
    const m = await loadModel(PYCODER, { device: 'cpu', maxBatch: 3, maxContext: 40, kvCache: { bits: 2, calibration: cal } });
    try {
      const [w0, w1, w2] = evalWindows(3, 20);
      const reqs = [{ ids: w0.subarray(0, 12), maxTokens: 10 }, { ids: w1.subarray(0, 7), maxTokens: 100 }, { ids: w2.subarray(0, 3), maxTokens: 14 }];
      const batch = await m.generateBatch(reqs);
      expect(batch[1].finishReason).toBe('error');
      expect(isSqueezeError(batch[1].error, 'ERR_CONTEXT_LENGTH')).toBe(true);
      expect(batch[1].ids.length).toBeGreaterThan(30);
      for (const i of [0, 2]) {
        expect(batch[i].finishReason).toBe('length');
        const [single] = await m.generateBatch([reqs[i]]);
        expect(batch[i].ids).toEqual(single.ids);
      }
      const [single1] = await m.generateBatch([{ ...reqs[1], maxTokens: batch[1].ids.length }]);
      expect(batch[1].ids).toEqual(single1.ids);
      expect(m.freeKvPages).toBe(m.kvPages);
    } finally {
      await m.dispose();
    }
  });
});
