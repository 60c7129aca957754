// createRandomModel with `quantize` (SqueezeLLM linears quantized in process) against a dense
// model loaded from the dequantized weights: same logits and greedy tokens, so every quantized
// linear sits where its dense weight would (q|k|v and gate|up order included).
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { createRandomModel, loadModel, Model } from '../ts/model/model';
import { writeSafetensors, WriteTensor } from '../ts/model/safetensors';
import { RandomQuantizeProgress } from '../ts/model/weights';
import { SqueezeLinear, dequantize } from '../ts/quant/squeezellm';
import { Tensor } from '../ts/tensor';
import { describeGpu, maxAbsErr, relErr } from './gpu';

// GQA (q has more rows than k and v) and K not a multiple of 32 for down_proj (intermediate 80).
const CONFIG = {
  model_type: 'llama',
  hidden_size: 64,
  intermediate_size: 80,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 97,
  max_position_embeddings: 64,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  torch_dtype: 'float16',
  tie_word_embeddings: false,
};
const LINEARS = ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj',
  'mlp.up_proj', 'mlp.down_proj'];
const PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26];

// The norm weight in a fused call's options (siluPairs' third argument, ropeAppend's fifth).
const normOf = (a: unknown) => (a && typeof a === 'object' && 'normWeight' in a ? a.normWeight : undefined);
// Logits of a 1- and a 2-row pass (the fused decode pass on CUDA) and 8 greedy tokens.
async function decodeOutputs(m: Model): Promise<{ one: Float32Array; two: Float32Array; ids: number[] }> {
  return { one: await m.logits([PROMPT[0]]), two: await m.logits(PROMPT.slice(0, 2)), ids: (await m.generateBatch([{ ids: PROMPT, maxTokens: 8 }]))[0].ids };
}
function expectSameOutputs(a: { one: Float32Array; two: Float32Array; ids: number[] }, b: typeof a): void {
  expect(relErr(a.one, b.one)).toBeLessThan(1e-3);
  expect(relErr(a.two, b.two)).toBeLessThan(1e-3);
  expect(a.ids).toEqual(b.ids);
}

async function dense(t: Tensor): Promise<WriteTensor> {
  const data = await t.toArray();
  return { dtype: t.dtype, shape: t.shape, data };
}

/**
 * A checkpoint folder with the quantized model's dense tensors and each linear dequantized;
 * `swap` names two linears whose weights trade places (a deliberately miswired reference).
 */
async function denseCheckpoint(m: Model, linears: Map<string, SqueezeLinear>, swap?: [string, string],
  config: Record<string, unknown> = CONFIG): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-randq-'));
  const w = m.decoder.w;
  // A quantized lm_head (quantize.lmHead) goes in dequantized, like the decoder's linears.
  const head = linears.get('lm_head');
  const tensors: Record<string, WriteTensor> = {
    'model.embed_tokens.weight': await dense(w.embed),
    'model.norm.weight': await dense(w.norm),
    'lm_head.weight': head ? { dtype: 'f32', shape: [head.N, head.K], data: dequantize(head) } : await dense(w.lmHead as Tensor),
  };
  // A fused bias [sum of parts] cut back into the checkpoint's per-linear biases.
  const biases = async (prefix: string, names: string[], sizes: number[], b?: Tensor): Promise<void> => {
    if (!b) return;
    const all = await b.toFloat32();
    let at = 0;
    names.forEach((n, j) => {
      tensors[`${prefix}.${n}.bias`] = { dtype: 'f32', shape: [sizes[j]], data: all.slice(at, at + sizes[j]) };
      at += sizes[j];
    });
    expect(at).toBe(all.length);
  };
  for (let i = 0; i < (config.num_hidden_layers as number); i++) {
    const p = `model.layers.${i}`, L = w.layers[i];
    tensors[`${p}.input_layernorm.weight`] = await dense(L.ln1);
    tensors[`${p}.post_attention_layernorm.weight`] = await dense(L.ln2);
    for (const name of LINEARS) {
      const from = swap && name === swap[0] ? swap[1] : swap && name === swap[1] ? swap[0] : name;
      const l = linears.get(`${p}.${from}`)!;
      tensors[`${p}.${name}.weight`] = { dtype: 'f32', shape: [l.N, l.K], data: dequantize(l) };
    }
    const size = (name: string) => linears.get(`${p}.${name}`)!.N;
    const attn = ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'], mlp = ['mlp.gate_proj', 'mlp.up_proj'];
    await biases(p, attn, attn.map(size), L.bqkv);
    await biases(p, ['self_attn.o_proj'], [size('self_attn.o_proj')], L.bo);
    await biases(p, mlp, mlp.map(size), L.bgu);
    await biases(p, ['mlp.down_proj'], [size('mlp.down_proj')], L.bdown);
  }
  writeSafetensors(path.join(dir, 'model.safetensors'), tensors);
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
  return dir;
}

// Biased variants of CONFIG: qwen2 (q/k/v biases) and llama with attention and MLP biases.
const BIASED: Array<[string, Record<string, unknown>]> = [
  ['qwen2, q/k/v biases', { ...CONFIG, model_type: 'qwen2' }],
  ['llama, attention and MLP biases', { ...CONFIG, attention_bias: true, mlp_bias: true }],
];

/** [out, in] of each linear of CONFIG (hidden 64, 4 heads of 16 over 2 kv heads, intermediate 80). */
const SHAPES: Record<string, number[]> = {
  q_proj: [64, 64], k_proj: [32, 64], v_proj: [32, 64], o_proj: [64, 64], gate_proj: [80, 64], up_proj: [80, 64], down_proj: [64, 80],
};

/**
 * A random model of `config` quantized in process on `device`, and on the CPU the dense model of
 * its dequantized weights and biases; `body` gets both and the quantized linears by name. Both
 * models and the checkpoint folder are freed afterwards.
 */
async function withDenseTwin(config: Record<string, unknown>, device: 'cpu' | 'cuda',
  o: { seed: number; maxBatch: number; bits: 3 | 4; lmHead?: boolean; onProgress?: (p: RandomQuantizeProgress) => void },
  body: (m: Model, ref: Model, linears: Map<string, SqueezeLinear>) => Promise<void>): Promise<void> {
  const linears = new Map<string, SqueezeLinear>();
  const m = await createRandomModel(config, {
    device, seed: o.seed, maxBatch: o.maxBatch, maxContext: 64,
    quantize: { bits: o.bits, outliers: 0.02, iters: 10, lmHead: o.lmHead, onLinear: (n, l) => linears.set(n, l), onProgress: o.onProgress },
  });
  let dir: string | undefined, ref: Model | undefined;
  try {
    // (a quantized head is never tied: the reference gets its dequantized copy as lm_head.weight)
    dir = await denseCheckpoint(m, linears, undefined, o.lmHead ? { ...config, tie_word_embeddings: false } : config);
    ref = await loadModel(dir, { device: 'cpu', maxBatch: o.maxBatch, maxContext: 64 });
    await body(m, ref, linears);
  } finally {
    await m.dispose();
    await ref?.dispose();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** The CPU comparison: logits within 1e-5 of the dense twin's and the same greedy tokens; returns ours. */
async function expectDenseTwin(m: Model, ref: Model): Promise<Float32Array> {
  const ours = await m.logits(PROMPT);
  expect(maxAbsErr(ours, await ref.logits(PROMPT))).toBeLessThan(1e-5);
  const greedy = async (x: Model) => (await x.generateBatch([{ ids: PROMPT, maxTokens: 6 }]))[0].ids;
  expect(await greedy(m)).toEqual(await greedy(ref));
  return ours;
}

describe('createRandomModel with quantize (cpu)', () => {
  for (const bits of [4, 3] as const)
    test(`${bits}-bit dense-and-sparse linears equal the dense model of their dequantized weights`, async () => {
      const events: RandomQuantizeProgress[] = [];
      await withDenseTwin(CONFIG, 'cpu', { seed: 11, maxBatch: 2, bits, onProgress: (p) => events.push(p) }, async (m, ref, linears) => {
        // Every linear quantized once, at its own shape, with outliers.
        expect([...linears.keys()].sort()).toEqual(
          [0, 1].flatMap((i) => LINEARS.map((n) => `model.layers.${i}.${n}`)).sort());
        for (const [name, l] of linears) {
          expect(l.bits).toBe(bits);
          expect(l.cols!.length).toBeGreaterThan(0);
          expect([l.N, l.K]).toEqual(SHAPES[name.slice(name.lastIndexOf('.') + 1)]);
        }
        expect(events.length).toBe(14);
        expect(events.map((e) => e.linearsDone)).toEqual(Array.from({ length: 14 }, (_, i) => i + 1));
        expect(events[6].layersDone).toBe(1);
        expect(events[13]).toMatchObject({ layersDone: 2, layers: 2, linears: 14, name: 'model.layers.1.mlp.down_proj' });

        const ours = await expectDenseTwin(m, ref);
        // The comparison can tell miswiring apart: gate/up or k/v traded places changes the logits.
        for (const swap of [['mlp.gate_proj', 'mlp.up_proj'], ['self_attn.k_proj', 'self_attn.v_proj']] as [string, string][]) {
          const dir = await denseCheckpoint(m, linears, swap);
          const bad = await loadModel(dir, { device: 'cpu', maxBatch: 1, maxContext: 64 });
          try {
            expect(maxAbsErr(ours, await bad.logits(PROMPT))).toBeGreaterThan(1e-3);
          } finally {
            await bad.dispose();
            fs.rmSync(dir, { recursive: true, force: true });
          }
        }
      });
    });

  for (const [what, config] of BIASED)
    test(`${what}: dense biases beside quantized linears equal the dense model`, async () => {
      await withDenseTwin(config, 'cpu', { seed: 12, maxBatch: 2, bits: 4 }, async (m, ref) => {
        const L = m.decoder.w.layers[0];
        expect(L.bqkv).toBeDefined();
        expect(L.bo !== undefined).toBe(config.attention_bias === true);
        expect(L.bgu !== undefined && L.bdown !== undefined).toBe(config.mlp_bias === true);
        const ours = await expectDenseTwin(m, ref);
        // The biases count: the same model without them gives other logits (then they go back, to be freed).
        const layers = ref.decoder.w.layers, kept = layers.map((l) => ({ ...l }));
        for (const l of layers) { l.bqkv = undefined; l.bo = undefined; l.bgu = undefined; l.bdown = undefined; }
        expect(maxAbsErr(ours, await ref.logits(PROMPT))).toBeGreaterThan(1e-3);
        layers.forEach((l, i) => Object.assign(l, kept[i]));
      });
    });

  test('lmHead: the lm_head quantized too equals the dense model of its dequantized weights', async () => {
    const events: RandomQuantizeProgress[] = [];
    // tied in the config: a quantized head unties it (the embeddings stay dense for the row lookup)
    const config = { ...CONFIG, tie_word_embeddings: true };
    await withDenseTwin(config, 'cpu', { seed: 14, maxBatch: 2, bits: 3, lmHead: true, onProgress: (p) => events.push(p) }, async (m, ref, linears) => {
      const head = linears.get('lm_head')!;
      expect([head.N, head.K, head.bits]).toEqual([97, 64, 3]);
      expect(head.cols!.length).toBeGreaterThan(0);
      const w = m.decoder.w;
      expect(w.tied).toBe(false);
      expect('N' in w.lmHead && w.lmHead.N).toBe(97);
      expect(events.length).toBe(15);
      expect(events[14]).toMatchObject({ linearsDone: 15, linears: 15, name: 'lm_head', layersDone: 2 });
      // ref: untied, lm_head.weight = the dequantized head
      const ours = await expectDenseTwin(m, ref);
      // the head counts: the embeddings as the output projection give other logits
      const kept = ref.decoder.w.lmHead;
      ref.decoder.w.lmHead = ref.decoder.w.embed;
      try {
        expect(maxAbsErr(ours, await ref.logits(PROMPT))).toBeGreaterThan(1e-3);
      } finally {
        ref.decoder.w.lmHead = kept;
      }
    });
  });

  test('errors: bits, outlier share', async () => {
    await expect(createRandomModel(CONFIG, { device: 'cpu', quantize: { bits: 2 as 3 } })).rejects.toMatchObject({ code: 'ERR_UNSUPPORTED' });
    await expect(createRandomModel(CONFIG, { device: 'cpu', quantize: { bits: 4, outliers: 1.5 } })).rejects.toMatchObject({ code: 'ERR_ARG' });
  });
});

describeGpu('createRandomModel with quantize (cuda)', () => {
  // [name, config, bits, seed, prompt mixing]: the second case has attention and MLP biases.
  const cases: Array<[string, Record<string, unknown>, 3 | 4, number, [number, number], boolean]> = [
    ['quantized on the GPU: prefill and fused decode passes match the dense CPU model; decode steps replay graphs', CONFIG, 4, 11, [5, 17], false],
    ['biases beside quantized linears (attention and MLP): prefill, fused decode and graph replay match the dense CPU model',
      BIASED[1][1], 3, 13, [3, 11], false],
    ['the lm_head quantized too (LUT GEMV / GEMM logits, odd vocabulary): prefill, fused decode and graph replay match the dense CPU model',
      CONFIG, 4, 15, [7, 13], true],
  ];
  for (const [what, config, bits, seed, [mi, mp], lmHead] of cases)
    test(what, async () => {
      await withDenseTwin(config, 'cuda', { seed, maxBatch: 3, bits, lmHead }, async (m, ref, linears) => {
        expect(linears.size).toBe(lmHead ? 15 : 14);
        // fp16 activations and tables against the f32 oracle; 1 and 2 rows take the fused decode pass.
        for (const ids of [PROMPT, [PROMPT[0]], PROMPT.slice(0, 2)])
          expect(relErr(await m.logits(ids), await ref.logits(ids))).toBeLessThan(1e-2);
        // three 50-token prompts in one prefill, 150 rows: the dense copy of each quantized weight
        // (past M = 64, csrc/kernels/lut_gemm/dense_path.cuh)
        const prompts = [0, 1, 2].map((p) => Array.from({ length: 50 }, (_, i) => (PROMPT[i % PROMPT.length] + mi * i + mp * p) % 97));
        const got = await m.logitsBatch(prompts), want = await ref.logitsBatch(prompts);
        for (let p = 0; p < 3; p++) expect(relErr(got[p], want[p])).toBeLessThan(1e-2);
        const [a] = await m.generateBatch([{ ids: PROMPT, maxTokens: 8 }]);
        expect(m.stats.captureError).toBeUndefined();
        expect(m.stats.graphReplays).toBeGreaterThan(0);
        m.graphs = false;
        const [b] = await m.generateBatch([{ ids: PROMPT, maxTokens: 8 }]);
        expect(b.ids).toEqual(a.ids);
      });
    });

  test('fused decode: gate|up and q|k|v, stored paired, do siluMul and RoPE + cache append in their epilogues, with the RMSNorm in front; o and down add to the residual; same logits and tokens as apart', async () => {
    const m = await createRandomModel(CONFIG, { device: 'cuda', seed: 21, maxBatch: 2, maxContext: 64, quantize: { bits: 4, outliers: 0.02, iters: 10 } });
    try {
      m.decoder.fuseLutSilu = true;
      m.decoder.fuseLutRope = true;
      m.decoder.fuseLutNorm = true;
      const layers = m.decoder.w.layers;
      const half = (w: unknown) => (w && typeof w === 'object' && 'pairHalf' in w ? w.pairHalf : -1);
      expect([layers.map((l) => half(l.wgu)), layers.map((l) => half(l.wqkv))]).toEqual([[80, 80], [8, 8]]);
      const spies = [
        ...layers.map((l) => jest.spyOn(l.wgu as { siluPairs(a: Tensor, x: Tensor): void }, 'siluPairs')),
        ...layers.map((l) => jest.spyOn(l.wqkv as unknown as { ropeAppend(...a: unknown[]): void }, 'ropeAppend')),
        ...layers.map((l) => jest.spyOn(l.wo as unknown as { forwardAdd(y: Tensor, x: Tensor): void }, 'forwardAdd')),
        ...layers.map((l) => jest.spyOn(l.wdown as unknown as { forwardAdd(y: Tensor, x: Tensor): void }, 'forwardAdd')),
      ];
      const fused = await decodeOutputs(m);
      const calls = spies.map((s) => s.mock.calls.length);
      expect(calls.every((c) => c >= 2)).toBe(true);  // each 1- and 2-row pass (decode steps replay graphs)
      // the norm went in with the projections that read it
      expect(spies.slice(0, 2 * layers.length).every((s, i) => s.mock.calls.every((c) => normOf(c[i < layers.length ? 2 : 4]) !== undefined))).toBe(true);
      m.decoder.fuseLutSilu = false;
      m.decoder.fuseLutRope = false;
      m.decoder.fuseLutNorm = false;
      m.graphs = false;  // (the graphs captured above hold the fused launches)
      const apart = await decodeOutputs(m);
      expect(spies.map((s) => s.mock.calls.length)).toEqual(calls);
      expectSameOutputs(fused, apart);
      spies.forEach((s) => s.mockRestore());
    } finally {
      await m.dispose();
    }
  });

  test('fused decode, 3-bit: the RMSNorm goes in with the projections, or is a kernel of its own without fuseLutNorm; same logits and tokens either way', async () => {
    const m = await createRandomModel(CONFIG, { device: 'cuda', seed: 23, maxBatch: 2, maxContext: 64, quantize: { bits: 3, outliers: 0.02, iters: 10 } });
    try {
      const layers = m.decoder.w.layers;
      const spies = [
        ...layers.map((l) => jest.spyOn(l.wgu as { siluPairs(a: Tensor, x: Tensor): void }, 'siluPairs')),
        ...layers.map((l) => jest.spyOn(l.wqkv as unknown as { ropeAppend(...a: unknown[]): void }, 'ropeAppend')),
      ];
      const normed = () => spies.map((s, i) => s.mock.calls.length > 0 && s.mock.calls.every((c) => normOf(c[i < layers.length ? 2 : 4]) !== undefined));
      expect(m.decoder.fuseLutNorm).toBe(true);
      const fused = await decodeOutputs(m);
      expect(normed().every((v) => v)).toBe(true);
      expect(spies.every((s) => s.mock.calls.length >= 2)).toBe(true);
      spies.forEach((s) => s.mockClear());
      m.decoder.fuseLutNorm = false;
      m.graphs = false;  // (the graphs captured above hold the launches with the norm)
      const apart = await decodeOutputs(m);
      expect(spies.every((s) => s.mock.calls.length >= 2)).toBe(true);
      expect(normed().some((v) => v)).toBe(false);
      expectSameOutputs(fused, apart);
      spies.forEach((s) => s.mockRestore());
    } finally {
      await m.dispose();
    }
  });
});
