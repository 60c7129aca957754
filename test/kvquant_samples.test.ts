/**
 * calibrate-kv's layer-by-layer samples (CPU, pycoder-mini): the walk hands back, for every
 * layer, exactly the keys, values and query energy that one full prefill shows its projection
 * observer; the fitter keeps fits made from a layer after its samples are gone; and the
 * calibration from the walk is the one fitted from every layer's samples at once.
 */
import * as path from 'path';
import { isSqueezeError } from '../ts/errors';
import { SafetensorsFile } from '../ts/model/safetensors';
import { loadModel, Model } from '../ts/model/model';
import { setProjectionObserver } from '../ts/model/llama';
import { LayerFitter, calibrateFromSamples } from '../ts/quant/kvquant';
import { calibrateKv } from '../ts/quant/kvquant-calibrate';
import { LayerSampler, snapshot } from '../ts/quant/kvquant-samples';
import { rotateRows } from '../ts/quant/gradients';

const PYCODER = path.join(__dirname, '..', 'models', 'pycoder-mini');

/** Windows of different lengths (so batches are ragged), from the calibration set. */
function windows(lens: number[]): Int32Array[] {
  const st = SafetensorsFile.open(path.join(PYCODER, 'calib.safetensors'));
  try {
    const ids = st.readInt32('ids'), L = st.entry('ids').shape[1];
    return lens.map((n, w) => ids.slice(w * L, w * L + n));
  } finally {
    st.close();
  }
}

interface Reference { keys: Float32Array[]; values: Float32Array[]; energy: Float64Array[] }

/**
 * Every layer's samples from one full prefill per batch, observed at every layer: the way
 * calibrate-kv collected them before it walked layer by layer.
 */
async function fullPass(model: Model, ws: Int32Array[], batch: number, sink: number, postRope: boolean): Promise<Reference> {
  const cfg = model.config, H = cfg.numKvHeads, D = cfg.headDim, Hq = cfg.numHeads, HD = H * D, G = Hq / H, half = D / 2;
  const L = cfg.numLayers;
  const parts: Array<Array<{ k: number[]; v: number[] }>> = Array.from({ length: L }, () => []);
  const energy = Array.from({ length: L }, () => new Float64Array(HD));
  const reads: Array<Promise<void>> = [];
  let b = 0;
  setProjectionObserver((l, qkv, positions) => {
    const at = b, W = qkv.shape[1], T = qkv.shape[0];
    reads.push(Promise.all([snapshot(qkv), snapshot(positions)]).then(([a, p]) => {
      const k: number[] = [], v: number[] = [];
      for (let t = 0; t < T; t++) {
        const pos = (p as Int32Array)[t];
        if (pos < sink) continue;
        const key = Float32Array.from(a.subarray(t * W + Hq * D, t * W + (Hq + H) * D));
        if (postRope) rotateRows(key, [pos], H, D, cfg.invFreq);
        k.push(...key);
        v.push(...a.subarray(t * W + (Hq + H) * D, t * W + (Hq + 2 * H) * D));
        for (let hq = 0; hq < Hq; hq++) {
          const h = Math.floor(hq / G), o = t * W + hq * D;
          for (let i = 0; i < half; i++) {
            const e = 0.5 * (a[o + i] * a[o + i] + a[o + i + half] * a[o + i + half]);
            energy[l][h * D + i] += e;
            energy[l][h * D + i + half] += e;
          }
        }
      }
      parts[l][at] = { k, v };
    }));
  });
  try {
    for (let i = 0; i < ws.length; i += batch, b++) {
      await model.logitsBatch(ws.slice(i, i + batch));
      await Promise.all(reads); // batch by batch: the energy sums in batch order
    }
  } finally {
    setProjectionObserver(null);
  }
  return {
    keys: parts.map((p) => Float32Array.from(p.flatMap((x) => x.k))),
    values: parts.map((p) => Float32Array.from(p.flatMap((x) => x.v))),
    energy,
  };
}

function codeOf(f: () => unknown): string | undefined {
  try { f(); } catch (e) { return isSqueezeError(e) ? (e as { code: string }).code : `not a SqueezeError: ${e}`; }
  return undefined;
}

let model: Model;
beforeAll(async () => {
  model = await loadModel(PYCODER, { device: 'cpu', maxBatch: 2, maxContext: 64 });
});
afterAll(async () => {
  await model?.dispose();
});

describe('calibrate-kv samples, one layer at a time (CPU)', () => {
  const ws = windows([40, 33, 17, 26, 40]); // 3 batches of 2, the last one short

  for (const postRope of [false, true]) {
    test(`each layer's samples are those of a full prefill${postRope ? ' (post-RoPE keys)' : ''}`, async () => {
      const sink = 3, L = model.config.numLayers;
      const want = await fullPass(model, ws, 2, sink, postRope);
      const sampler = new LayerSampler(model, ws, { batch: 2, sink, postRope });
      try {
        const tokens = ws.reduce((a, w) => a + w.length - sink, 0);
        for (let l = 0; l < L; l++) {
          const s = await sampler.layer(l);
          expect(s.tokens).toBe(tokens);
          expect(s.keys.length).toBe(want.keys[l].length);
          // bit for bit: the layer runs from the stream the full pass had before it
          expect(Buffer.from(s.keys.buffer, s.keys.byteOffset, s.keys.byteLength).equals(Buffer.from(want.keys[l].buffer))).toBe(true);
          expect(Buffer.from(s.values.buffer, s.values.byteOffset, s.values.byteLength).equals(Buffer.from(want.values[l].buffer))).toBe(true);
          expect(Array.from(s.queryEnergy)).toEqual(Array.from(want.energy[l]));
          expect(s.queryEnergy.some((x) => x > 0)).toBe(true);
        }
        // the walk is over: no layer can be asked for again, nor out of order
        await expect(sampler.layer(0)).rejects.toMatchObject({ code: 'ERR_INTERNAL' });
      } finally {
        sampler.dispose();
      }
    });
  }

  test('layers are asked for in order; bad options are refused', async () => {
    const sampler = new LayerSampler(model, ws.slice(0, 2), { batch: 2, sink: 0 });
    try {
      await expect(sampler.layer(1)).rejects.toMatchObject({ code: 'ERR_INTERNAL' });
      await sampler.layer(0);
      await expect(sampler.layer(0)).rejects.toMatchObject({ code: 'ERR_INTERNAL' });
    } finally {
      sampler.dispose();
    }
    expect(codeOf(() => new LayerSampler(model, [], { batch: 2, sink: 0 }))).toBe('ERR_ARG');
    expect(codeOf(() => new LayerSampler(model, ws, { batch: 0, sink: 0 }))).toBe('ERR_ARG');
    expect(codeOf(() => new LayerSampler(model, ws, { batch: 2, sink: -1 }))).toBe('ERR_ARG');
  });

  test('the fitter keeps a layer\'s fits after its samples are gone, and makes no new ones then', async () => {
    const cfg = model.config, H = cfg.numKvHeads, D = cfg.headDim;
    const ref = await fullPass(model, ws, 2, 2, false);
    const opts = { bits: 3, kvHeads: H, headDim: D, sink: 2, iterations: 6 };
    const all = new LayerFitter(ref.keys, ref.values, opts);
    const one = new LayerFitter(cfg.numLayers, undefined, opts);
    expect(codeOf(() => one.layer(0, 1, 1))).toBe('ERR_INTERNAL');
    one.load(0, ref.keys[0], ref.values[0]);
    const fitted = one.layer(0, 1, 2);
    one.unload(0);
    expect(one.layer(0, 1, 2)).toEqual(fitted);
    expect(fitted).toEqual(all.layer(0, 1, 2));
    expect(codeOf(() => one.layer(0, 2, 2))).toBe('ERR_INTERNAL');
    expect(codeOf(() => one.load(cfg.numLayers, ref.keys[0], ref.values[0]))).toBe('ERR_ARG');
    expect(codeOf(() => one.load(1, ref.keys[1].subarray(1), ref.values[1]))).toBe('ERR_SHAPE');
  });

  test('calibrateKv from the walk equals the fit of every layer\'s samples at once', async () => {
    const cfg = model.config;
    const ref = await fullPass(model, ws, 2, 2, false);
    const o = { bits: 2, sink: 2, iterations: 6 };
    const got = await calibrateKv(model, ws, { ...o, batch: 2, slots: 'uniform' });
    const want = calibrateFromSamples(ref.keys, ref.values, {
      ...o, kvHeads: cfg.numKvHeads, headDim: cfg.headDim, keyWeights: ref.energy.map((e) => Float32Array.from(e)),
    });
    expect(got.sensitivity).toBe('queries');
    expect(got.layers).toEqual(want.layers);
  });
});
