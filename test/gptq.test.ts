// Error compensation with table refits (ts/quant/gptq.ts) on random layers with correlated inputs.
import { cholesky, gptqFactor, gptqFactorNative, gptqRefit, gptqRefitReference, outputError } from '../ts/quant/gptq';
import { quantizeLinear, dequantize, quantizeCommand } from '../ts/quant/squeezellm';
import { writeSafetensors } from '../ts/model/safetensors';
import { loadModel } from '../ts/model/model';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { rng, randn } from './gpu';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

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

  test('outlierScore error: the same budget, lower output error than the w² score', async () => {
    const r = rng(44), N = 32, K = 64, M = 400;
    const { x, h, sens } = calibration(M, K, r);
    const w = randn(N * K, r, 0.05);
    const f = gptqFactor(h, K, 0.01);
    const o = { bits: 3 as const, sens, outliers: 0.005, sensitive: 0.02, gptq: f, gptqRounds: 2 };
    const byW = await quantizeLinear(w, N, K, o), byE = await quantizeLinear(w, N, K, { ...o, outlierScore: 'error' });
    expect(Math.abs(byE.cols!.length - byW.cols!.length)).toBeLessThan(0.004 * N * K);
    const eW = sampleError(x, M, w, dequantize(byW), N, K), eE = sampleError(x, M, w, dequantize(byE), N, K);
    expect(eE).toBeLessThan(eW);
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

  test('the native factor equals the reference: same order and damped H, U to rounding', async () => {
    const r = rng(Date.now() & 0xffff);
    // K past one 64-column block (and not a multiple of it), a dead channel, a tie on the diagonal
    for (const [K, act] of [[200, true], [150, false], [37, false], [1, true]] as const) {
      const { h } = calibration(3 * K + 8, K, r);
      if (K > 10) {
        for (let j = 0; j < K; j++) h[5 * K + j] = h[j * K + 5] = 0;  // channel 5 never active
        h[9 * K + 9] = h[3 * K + 3] = Math.max(h[9 * K + 9], h[3 * K + 3]);  // a tie in act order (a larger diagonal keeps H definite)
      }
      const ref = gptqFactor(h, K, 0.01, act), got = await gptqFactorNative(h, K, 0.01, act);
      expect(Array.from(got.perm)).toEqual(Array.from(ref.perm));
      expect(Array.from(got.h)).toEqual(Array.from(ref.h));
      let n = 0, d = 0;
      for (let i = 0; i < K * K; i++) {
        n += (got.u[i] - ref.u[i]) ** 2;
        d += ref.u[i] ** 2;
        if (i % K < Math.floor(i / K)) expect(got.u[i]).toBe(0);  // upper
      }
      expect(Math.sqrt(n / d)).toBeLessThan(1e-10);
    }
    await expect(gptqFactorNative(new Float64Array(15), 4)).rejects.toMatchObject({ code: 'ERR_SHAPE' });
    await expect(gptqFactorNative(new Float64Array(16), 4, -1)).rejects.toMatchObject({ code: 'ERR_ARG' });
  });

  test('bad arguments are coded errors', async () => {
    const K = 4, f = gptqFactor(new Float64Array(16).map((_, i) => (i % 5 === 0 ? 1 : 0)), K);
    const w = new Float32Array(8), c = new Uint8Array(8), l = new Float32Array(4), o = new Uint8Array(8);
    await expect(gptqRefit(w, 2, K, c, l, 2, o, f, -1)).rejects.toMatchObject({ code: 'ERR_ARG' });
    await expect(gptqRefit(w, 2, K, c, l, 4, o, f, 1)).rejects.toMatchObject({ code: 'ERR_SHAPE' });
    expect(() => gptqFactor(new Float64Array(15), K)).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
  });
});

describe('quantize --gptq (small random model)', () => {
  let dir: string, model: string;
  beforeAll(() => {
    // A 2-layer LLaMA, hidden 64 (2 query heads, 1 KV head of 32), MLP 96, vocab 128, fp32.
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-gptq-'));
    model = path.join(dir, 'model');
    fs.mkdirSync(model);
    const H = 64, I = 96, V = 128, L = 2, r = rng(51);
    fs.writeFileSync(path.join(model, 'config.json'), JSON.stringify({
      architectures: ['LlamaForCausalLM'], model_type: 'llama', hidden_size: H, intermediate_size: I, head_dim: 32,
      num_attention_heads: 2, num_key_value_heads: 1, num_hidden_layers: L, vocab_size: V, rms_norm_eps: 1e-5,
      max_position_embeddings: 256, rope_theta: 10000, tie_word_embeddings: false, hidden_act: 'silu',
    }));
    const t: Record<string, { dtype: string; shape: number[]; data: Float32Array }> = {};
    const add = (name: string, shape: number[], scale: number, one = false) => {
      const n = shape.reduce((a, b) => a * b, 1);
      t[name] = { dtype: 'f32', shape, data: one ? new Float32Array(n).fill(1) : randn(n, r, scale) };
    };
    add('model.embed_tokens.weight', [V, H], 1);
    add('lm_head.weight', [V, H], 0.1);
    add('model.norm.weight', [H], 0, true);
    for (let l = 0; l < L; l++) {
      const p = `model.layers.${l}`;
      add(`${p}.input_layernorm.weight`, [H], 0, true);
      add(`${p}.post_attention_layernorm.weight`, [H], 0, true);
      add(`${p}.self_attn.q_proj.weight`, [64, H], 0.1);
      add(`${p}.self_attn.k_proj.weight`, [32, H], 0.1);
      add(`${p}.self_attn.v_proj.weight`, [32, H], 0.1);
      add(`${p}.self_attn.o_proj.weight`, [H, 64], 0.1);
      add(`${p}.mlp.gate_proj.weight`, [I, H], 0.1);
      add(`${p}.mlp.up_proj.weight`, [I, H], 0.1);
      add(`${p}.mlp.down_proj.weight`, [H, I], 0.1);
    }
    writeSafetensors(path.join(model, 'model.safetensors'), t);
    const ids = new Int32Array(2 * 48).map(() => Math.floor(r() * V));
    writeSafetensors(path.join(dir, 'calib.safetensors'), { ids: { dtype: 'i32', shape: [2, 48], data: ids } });
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  test('writes a loadable model whose config names the compensation; option errors are coded', async () => {
    const out = path.join(dir, 'q3');
    await quantizeCommand(['--model', model, '--out', out, '--bits', '3', '--calib', path.join(dir, 'calib.safetensors'),
      '--gptq', '--gptq-rounds', '2', '--outlier-score', 'error', '--outliers', '1', '--sensitive', '1']);
    const cfg = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
    expect(cfg.quantization_config).toMatchObject({ error_compensation: 'gptq_refit', gptq_rounds: 2, sensitive_score: 'error' });
    const m = await loadModel(out, { device: 'cpu', maxBatch: 1 });
    try {
      const logits = await m.logitsBatch([Int32Array.from([1, 2, 3, 4])]);
      expect(logits[0].every((v) => Number.isFinite(v))).toBe(true);
    } finally {
      await m.dispose();
    }
    const code = async (argv: string[]) => quantizeCommand(argv).then(() => 'ok', (e) => e.code);
    expect(await code(['--model', model, '--out', path.join(dir, 'x'), '--gptq'])).toBe('ERR_ARG');
    expect(await code(['--model', model, '--out', path.join(dir, 'x'), '--gptq-round', '2'])).toBe('ERR_ARG');
    expect(await code(['--model', model, '--out', path.join(dir, 'x'), '--outlier-score', 'size'])).toBe('ERR_ARG');
  });
});
