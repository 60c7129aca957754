// The CPU backward pass (ts/quant/gradients.ts): its loss against the runtime's own forward, its
// weight gradients against finite differences of the loss, the Fisher file it writes and the
// quantizer reading it, and Fisher-weighted KV calibration.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { isSqueezeError } from '../ts/errors';
import { loadModel } from '../ts/model/model';
import { SafetensorsFile, writeSafetensors } from '../ts/model/safetensors';
import { perplexity } from '../ts/runtime/ppl';
import { Backprop, computeFisher, fisherCommand } from '../ts/quant/gradients';
import { calibrateKv, calibrateKvCommand } from '../ts/quant/kvquant-calibrate';
import { calibrateFromSamples, loadKvqCalibration, saveKvqCalibration } from '../ts/quant/kvquant';
import { quantizeModel } from '../ts/quant/squeezellm';
import { rng } from './gpu';

const Math = globalThis.Math;
const TINY = path.join(__dirname, 'fixtures', 'tiny-llama-gqa');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-grad-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function codeOf(fn: () => Promise<unknown> | unknown): Promise<string | undefined> {
  try { await fn(); } catch (e) { return isSqueezeError(e) ? (e as { code: string }).code : `not a SqueezeError: ${e}`; }
  return undefined;
}

function randomIds(T: number, V: number, seed: number): Int32Array {
  const r = rng(seed);
  return Int32Array.from({ length: T }, () => Math.floor(r() * V));
}

/** The decoder linear `name` of a Backprop, to perturb its weight (the forward reads `w` only). */
function weightOf(bp: Backprop, name: string): Float32Array {
  const m = /^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight$/.exec(name)!;
  const layers = (bp as unknown as { layers: Array<Record<string, { w: Float32Array }>> }).layers;
  return layers[Number(m[1])][m[3]].w;
}

describe('loss gradients on the CPU', () => {
  test('the loss equals the runtime\'s next-token NLL of the same window', async () => {
    const bp = Backprop.open(TINY);
    const ids = randomIds(40, bp.config.vocabSize, 1);
    const r = await bp.window(ids);
    const model = await loadModel(TINY, { device: 'cpu', maxBatch: 1 });
    try {
      const p = await perplexity(model, { windows: [ids], length: ids.length }, { batch: 1 });
      expect(Math.abs(r.loss - p.nll[0])).toBeLessThan(1e-4 * p.nll[0]);
    } finally {
      await model.dispose();
    }
  });

  test('weight gradients match central differences of the loss, every linear of the first and last layer', async () => {
    const bp = Backprop.open(TINY);
    const ids = randomIds(32, bp.config.vocabSize, 2);
    const r = await bp.window(ids, { weightGrads: true });
    const last = bp.config.numLayers - 1;
    const names = bp.linearNames().filter((n) => n.startsWith('model.layers.0.') || n.startsWith(`model.layers.${last}.`));
    expect(names).toHaveLength(14);
    const rnd = rng(3);
    for (const name of names) {
      const G = r.weightGrads!.get(name)!, W = weightOf(bp, name), W0 = Float32Array.from(W);
      expect(G).toHaveLength(W.length);
      // Two directions: the gradient itself (derivative |G|) and a random one (derivative G.E).
      let gn = 0;
      for (const g of G) gn += g * g;
      gn = Math.sqrt(gn);
      const E = Float32Array.from(G, (g) => g / gn);
      const R = Float32Array.from(G, () => rnd() - 0.5);
      let rn = 0;
      for (const x of R) rn += x * x;
      rn = Math.sqrt(rn);
      for (let i = 0; i < R.length; i++) R[i] /= rn;
      for (const [dir, tol] of [[E, 0.01], [R, 0.03]] as Array<[Float32Array, number]>) {
        let an = 0;
        for (let i = 0; i < G.length; i++) an += G[i] * dir[i];
        const h = 1e-4 * Math.sqrt(W.length);  // about 1e-4 per element
        for (let i = 0; i < W.length; i++) W[i] = W0[i] + h * dir[i];
        const lp = (await bp.window(ids)).loss;
        for (let i = 0; i < W.length; i++) W[i] = W0[i] - h * dir[i];
        const lm = (await bp.window(ids)).loss;
        W.set(W0);
        const fd = (lp - lm) / (2 * h);
        // relative to the derivative along the gradient (|G|), so a small projection is not noise-bound
        expect({ name, diff: Math.abs(fd - an) / gn < tol }).toEqual({ name, diff: true });
      }
    }
  }, 60000);

  test('keys and values are the pre-RoPE projections; their gradients are nonzero past the first position', async () => {
    const bp = Backprop.open(TINY);
    const T = 24, HD = bp.config.numKvHeads * bp.config.headDim;
    const r = await bp.window(randomIds(T, bp.config.vocabSize, 4), { kv: true });
    expect(r.kv).toHaveLength(bp.config.numLayers);
    for (const l of r.kv!) {
      for (const a of [l.keys, l.values, l.keyGrads, l.valueGrads]) expect(a).toHaveLength(T * HD);
      // the last token's key and value are attended by nobody but itself, whose prediction is not scored
      for (let c = 0; c < HD; c++) expect(Math.abs(l.keyGrads[(T - 1) * HD + c])).toBe(0);
      for (let c = 0; c < HD; c++) expect(Math.abs(l.valueGrads[(T - 1) * HD + c])).toBe(0);
      expect(l.valueGrads.subarray(0, (T - 1) * HD).some((g) => g !== 0)).toBe(true);
      // position 0's key only ever gets softmax weight relative to others, so it has a gradient too
      expect(l.keyGrads.subarray(HD, (T - 1) * HD).some((g) => g !== 0)).toBe(true);
    }
  });

  test('the Fisher file: mean squared gradient per window, the checkpoint\'s names and shapes; quantize --fisher reads it', async () => {
    const bp = Backprop.open(TINY);
    const V = bp.config.vocabSize;
    const windows = [randomIds(20, V, 5), randomIds(20, V, 6)];
    const g = await Promise.all(windows.map(async (w) => (await Backprop.open(TINY).window(w, { weightGrads: true })).weightGrads!));
    const { fisher } = await computeFisher(TINY, windows);
    expect([...fisher.keys()].sort()).toEqual(bp.linearNames().sort());
    for (const [name, f] of fisher) {
      const a = g[0].get(name)!, b = g[1].get(name)!;
      for (let i = 0; i < f.data.length; i += 97) {
        const want = (a[i] * a[i] + b[i] * b[i]) / 2;  // kept in f64, stored as f32
        expect(Math.abs(f.data[i] - want)).toBeLessThanOrEqual(1e-6 * want);
      }
    }
    // the command writes it; the quantizer takes it as the sensitivity
    const ids = new Int32Array(2 * 20);
    ids.set(windows[0], 0);
    ids.set(windows[1], 20);
    const calib = path.join(tmp, 'calib.safetensors'), out = path.join(tmp, 'fisher.safetensors');
    writeSafetensors(calib, { ids: { dtype: 'i32', shape: [2, 20], data: ids } });
    const log = jest.spyOn(process.stdout, 'write').mockImplementation(() => true);
    const err = jest.spyOn(process.stderr, 'write').mockImplementation(() => true);
    try {
      await fisherCommand(['--model', TINY, '--calib', calib, '--out', out], TINY);
    } finally {
      log.mockRestore();
      err.mockRestore();
    }
    const f = SafetensorsFile.open(out);
    try {
      const q = 'model.layers.0.self_attn.q_proj.weight';
      expect(f.entry(q).shape).toEqual([bp.config.numHeads * bp.config.headDim, bp.config.hiddenSize]);
      expect(f.entry('model.layers.0.mlp.down_proj.weight').shape).toEqual([bp.config.hiddenSize, bp.config.intermediateSize]);
      const d = f.readFloat32(q);
      for (let i = 0; i < d.length; i += 97) expect(d[i]).toBe(fisher.get(q)!.data[i]);
    } finally {
      f.close();
    }
    const qdir = path.join(tmp, 'q4');
    await quantizeModel(TINY, { out: qdir, bits: 4, fisher: out, device: 'cpu' });
    const cfg = JSON.parse(fs.readFileSync(path.join(qdir, 'config.json'), 'utf8'));
    expect(cfg.quantization_config).toMatchObject({ sensitivity: 'fisher', quant_method: 'squeezellm' });
  }, 60000);

  test('bad input: a quantized checkpoint, token ids outside the vocabulary, missing arguments', async () => {
    const qdir = path.join(tmp, 'q4');
    if (fs.existsSync(qdir)) expect(await codeOf(() => Backprop.open(qdir))).toBe('ERR_UNSUPPORTED');
    // a model far larger than host memory is refused before any weight is read
    const big = path.join(tmp, 'big');
    fs.mkdirSync(big, { recursive: true });
    const cfg = JSON.parse(fs.readFileSync(path.join(TINY, 'config.json'), 'utf8'));
    Object.assign(cfg, { hidden_size: 16384, intermediate_size: 53248, num_hidden_layers: 126, num_attention_heads: 128, num_key_value_heads: 8, head_dim: 128 });
    fs.writeFileSync(path.join(big, 'config.json'), JSON.stringify(cfg));
    expect(await codeOf(() => Backprop.open(big))).toBe('ERR_UNSUPPORTED');
    const bp = Backprop.open(TINY);
    expect(await codeOf(() => bp.window(Int32Array.from([1, bp.config.vocabSize])))).toBe('ERR_ARG');
    expect(await codeOf(() => bp.window(Int32Array.from([1])))).toBe('ERR_ARG');
    expect(await codeOf(() => fisherCommand(['--model', TINY, '--out', path.join(tmp, 'x')], TINY))).toBe('ERR_ARG');
    expect(await codeOf(() => fisherCommand(['--model', TINY, '--calib', 'c', '--out', 'o', '--windows', '0'], TINY))).toBe('ERR_ARG');
    expect(await codeOf(() => computeFisher(TINY, []))).toBe('ERR_ARG');
  });
});

describe('Fisher-weighted KV calibration', () => {
  test('sample weights steer the codebook toward the heavy samples', () => {
    const T = 3000, H = 1, D = 8, HD = H * D, r = rng(7);
    const keys = Float32Array.from({ length: T * HD }, () => r() * 2 - 1);
    const values = Float32Array.from({ length: T * HD }, () => r() * 2 - 1);
    const opts = { bits: 2, outliers: 0, kvHeads: H, headDim: D, iterations: 30 };
    const flat = calibrateFromSamples([keys], [values], { ...opts, sampleWeights: { keys: [keys.map(() => 1)], values: [values.map(() => 1)] } });
    const plain = calibrateFromSamples([keys], [values], opts);
    // equal weights: the plain k-means codebook
    for (let i = 0; i < 4; i++) expect(flat.layers[0].keyCodebook[i]).toBeCloseTo(plain.layers[0].keyCodebook[i], 2);
    // weights growing with the key (e^(4x) of its normalised value x): the fit moves up, and its
    // weighted error is below the plain codebook's
    const lo = plain.layers[0].keyLo, hi = plain.layers[0].keyHi;
    const norm = (k: number, i: number): number => (2 * (k - lo[i % HD])) / (hi[i % HD] - lo[i % HD]) - 1;
    const wk = keys.map((k, i) => Math.exp(4 * norm(k, i)));
    const steered = calibrateFromSamples([keys], [values], { ...opts, sampleWeights: { keys: [wk], values: [values.map(() => 1)] } });
    const err = (cb: Float32Array): number => {
      let e = 0;
      keys.forEach((k, i) => { const x = norm(k, i); e += Math.exp(4 * x) * Math.min(...Array.from(cb, (c) => (x - c) ** 2)); });
      return e;
    };
    const sum = (cb: Float32Array): number => cb.reduce((a, b) => a + b, 0);
    expect(sum(steered.layers[0].keyCodebook)).toBeGreaterThan(sum(plain.layers[0].keyCodebook) + 0.5);
    expect(err(steered.layers[0].keyCodebook)).toBeLessThan(0.9 * err(plain.layers[0].keyCodebook));
    // the values kept equal weights: the plain codebook
    for (let i = 0; i < 4; i++) expect(steered.layers[0].valueCodebook[i]).toBeCloseTo(plain.layers[0].valueCodebook[i], 2);
    expect(() => calibrateFromSamples([keys], [values], { ...opts, sampleWeights: { keys: [new Float32Array(3)], values: [values] } }))
      .toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
  });

  test('calibrateKv with a gradient pass: a complete calibration, different codebooks from the unweighted one', async () => {
    const model = await loadModel(TINY, { device: 'cpu', maxBatch: 2 });
    try {
      const V = model.config.vocabSize;
      const windows = [randomIds(48, V, 8), randomIds(48, V, 9)];
      const bp = Backprop.open(TINY);
      const fisher = await calibrateKv(model, windows, { bits: 2, sink: 1, fisher: bp });
      const plain = await calibrateKv(model, windows, { bits: 2, sink: 1, sensitivity: false });
      expect(fisher.layers).toHaveLength(model.config.numLayers);
      let differs = false;
      fisher.layers.forEach((l, i) => {
        // the bounds come from the same samples (the reference forward agrees with the runtime's)
        for (let c = 0; c < l.keyLo.length; c++) expect(l.keyLo[c]).toBeCloseTo(plain.layers[i].keyLo[c], 2);
        for (let j = 0; j < 4; j++) if (Math.abs(l.keyCodebook[j] - plain.layers[i].keyCodebook[j]) > 1e-3) differs = true;
      });
      expect(differs).toBe(true);
      // the calibration says what weighted it, and keeps that through a file
      expect(fisher.sensitivity).toBe('fisher');
      expect(plain.sensitivity).toBe('none');
      const file = path.join(tmp, 'kv2.safetensors');
      saveKvqCalibration(file, fisher);
      expect(loadKvqCalibration(file).sensitivity).toBe('fisher');
      expect(await codeOf(() => calibrateKvCommand(['--model', TINY, '--calib', file, '--bits', '2', '--out', file, '--fisher', '--no-sensitivity'], TINY)))
        .toBe('ERR_ARG');
    } finally {
      await model.dispose();
    }
  }, 60000);
});
