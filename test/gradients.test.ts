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

/** The decoder linear `name` (or the lm_head) of a Backprop, to perturb its weight (the forward reads `w` / lmHead only). */
function weightOf(bp: Backprop, name: string): Float32Array {
  if (name === 'lm_head.weight') return (bp as unknown as { lmHead: Float32Array }).lmHead;
  const m = /^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight$/.exec(name)!;
  const layers = (bp as unknown as { layers: Array<Record<string, { w: Float32Array }>> }).layers;
  return layers[Number(m[1])][m[3]].w;
}

/** The runtime's own next-token NLL of one window (CPU forward of the decoder). */
async function runtimeNll(dir: string, ids: Int32Array): Promise<number> {
  const model = await loadModel(dir, { device: 'cpu', maxBatch: 1 });
  try {
    return (await perplexity(model, { windows: [ids], length: ids.length }, { batch: 1 })).nll[0];
  } finally {
    await model.dispose();
  }
}

function norm(a: Float32Array): number {
  let n = 0;
  for (const x of a) n += x * x;
  return Math.sqrt(n);
}

/**
 * The loss's derivative along a unit direction of one weight, by central differences (a step of
 * about 1e-4 per element), and what the gradient G says it is (G.dir).
 */
async function directional(bp: Backprop, ids: Int32Array, name: string, G: Float32Array, dir: Float32Array): Promise<{ fd: number; an: number }> {
  const W = weightOf(bp, name), W0 = Float32Array.from(W);
  let an = 0;
  for (let i = 0; i < G.length; i++) an += G[i] * dir[i];
  const h = 1e-4 * Math.sqrt(W.length);
  for (let i = 0; i < W.length; i++) W[i] = W0[i] + h * dir[i];
  const lp = (await bp.window(ids)).loss;
  for (let i = 0; i < W.length; i++) W[i] = W0[i] - h * dir[i];
  const lm = (await bp.window(ids)).loss;
  W.set(W0);
  return { fd: (lp - lm) / (2 * h), an };
}

describe('loss gradients on the CPU', () => {
  test('the loss equals the runtime\'s next-token NLL of the same window', async () => {
    const bp = Backprop.open(TINY);
    const ids = randomIds(40, bp.config.vocabSize, 1);
    const r = await bp.window(ids);
    const nll = await runtimeNll(TINY, ids);
    expect(Math.abs(r.loss - nll)).toBeLessThan(1e-4 * nll);
  });

  test('weight gradients match central differences of the loss, every linear of the first and last layer', async () => {
    const bp = Backprop.open(TINY);
    const ids = randomIds(32, bp.config.vocabSize, 2);
    const r = await bp.window(ids, { weightGrads: true });
    const last = bp.config.numLayers - 1;
    // (the fixture's lm_head is its own matrix, so its gradient is the whole loss's)
    const names = [...bp.linearNames().filter((n) => n.startsWith('model.layers.0.') || n.startsWith(`model.layers.${last}.`)), 'lm_head.weight'];
    expect(names).toHaveLength(15);
    const rnd = rng(3);
    for (const name of names) {
      const G = r.weightGrads!.get(name)!;
      expect(G).toHaveLength(weightOf(bp, name).length);
      // Two directions: the gradient itself (derivative |G|) and a random one (derivative G.E).
      const gn = norm(G);
      const E = Float32Array.from(G, (g) => g / gn);
      const R = Float32Array.from(G, () => rnd() - 0.5);
      const rn = norm(R);
      for (let i = 0; i < R.length; i++) R[i] /= rn;
      for (const [dir, tol] of [[E, 0.01], [R, 0.03]] as Array<[Float32Array, number]>) {
        const { fd, an } = await directional(bp, ids, name, G, dir);
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
    expect([...fisher.keys()].sort()).toEqual([...bp.linearNames(), 'lm_head.weight'].sort());
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
      expect(f.entry('lm_head.weight').shape).toEqual([bp.config.vocabSize, bp.config.hiddenSize]);
      const d = f.readFloat32(q);
      for (let i = 0; i < d.length; i += 97) expect(d[i]).toBe(fisher.get(q)!.data[i]);
    } finally {
      f.close();
    }
    const qdir = path.join(tmp, 'q4');
    await quantizeModel(TINY, { out: qdir, bits: 4, fisher: out, device: 'cpu' });
    const cfg = JSON.parse(fs.readFileSync(path.join(qdir, 'config.json'), 'utf8'));
    expect(cfg.quantization_config).toMatchObject({ sensitivity: 'fisher', quant_method: 'squeezellm' });
    // --lm-head takes the head's entry: its sensitive outliers (0.5% of 512 x 256, no magnitude ones)
    // are the weights with the largest Fisher x w^2
    const hdir = path.join(tmp, 'q4h');
    await quantizeModel(TINY, { out: hdir, bits: 4, fisher: out, device: 'cpu', lmHead: true, outliers: 0, sensitive: 0.005, iters: 10 });
    const hf = SafetensorsFile.open(path.join(hdir, 'model.safetensors')), src = SafetensorsFile.open(path.join(TINY, 'model.safetensors'));
    try {
      const c = hf.read('lm_head.cols').data as Int32Array, r = hf.read('lm_head.rows').data as Int32Array;
      const H = bp.config.hiddenSize, F = fisher.get('lm_head.weight')!.data, w = src.readFloat32('lm_head.weight');
      const score = Float32Array.from(F, (f, i) => f * w[i] * w[i]);
      expect(Math.abs(c.length - 0.005 * F.length)).toBeLessThanOrEqual(2);
      const threshold = Float32Array.from(score).sort()[F.length - c.length];
      let kept = 0;
      for (let n = 0; n + 1 < r.length; n++) for (let i = r[n]; i < r[n + 1]; i++, kept++) expect(score[n * H + c[i]]).toBeGreaterThanOrEqual(threshold);
      expect(kept).toBe(c.length);
    } finally {
      hf.close();
      src.close();
    }
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
    expect(await codeOf(() => fisherCommand(['--model', TINY, '--calib', path.join(tmp, 'missing.safetensors'), '--out', path.join(tmp, 'x')], TINY))).toBe('ERR_ARG');
    // a text file needs the model's tokenizer, which the fixture does not have
    expect(await codeOf(() => fisherCommand(['--model', TINY, '--calib', path.join(TINY, 'config.json'), '--out', path.join(tmp, 'x')], TINY))).toBe('ERR_ARG');
  });
});

/** A random checkpoint of `config` (f32 weights, std 0.15; biases where the config asks for them). */
function writeRandomCheckpoint(dir: string, config: Record<string, unknown>, seed: number): void {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
  const r = rng(seed);
  const H = config.hidden_size as number, I = config.intermediate_size as number, V = config.vocab_size as number;
  const Hq = config.num_attention_heads as number, Hkv = config.num_key_value_heads as number, D = config.head_dim as number;
  const qwen = config.model_type === 'qwen2', attnBias = config.attention_bias === true, mlpBias = config.mlp_bias === true;
  const t: Record<string, { dtype: string; shape: number[]; data: Float32Array }> = {};
  const add = (name: string, shape: number[], around = 0): void => {
    const n = shape.reduce((a, b) => a * b, 1);
    t[name] = { dtype: 'f32', shape, data: Float32Array.from({ length: n }, () => around + (r() - 0.5) * 0.3) };
  };
  add('model.embed_tokens.weight', [V, H]);
  if (config.tie_word_embeddings !== true) add('lm_head.weight', [V, H]);
  add('model.norm.weight', [H], 1);
  for (let l = 0; l < (config.num_hidden_layers as number); l++) {
    const p = `model.layers.${l}`;
    add(`${p}.input_layernorm.weight`, [H], 1);
    add(`${p}.post_attention_layernorm.weight`, [H], 1);
    for (const [n, N, K] of [['q', Hq * D, H], ['k', Hkv * D, H], ['v', Hkv * D, H], ['o', H, Hq * D]] as Array<[string, number, number]>) {
      add(`${p}.self_attn.${n}_proj.weight`, [N, K]);
      if ((n !== 'o' && (qwen || attnBias)) || (n === 'o' && attnBias && !qwen)) add(`${p}.self_attn.${n}_proj.bias`, [N]);
    }
    for (const [n, N, K] of [['gate', I, H], ['up', I, H], ['down', H, I]] as Array<[string, number, number]>) {
      add(`${p}.mlp.${n}_proj.weight`, [N, K]);
      if (mlpBias && !qwen) add(`${p}.mlp.${n}_proj.bias`, [N]);
    }
  }
  writeSafetensors(path.join(dir, 'model.safetensors'), t);
}

describe('loss gradients of other configurations', () => {
  const base = {
    hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 6, num_key_value_heads: 2,
    head_dim: 16, vocab_size: 97, rms_norm_eps: 1e-6, max_position_embeddings: 256, hidden_act: 'silu', torch_dtype: 'float32',
  };
  const configs: Array<[string, Record<string, unknown>]> = [
    ['qwen2: q/k/v biases, tied embeddings, GQA 3', { ...base, model_type: 'qwen2', tie_word_embeddings: true, rope_theta: 1000000 }],
    ['llama: attention and MLP biases, llama3 RoPE scaling, separate lm_head, MHA', {
      ...base, model_type: 'llama', num_key_value_heads: 6, attention_bias: true, mlp_bias: true, tie_word_embeddings: false,
      rope_theta: 500000, rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 32 },
    }],
  ];
  configs.forEach(([what, config], i) => {
    test(what, async () => {
      const dir = path.join(tmp, `random-${i}`);
      writeRandomCheckpoint(dir, config, 40 + i);
      const bp = Backprop.open(dir);
      const ids = randomIds(48, bp.config.vocabSize, 50 + i);
      const r = await bp.window(ids, { weightGrads: true });
      const nll = await runtimeNll(dir, ids);
      expect(Math.abs(r.loss - nll)).toBeLessThan(1e-4 * nll);
      for (const name of ['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.k_proj.weight', 'model.layers.1.self_attn.o_proj.weight', 'model.layers.1.mlp.down_proj.weight']) {
        const G = r.weightGrads!.get(name)!, gn = norm(G);
        const { fd } = await directional(bp, ids, name, G, Float32Array.from(G, (g) => g / gn));
        expect({ name, diff: Math.abs(fd - gn) / gn < 0.01 }).toEqual({ name, diff: true });
      }
    });
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
      // uniform slots: the same bounds in both, so only the weighting differs
      const fisher = await calibrateKv(model, windows, { bits: 2, sink: 1, fisher: bp, slots: 'uniform' });
      const plain = await calibrateKv(model, windows, { bits: 2, sink: 1, sensitivity: false, slots: 'uniform' });
      // the default per-layer slots after a gradient pass too
      const perLayer = await calibrateKv(model, windows, { bits: 2, sink: 1, fisher: bp, allocateWindows: 1 });
      expect(perLayer.sensitivity).toBe('fisher');
      expect(perLayer.slots!.key).toHaveLength(model.config.numLayers);
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
