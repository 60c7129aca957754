/**
 * The KVQuant cache inside the decoder on CUDA: decode-style NLL close to the CPU's with the
 * same calibration, CUDA-graph decode steps equal eager ones, batching, context overflow.
 */
import * as path from 'path';
import { isSqueezeError } from '../ts/errors';
import { SafetensorsFile } from '../ts/model/safetensors';
import { loadModel, Model } from '../ts/model/model';
import { KvqCalibration, layerSlots } from '../ts/quant/kvquant';
import { quantizedPrefillNll } from '../ts/quant/kvquant-allocate';
import { quantizedBytesPerToken } from '../ts/runtime/kvq-attention';
import { calibrateKv } from '../ts/quant/kvquant-calibrate';
import { describeGpu } from './gpu';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

const PYCODER = path.join(__dirname, '..', 'models', 'pycoder-mini');

function windows(file: string, n: number, len: number): Int32Array[] {
  const st = SafetensorsFile.open(path.join(PYCODER, file));
  try {
    const ids = st.readInt32('ids'), L = st.entry('ids').shape[1];
    return Array.from({ length: n }, (_, w) => ids.slice(w * L, w * L + len));
  } finally {
    st.close();
  }
}

describeGpu('KVQuant cache in the decoder (CUDA)', () => {
  let cpu: Model;
  const cals = new Map<number, KvqCalibration>();
  beforeAll(async () => {
    cpu = await loadModel(PYCODER, { device: 'cpu', maxBatch: 2, maxContext: 256 });
    // 2 bits with outlier slots allocated per layer (the default), 3 and 4 with uniform slots
    for (const bits of [2, 3, 4])
      cals.set(bits, await calibrateKv(cpu, windows('calib.safetensors', 2, 256), { bits, sink: 2, iterations: 8, slots: bits === 2 ? 'auto' : 'uniform', allocateWindows: 1 }));
  });
  afterAll(async () => {
    await cpu?.dispose();
  });

  test('decode-style NLL on CUDA is close to the CPU with the same calibration (4/3/2-bit)', async () => {
    const wins = windows('eval.safetensors', 3, 128);
    for (const bits of [4, 3, 2]) {
      const kvCache = { bits, calibration: cals.get(bits)! };
      const c = await loadModel(PYCODER, { device: 'cpu', maxBatch: 3, maxContext: 128, kvCache });
      const g = await loadModel(PYCODER, { device: 'cuda', maxBatch: 3, maxContext: 128, kvCache });
      const nc = await c.decodeNll(wins), ng = await g.decodeNll(wins);
      await c.dispose();
      await g.dispose();
      // CUDA runs the model in fp16, the CPU in fp32: the same calibration then quantizes slightly
      // different keys and values, and at 2 bits a flipped code moves one window's NLL by a few
      // percent (the cache itself costs ~15% there). The mean, which perplexity reports, is held
      // to 3% at every width; single windows to 3% at 4/3 bits and 6% at 2 bits.
      const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
      const mc = mean(nc), mg = mean(ng);
      if (!(Math.abs(mg - mc) < 0.03 * mc)) throw new Error(`${bits}-bit mean: CUDA NLL ${mg} vs CPU ${mc}`);
      const tol = bits === 2 ? 0.06 : 0.03;
      nc.forEach((x, i) => {
        if (!(Math.abs(ng[i] - x) < tol * x)) throw new Error(`${bits}-bit window ${i}: CUDA NLL ${ng[i]} vs CPU ${x}`);
      });
    }
  });

  test('per-layer outlier slots on CUDA: the allocation\'s one-prefill oracle agrees with decode-style NLL; calibrate-kv allocates on CUDA', async () => {
    const cal = cals.get(2)!;
    expect(cal.slots).toBeDefined();
    const wins = windows('eval.safetensors', 2, 128);
    const g = await loadModel(PYCODER, { device: 'cuda', maxBatch: 2, maxContext: 256, kvCache: { bits: 2, calibration: cal } });
    let dec: number[];
    try {
      dec = await g.decodeNll(wins);
    } finally {
      await g.dispose();
    }
    const f = await loadModel(PYCODER, { device: 'cuda', maxBatch: 2, maxContext: 256 });
    try {
      const layers = new Map(cal.layers.map((l, i) => [i, { cal: l, ...layerSlots(cal, i), kinds: 'both' as const }]));
      const pre = await quantizedPrefillNll(f, wins, layers, { bits: 2, sink: cal.sink, batch: 2 });
      const mean = dec.reduce((a, b) => a + b, 0) / dec.length;
      // fp16 activations: prefill and decode round differently (the CPU test holds them to 2e-4)
      if (!(Math.abs(pre - mean) < 0.01 * mean)) throw new Error(`prefill oracle ${pre} vs decode ${mean}`);
      const onCuda = await calibrateKv(f, windows('calib.safetensors', 2, 256), { bits: 2, sink: 2, iterations: 8, allocateWindows: 1 });
      expect(onCuda.slots!.key).toHaveLength(f.config.numLayers);
      expect(quantizedBytesPerToken(f.config, onCuda)).toBeLessThanOrEqual(quantizedBytesPerToken(f.config, { ...onCuda, slots: undefined }));
    } finally {
      await f.dispose();
    }
  });

  test('graph-replayed decode equals eager decode; batch equals single; overflow fails alone', async () => {
    const kvCache = { bits: 3, calibration: cals.get(3)! };
    const [w0, w1, w2] = windows('eval.safetensors', 3, 24);
    const reqs = [{ ids: w0.subarray(0, 20), maxTokens: 12 }, { ids: w1.subarray(0, 5), maxTokens: 8 }, { ids: w2.subarray(0, 9), maxTokens: 100 }];
    const m = await loadModel(PYCODER, { device: 'cuda', maxBatch: 3, maxContext: 64, kvCache });
    try {
      m.graphs = true;
      const withGraphs = await m.generateBatch(reqs);
      expect(m.stats.captureError).toBeUndefined();
      expect(m.stats.graphReplays).toBeGreaterThan(0);
      m.graphs = false;
      const eager = await m.generateBatch(reqs);
      for (let i = 0; i < 3; i++) expect(withGraphs[i].ids).toEqual(eager[i].ids);
      expect(withGraphs[2].finishReason).toBe('error');
      expect(isSqueezeError(withGraphs[2].error, 'ERR_CONTEXT_LENGTH')).toBe(true);
      for (const i of [0, 1]) {
        expect(withGraphs[i].finishReason).toBe('length');
        const [single] = await m.generateBatch([reqs[i]]);
        expect(single.ids).toEqual(withGraphs[i].ids);
      }
      expect(m.freeKvPages).toBe(m.kvPages);
    } finally {
      await m.dispose();
    }
  });
});
