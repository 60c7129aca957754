/**
 * LoRA adapters (S-LoRA serving): the batched loraApply op against a plain reference (CPU) and
 * CUDA against CPU; PEFT folders read and checked; logits with an adapter against PEFT's own
 * (tiny-llama-gqa's a8 and b16 references); batches that mix adapters; generation through the
 * scheduler with adapters swapped in and out of a small pool; every refusal coded.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { DType, Tensor } from '../ts/tensor';
import * as ops from '../ts/ops';
import { loadModel, Model } from '../ts/model/model';
import { SafetensorsFile, writeSafetensors } from '../ts/model/safetensors';
import { perplexity } from '../ts/runtime/ppl';
import { LoraPool } from '../ts/runtime/lora-pool';
import { loadConfig } from '../ts/model/config';
import { readLoraAdapter } from '../ts/model/lora';
import { describeGpu, freshSeed, randn, relErr, rng } from './gpu';

const TINY = path.join(__dirname, 'fixtures', 'tiny-llama-gqa');
const A8 = path.join(TINY, 'adapters', 'a8'), B16 = path.join(TINY, 'adapters', 'b16');

function t(data: ArrayLike<number>, shape: number[], dtype: DType = 'f32', device = 'cpu'): Tensor {
  if (dtype === 'i32') return Tensor.from(Int32Array.from(data), shape, { dtype, device });
  return Tensor.from(Float32Array.from(data), shape, { dtype, device });
}

/** y + the LoRA delta of each row, in float64, from the op's definition. */
function reference(y: Float32Array, x: Float32Array, slots: number[], A: Float32Array, Bt: Float32Array, desc: number[], scale: number[],
  K: number, N: number, R: number): Float64Array {
  const out = Float64Array.from(y);
  slots.forEach((s, row) => {
    if (s < 0 || s >= scale.length) return;
    const off = desc[2 * s], rank = desc[2 * s + 1];
    if (off < 0 || rank <= 0 || off + rank > R) return;
    for (let j = 0; j < rank; j++) {
      let d = 0;
      for (let k = 0; k < K; k++) d += A[(off + j) * K + k] * x[row * K + k];
      for (let n = 0; n < N; n++) out[row * N + n] += scale[s] * d * Bt[(off + j) * N + n];
    }
  });
  return out;
}

/** A random case: rows with adapters of ranks 1..24, rows with none, and entries out of range. */
function randomCase(seed: number, T: number, K: number, N: number) {
  const r = rng(seed);
  const S = 5, ranks = [1, 8, 24, 0, 3], R = 60;
  const desc: number[] = [];
  let off = 0;
  for (let s = 0; s < S; s++) {
    desc.push(off, ranks[s]);
    off += ranks[s];
  }
  desc[2 * 4] = R - 2;  // slot 4: a range past the pool's end, skipped
  const slots = Array.from({ length: T }, (_, i) => [0, 1, 2, 3, 4, -1, 7][i % 7]);
  return {
    S, R, slots, desc, scale: [0.5, 2, 1.25, 3, 1],
    x: randn(T * K, r), y: randn(T * N, r), A: randn(R * K, r, 0.3), Bt: randn(R * N, r, 0.3),
  };
}

describe('loraApply (CPU)', () => {
  test.each([[7, 64, 48], [9, 257, 129], [1, 5, 3]])('T=%i K=%i N=%i against the definition', async (T, K, N) => {
    const seed = freshSeed();
    const c = randomCase(seed, T, K, N);
    const y = t(c.y, [T, N]);
    ops.loraApply(y, t(c.x, [T, K]), t(c.slots, [T], 'i32'), t(c.A, [c.R, K]), t(c.Bt, [c.R, N]), t(c.desc, [c.S, 2], 'i32'), t(c.scale, [c.S]));
    const got = await y.toFloat32(), want = reference(c.y, c.x, c.slots, c.A, c.Bt, c.desc, c.scale, K, N, c.R);
    expect(relErr(got, want)).toBeLessThan(1e-5);
    // rows with no adapter (-1, out-of-range slot, rank 0, a range past the pool) are untouched
    for (let row = 0; row < T; row++) {
      if (![3, 4, 5, 6].includes(row % 7)) continue;
      expect(Array.from(got.subarray(row * N, (row + 1) * N))).toEqual(Array.from(c.y.subarray(row * N, (row + 1) * N)));
    }
  });

  test('shapes and dtypes are checked before any work', () => {
    const y = t(new Float32Array(12), [3, 4]), x = t(new Float32Array(15), [3, 5]);
    const slots = t([0, 0, 0], [3], 'i32'), A = t(new Float32Array(10), [2, 5]), Bt = t(new Float32Array(8), [2, 4]);
    const desc = t([0, 2], [1, 2], 'i32'), scale = t([1], [1]);
    expect(() => ops.loraApply(y, x, slots, t(new Float32Array(8), [2, 4]), Bt, desc, scale)).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(() => ops.loraApply(y, x, slots, A, t(new Float32Array(6), [2, 3]), desc, scale)).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(() => ops.loraApply(y, x, t([0, 0], [2], 'i32'), A, Bt, desc, scale)).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(() => ops.loraApply(y, x, t([0, 0, 0], [3]), A, Bt, desc, scale)).toThrow(expect.objectContaining({ code: 'ERR_DTYPE' }));
    expect(() => ops.loraApply(y, x, slots, A, Bt, t([0, 2, 1], [3], 'i32'), scale)).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(() => ops.loraApply(y, x, slots, A, Bt, desc, t([1, 1], [2]))).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
  });
});

/** tiny-llama-gqa with an adapter pool and its two adapters (a8, b16) loaded. */
async function withAdapters(o: { device: string; dtype?: 'f16' | 'bf16'; graphs?: boolean }): Promise<Model> {
  const m = await loadModel(TINY, { ...o, lora: {} });
  await m.loadAdapter(A8);
  await m.loadAdapter(B16);
  return m;
}

/** The prompt of tiny-llama-gqa's reference outputs. */
function promptIds(): Int32Array {
  const ref = SafetensorsFile.open(path.join(TINY, 'reference.safetensors'));
  try {
    return ref.readInt32('prompt_ids');
  } finally {
    ref.close();
  }
}

describeGpu('loraApply: CUDA vs CPU', () => {
  const TOL: Record<string, number> = { f32: 1e-5, f16: 2e-3, bf16: 1e-2 };
  for (const dt of ['f16', 'bf16', 'f32'] as DType[]) {
    test(`${dt}: ragged ranks, rows without adapters, odd sizes`, async () => {
      for (const [T, K, N] of [[7, 4096, 12288], [33, 257, 1031], [1, 64, 3000]]) {
        const seed = freshSeed();
        const c = randomCase(seed, T, K, N);
        const run = async (dev: string) => {
          const y = t(c.y, [T, N], dt, dev);
          ops.loraApply(y, t(c.x, [T, K], dt, dev), t(c.slots, [T], 'i32', dev), t(c.A, [c.R, K], dt, dev), t(c.Bt, [c.R, N], dt, dev),
            t(c.desc, [c.S, 2], 'i32', dev), t(c.scale, [c.S], 'f32', dev));
          return y.toFloat32();
        };
        const [cpu, gpu] = [await run('cpu'), await run('cuda')];
        expect({ seed, err: relErr(gpu, cpu) < TOL[dt] }).toEqual({ seed, err: true });
        // deterministic: the same call gives the same bits
        expect(Array.from(await run('cuda'))).toEqual(Array.from(gpu));
      }
    });
  }

  test('an explicit workspace gives the same bits; one too small is refused', async () => {
    const [T, K, N] = [5, 512, 800];
    const seed = freshSeed();
    const c = randomCase(seed, T, K, N);
    const need = ops.loraWorkspaceSize('cuda', T, c.R);
    expect(need).toBe(T * Math.min(c.R, 1024));
    const run = (work?: Tensor) => {
      const y = t(c.y, [T, N], 'f16', 'cuda');
      ops.loraApply(y, t(c.x, [T, K], 'f16', 'cuda'), t(c.slots, [T], 'i32', 'cuda'), t(c.A, [c.R, K], 'f16', 'cuda'), t(c.Bt, [c.R, N], 'f16', 'cuda'),
        t(c.desc, [c.S, 2], 'i32', 'cuda'), t(c.scale, [c.S], 'f32', 'cuda'), work);
      return y.toFloat32();
    };
    const work = Tensor.from(new Float32Array(need).fill(NaN), [need], { dtype: 'f32', device: 'cuda' });
    const small = Tensor.empty([need - 1], { dtype: 'f32', device: 'cuda' });
    try {
      expect(Array.from(await run(work))).toEqual(Array.from(await run()));
      let code: unknown;
      try {
        run(small);
      } catch (e) {
        code = (e as { code?: string }).code;
      }
      expect(code).toBe('ERR_SHAPE');
    } finally {
      work.dispose();
      small.dispose();
    }
  });

  test('decode graphs per batch kind: base batches and adapter batches of one size each replay their own', async () => {
    // Same device and dtype, graphs on and off: the kernels are the same, so greedy tokens are equal.
    const withGraphs = await withAdapters({ device: 'cuda', dtype: 'f16', graphs: true });
    const eager = await withAdapters({ device: 'cuda', dtype: 'f16', graphs: false });
    try {
      const ids = promptIds();
      const batch = (adapter?: string) => [0, 1].map((i) => ({ ids: ids.subarray(i, 12 + i), maxTokens: 8, temperature: 0, adapter }));
      const outs: number[][][] = [];
      // base (captures the base graph of B = 2), adapter (its own graph), then both again (replays)
      for (const adapter of [undefined, 'b16', undefined, 'b16', 'a8']) {
        const [g, e] = [await withGraphs.generateBatch(batch(adapter)), await eager.generateBatch(batch(adapter))];
        expect(g.map((r) => r.ids)).toEqual(e.map((r) => r.ids));
        outs.push(g.map((r) => r.ids));
      }
      expect(withGraphs.stats.graphReplays).toBeGreaterThan(10);
      expect(withGraphs.stats.captureError).toBeUndefined();
      expect(eager.stats.graphReplays).toBe(0);
      // the adapters change the greedy tokens here, so a base graph replayed for an adapter batch would fail above
      expect(outs[1]).not.toEqual(outs[0]);
    } finally {
      await withGraphs.dispose();
      await eager.dispose();
    }
  });

  test('a tiny-llama decode with mixed adapters matches the CPU', async () => {
    const cpu = await withAdapters({ device: 'cpu' });
    const gpu = await withAdapters({ device: 'cuda', dtype: 'f16' });
    try {
      const ids = promptIds();
      for (const a of ['a8', 'b16']) expect(relErr(await gpu.logits(ids, { adapter: a }), await cpu.logits(ids, { adapter: a }))).toBeLessThan(1e-2);
      const reqs = ['a8', undefined, 'b16'].map((adapter, i) => ({ ids: ids.subarray(0, 10 + i), maxTokens: 6, temperature: 0, adapter }));
      const [rc, rg] = [await cpu.generateBatch(reqs), await gpu.generateBatch(reqs)];
      rc.forEach((r, i) => expect(rg[i].finishReason).toBe(r.finishReason));
    } finally {
      await cpu.dispose();
      await gpu.dispose();
    }
  });
});

describe('LoRA adapters on tiny-llama-gqa (CPU) against PEFT', () => {
  let model: Model;
  let ids: Int32Array;
  const refs: Record<string, Float32Array> = {};

  beforeAll(async () => {
    const ref = SafetensorsFile.open(path.join(TINY, 'reference.safetensors'));
    ids = ref.readInt32('prompt_ids');
    for (const k of ['logits', 'logits_a8', 'logits_b16']) refs[k] = ref.readFloat32(k);
    ref.close();
    model = await loadModel(TINY, { device: 'cpu', maxBatch: 4, lora: { maxAdapters: 2, maxRank: 48 } });
    const info = await model.loadAdapter(A8);
    expect(info).toMatchObject({ name: 'a8', ranks: { q_proj: 8, v_proj: 8 }, scales: { q_proj: 2, v_proj: 2 } });
    await model.loadAdapter(B16);
    expect(model.adapters).toEqual(['a8', 'b16']);
  });
  afterAll(async () => {
    await model.dispose();
  });

  test('logits with each adapter match PEFT; without one, the base model', async () => {
    expect(relErr(await model.logits(ids), refs.logits)).toBeLessThan(2e-3);
    for (const a of ['a8', 'b16']) {
      const l = await model.logits(ids, { adapter: a });
      expect(relErr(l, refs[`logits_${a}`])).toBeLessThan(2e-3);
      // the adapter changes the logits a lot, so matching the base would fail the line above
      expect(relErr(refs.logits, refs[`logits_${a}`])).toBeGreaterThan(0.5);
    }
  });

  test('one batch mixing adapters and the base model gives each sequence its own logits', async () => {
    const out = await model.logitsBatch([ids, ids.subarray(0, 20), ids, ids], { adapters: ['b16', undefined, 'a8'] });
    expect(relErr(out[0], refs.logits_b16)).toBeLessThan(2e-3);
    expect(relErr(out[1], refs.logits.subarray(0, 20 * 512))).toBeLessThan(2e-3);
    expect(relErr(out[2], refs.logits_a8)).toBeLessThan(2e-3);
    expect(relErr(out[3], refs.logits)).toBeLessThan(2e-3);
  });

  test('generation with adapters: greedy tokens follow each adapter\'s logits, mixed in one batch', async () => {
    const prompt = ids.subarray(0, 16);
    const greedy = async (adapter?: string) => {
      const seq = Array.from(prompt);
      for (let i = 0; i < 6; i++) {
        const l = await model.logits(seq, { adapter });
        const last = l.subarray((seq.length - 1) * 512, seq.length * 512);
        let best = 0;
        for (let v = 1; v < 512; v++) if (last[v] > last[best]) best = v;
        seq.push(best);
      }
      return seq.slice(prompt.length);
    };
    const want = { a8: await greedy('a8'), b16: await greedy('b16'), base: await greedy() };
    const res = await model.generateBatch([
      { ids: prompt, maxTokens: 6, temperature: 0, adapter: 'a8' },
      { ids: prompt, maxTokens: 6, temperature: 0 },
      { ids: prompt, maxTokens: 6, temperature: 0, adapter: 'b16' },
    ]);
    expect(res.map((r) => r.ids)).toEqual([want.a8, want.base, want.b16]);
    expect(new Set([want.a8.join(), want.b16.join(), want.base.join()]).size).toBe(3);
  });

  test('more adapters than slots: requests wait for a slot, adapters are swapped in, results stay right', async () => {
    const m = await loadModel(TINY, { device: 'cpu', maxBatch: 4, lora: { maxAdapters: 1, maxRank: 48 } });
    try {
      await m.loadAdapter(A8);
      await m.loadAdapter(B16);
      await m.loadAdapter(A8, { name: 'a8-again' });
      const prompt = ids.subarray(0, 12);
      const solo = async (adapter: string) => (await m.generateBatch([{ ids: prompt, maxTokens: 5, temperature: 0, adapter }]))[0].ids;
      const one = { a8: await solo('a8'), b16: await solo('b16') };
      // three requests at once, two adapters, one slot: they run one adapter at a time
      const res = await m.generateBatch(['a8', 'b16', 'a8-again'].map((adapter) => ({ ids: prompt, maxTokens: 5, temperature: 0, adapter })));
      expect(res.map((r) => r.ids)).toEqual([one.a8, one.b16, one.a8]);
      expect(relErr(await m.logits(ids, { adapter: 'b16' }), refs.logits_b16)).toBeLessThan(2e-3);
      expect(relErr(await m.logits(ids, { adapter: 'a8' }), refs.logits_a8)).toBeLessThan(2e-3);
      // a request waiting for a slot does not hold up the base model or a resident adapter
      const order: string[] = [];
      const run = async (tag: string, adapter: string | undefined, n: number) => {
        for await (const _ of m.generate({ ids: prompt, maxTokens: n, temperature: 0, adapter })) void _;
        order.push(tag);
      };
      await Promise.all([run('a8 long', 'a8', 30), run('b16', 'b16', 4), run('base', undefined, 4), run('a8 short', 'a8', 4)]);
      expect(order.indexOf('base')).toBeLessThan(order.indexOf('a8 long'));
      expect(order.indexOf('a8 short')).toBeLessThan(order.indexOf('a8 long'));
      expect(order.indexOf('b16')).toBeGreaterThan(order.indexOf('a8 long'));
      // one logitsBatch needing two adapters at once cannot run with one slot
      await expect(m.logitsBatch([ids, ids], { adapters: ['a8', 'b16'] })).rejects.toMatchObject({ code: 'ERR_STATE' });
      expect(m.freeKvPages).toBe(m.kvPages);
    } finally {
      await m.dispose();
    }
  });

  test('perplexity with an adapter: prefill and decode-style agree, and differ from the base', async () => {
    const windows = [ids.subarray(0, 24), ids.subarray(20, 44)].map((w) => Int32Array.from(w));
    const data = { windows, length: 24 };
    const pre = await perplexity(model, data, { adapter: 'b16', batch: 2 });
    const dec = await perplexity(model, data, { adapter: 'b16', batch: 2, decode: true });
    const base = await perplexity(model, data, { batch: 2 });
    expect(Math.abs(dec.ppl / pre.ppl - 1)).toBeLessThan(1e-4);
    expect(Math.abs(base.ppl / pre.ppl - 1)).toBeGreaterThan(0.01);
    await expect(perplexity(model, data, { adapter: 'nope', decode: true })).rejects.toMatchObject({ code: 'ERR_ARG' });
  });

  test('a pass runs LoRA deltas only at the sites its rows\' adapters have weights at; none without adapters', async () => {
    const pool = model.decoder.lora!;
    const spy = jest.spyOn(pool, 'apply');
    try {
      const base = await model.logitsBatch([ids.subarray(0, 12), ids.subarray(0, 9)]);
      expect(spy).not.toHaveBeenCalled();
      expect(relErr(base[0], refs.logits.subarray(0, 12 * 512))).toBeLessThan(2e-3);
      const L = model.decoder.cfg.numLayers;
      const sitesRun = () => {
        const calls = spy.mock.calls.map((c) => `${c[0]}:${c[1]}`);
        spy.mockClear();
        return calls;
      };
      const each = (...sites: string[]) => Array.from({ length: L }, (_, l) => sites.map((s) => `${l}:${s}`)).flat();
      // a8 has weights at q_proj and v_proj (the q|k|v site), b16 also at k_proj and o_proj
      const withA8 = await model.logitsBatch([ids.subarray(0, 12), ids.subarray(0, 9)], { adapters: [undefined, 'a8'] });
      expect(relErr(withA8[1], refs.logits_a8.subarray(0, 9 * 512))).toBeLessThan(2e-3);
      expect(sitesRun()).toEqual(each('qkv'));
      const withB16 = await model.logitsBatch([ids.subarray(0, 12), ids.subarray(0, 9)], { adapters: ['b16', undefined] });
      expect(relErr(withB16[0], refs.logits_b16.subarray(0, 12 * 512))).toBeLessThan(2e-3);
      expect(sitesRun()).toEqual(each('qkv', 'o'));
      await model.logitsBatch([ids.subarray(0, 12), ids.subarray(0, 9)], { adapters: ['a8', 'b16'] });
      expect(sitesRun()).toEqual(each('qkv', 'o'));
      spy.mockClear();
      expect((await model.generateBatch([{ ids: ids.subarray(0, 8), maxTokens: 3, temperature: 0 }]))[0].ids).toHaveLength(3);
      expect(spy).not.toHaveBeenCalled();
    } finally {
      spy.mockRestore();
    }
  });

  test('adapters are unloaded only when idle; unknown adapters are refused', async () => {
    await model.loadAdapter(A8, { name: 'tmp' });
    const it = model.generate({ ids: ids.subarray(0, 8), maxTokens: 40, temperature: 0, adapter: 'tmp' });
    await it.next();
    expect(() => model.unloadAdapter('tmp')).toThrow(expect.objectContaining({ code: 'ERR_STATE' }));
    await it.return?.(undefined);
    // the scheduler lets go of the adapter at its next step
    for (let i = 0; ; i++) {
      try {
        model.unloadAdapter('tmp');
        break;
      } catch (e) {
        if ((e as { code?: string }).code !== 'ERR_STATE' || i > 500) throw e;
        await new Promise((r) => setTimeout(r, 10));
      }
    }
    expect(model.adapters).toEqual(['a8', 'b16']);
    expect(() => model.generate({ ids: [1, 2], maxTokens: 2, adapter: 'tmp' })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    await expect(model.logits(ids, { adapter: 'nope' })).rejects.toMatchObject({ code: 'ERR_ARG' });
    await expect(model.loadAdapter(A8)).rejects.toMatchObject({ code: 'ERR_ARG' });  // the name is taken
    expect(() => model.unloadAdapter('nope')).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
  });
});

// S-LoRA over SqueezeLLM: the runtime adds each adapter's delta after the quantized projection. The
// oracle is the classic merge, computed here from PEFT's own tensors: a dense model whose every
// linear is the dequantized weight plus scale * B A.
describe('LoRA adapters over SqueezeLLM weights (CPU)', () => {
  test('logits equal the adapter merged into the dequantized weights', async () => {
    const { quantizeModel, readSqueezeLinear, dequantize } = await import('../ts/quant/squeezellm');
    const qdir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-lora-q-')), ddir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-lora-d-'));
    let quant: Model | undefined, dense: Model | undefined;
    try {
      await quantizeModel(TINY, { bits: 4, outliers: 0.005, out: qdir, iters: 8 });
      const acfg = JSON.parse(fs.readFileSync(path.join(B16, 'adapter_config.json'), 'utf8'));
      const scale = acfg.lora_alpha / acfg.r;
      const peft = SafetensorsFile.open(path.join(B16, 'adapter_model.safetensors'));
      const qf = SafetensorsFile.open(path.join(qdir, 'model.safetensors'));
      const orig = SafetensorsFile.open(path.join(TINY, 'model.safetensors'));
      const tensors: Record<string, { dtype: string; shape: number[]; data: ArrayBufferView }> = {};
      let merged = 0;
      for (const name of orig.names()) {
        const m = /^(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+_proj))\.weight$/.exec(name);
        if (!m) {
          tensors[name] = { dtype: 'F32', shape: qf.entry(name).shape, data: qf.readFloat32(name) };
          continue;
        }
        const [N, K] = orig.entry(name).shape;
        const w = dequantize(readSqueezeLinear(qf, m[1], K));
        const pa = `base_model.model.${m[1]}.lora_A.weight`, pb = `base_model.model.${m[1]}.lora_B.weight`;
        if (peft.has(pa)) {
          const A = peft.readFloat32(pa), B = peft.readFloat32(pb), r = peft.entry(pa).shape[0];
          for (let n = 0; n < N; n++)
            for (let j = 0; j < r; j++) {
              const b = scale * B[n * r + j];
              for (let k = 0; k < K; k++) w[n * K + k] += b * A[j * K + k];
            }
          merged++;
        }
        tensors[name] = { dtype: 'F32', shape: [N, K], data: w };
      }
      [peft, qf, orig].forEach((f) => f.close());
      expect(merged).toBe(4 * 4);  // q, k, v, o of every layer
      writeSafetensors(path.join(ddir, 'model.safetensors'), tensors);
      fs.copyFileSync(path.join(TINY, 'config.json'), path.join(ddir, 'config.json'));
      const ref = SafetensorsFile.open(path.join(TINY, 'reference.safetensors'));
      const ids = ref.readInt32('prompt_ids');
      ref.close();
      quant = await loadModel(qdir, { device: 'cpu', lora: { maxAdapters: 2, maxRank: 48 } });
      await quant.loadAdapter(B16);
      dense = await loadModel(ddir, { device: 'cpu' });
      const got = await quant.logits(ids, { adapter: 'b16' }), want = await dense.logits(ids);
      expect(relErr(got, want)).toBeLessThan(1e-4);
      // and the same quantized model without the adapter is far from the merged one
      expect(relErr(await quant.logits(ids), want)).toBeGreaterThan(0.1);
    } finally {
      await quant?.dispose();
      await dense?.dispose();
      fs.rmSync(qdir, { recursive: true, force: true });
      fs.rmSync(ddir, { recursive: true, force: true });
    }
  });
});

describe('the adapter pool', () => {
  test('empty slots first, then the least recently used idle one; pinned slots are never taken', async () => {
    const cfg = loadConfig(TINY);
    const pool = new LoraPool(cfg, 'cpu', 'f32', { maxAdapters: 2, maxRank: 48 });
    try {
      for (const n of ['a', 'b', 'c']) pool.register(await readLoraAdapter(A8, cfg, n));
      const sa = pool.acquire('a')!, sb = pool.acquire('b')!;
      expect(new Set([sa, sb]).size).toBe(2);
      expect(pool.acquire('c')).toBeUndefined();  // both pinned
      expect(pool.canAcquire('c')).toBe(false);
      pool.release(sa);
      pool.release(sb);
      expect(pool.acquire('b')).toBe(sb);  // resident: no copy
      pool.release(sb);
      expect(pool.acquire('c')).toBe(sa);  // 'a' was used least recently
      expect(pool.residentNames()[sa]).toBe('c');
      expect(() => pool.release(sb)).toThrow(expect.objectContaining({ code: 'ERR_INTERNAL' }));
      expect(() => pool.unregister('c')).toThrow(expect.objectContaining({ code: 'ERR_STATE' }));
      pool.release(sa);
      pool.unregister('c');
      expect(pool.residentNames()[sa]).toBeUndefined();
      // the headers alone give the same ranks (what the CLI sizes a pool with)
      const full = await readLoraAdapter(B16, cfg), shapes = await readLoraAdapter(B16, cfg, 'b', { weights: false });
      expect(shapes.maxSiteRank).toBe(full.maxSiteRank);
      expect(shapes.ranks).toEqual(full.ranks);
      expect(shapes.bytes).toBe(0);
      const again = await readLoraAdapter(A8, cfg, 'a');
      expect(() => pool.register(again)).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
      expect(() => new LoraPool(cfg, 'cpu', 'f32', { maxAdapters: 0 })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    } finally {
      pool.dispose();
    }
  });
});

describe('PEFT folders: options and refusals', () => {
  let dir: string;
  let model: Model;
  const a8cfg = JSON.parse(fs.readFileSync(path.join(A8, 'adapter_config.json'), 'utf8'));

  /** An adapter folder from a8's tensors (optionally changed) and config overrides. */
  function variant(name: string, cfg: Record<string, unknown>, tensors?: (t: Record<string, { dtype: string; shape: number[]; data: ArrayBufferView }>) => void): string {
    const d = path.join(dir, name);
    fs.mkdirSync(d, { recursive: true });
    fs.writeFileSync(path.join(d, 'adapter_config.json'), JSON.stringify({ ...a8cfg, ...cfg }));
    const st = SafetensorsFile.open(path.join(A8, 'adapter_model.safetensors'));
    const ts: Record<string, { dtype: string; shape: number[]; data: ArrayBufferView }> = {};
    for (const n of st.names()) ts[n] = st.read(n);
    st.close();
    tensors?.(ts);
    writeSafetensors(path.join(d, 'adapter_model.safetensors'), ts);
    return d;
  }

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-lora-'));
    model = await loadModel(TINY, { device: 'cpu', lora: { maxAdapters: 2, maxRank: 32 } });
  });
  afterAll(async () => {
    await model.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('rsLoRA and alpha_pattern scale as PEFT does (each built to equal a8\'s scale of 2)', async () => {
    const ref = SafetensorsFile.open(path.join(TINY, 'reference.safetensors'));
    const ids = ref.readInt32('prompt_ids'), want = ref.readFloat32('logits_a8');
    ref.close();
    await model.loadAdapter(variant('rs', { use_rslora: true, lora_alpha: 2 * Math.sqrt(8) }));
    await model.loadAdapter(variant('pat', { lora_alpha: 1, alpha_pattern: { q_proj: 16, v_proj: 16 } }));
    expect(relErr(await model.logits(ids, { adapter: 'rs' }), want)).toBeLessThan(2e-3);
    expect(relErr(await model.logits(ids, { adapter: 'pat' }), want)).toBeLessThan(2e-3);
    // and a wrong scale shows: alpha 8 halves the delta
    await model.loadAdapter(variant('half', { lora_alpha: 8 }));
    expect(relErr(await model.logits(ids, { adapter: 'half' }), want)).toBeGreaterThan(0.1);
    ['rs', 'pat', 'half'].forEach((n) => model.unloadAdapter(n));
  });

  test('rank_pattern gives one layer its own rank (the first matching key, as PEFT)', async () => {
    const qa = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', qb = 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight';
    // layer 0's q_proj cut to rank 4 (the first 4 rows of A, columns of B)
    const rank4 = (ts: Record<string, { dtype: string; shape: number[]; data: ArrayBufferView }>) => {
      const a = ts[qa], b = ts[qb];
      const A = new Uint16Array(4 * 256), B = new Uint16Array(256 * 4);
      A.set((a.data as Uint16Array).subarray(0, 4 * 256));
      for (let o = 0; o < 256; o++) for (let j = 0; j < 4; j++) B[o * 4 + j] = (b.data as Uint16Array)[o * 8 + j];
      ts[qa] = { dtype: a.dtype, shape: [4, 256], data: A };
      ts[qb] = { dtype: b.dtype, shape: [256, 4], data: B };
    };
    const d = variant('rp', { rank_pattern: { 'layers.0.self_attn.q_proj': 4, q_proj: 2 } }, rank4);
    // the key for layer 0 comes first: q_proj of layer 0 has rank 4, of the other layers rank 2,
    // which a8's rank-8 tensors there do not have
    await expect(model.loadAdapter(d)).rejects.toMatchObject({ code: 'ERR_FORMAT', message: expect.stringMatching(/layers\.1\.self_attn\.q_proj\.lora_A.*expected \[2, 256\]/) });
    const d2 = variant('rp2', { rank_pattern: { 'layers.0.self_attn.q_proj': 4 } }, rank4);
    const info = await model.loadAdapter(d2);
    expect(info.ranks).toEqual({ q_proj: 8, v_proj: 8 });
    model.unloadAdapter('rp2');
  });

  test('each unsupported option or broken folder is a coded error naming what is wrong', async () => {
    const bad = async (d: string, code: string, msg: RegExp) => {
      await expect(model.loadAdapter(d)).rejects.toMatchObject({ code, message: expect.stringMatching(msg) });
    };
    await bad(variant('dora', { use_dora: true }), 'ERR_UNSUPPORTED', /DoRA/);
    await bad(variant('bias', { bias: 'all' }), 'ERR_UNSUPPORTED', /bias/);
    await bad(variant('save', { modules_to_save: ['lm_head'] }), 'ERR_UNSUPPORTED', /modules_to_save/);
    await bad(variant('ia3', { peft_type: 'IA3' }), 'ERR_UNSUPPORTED', /IA3/);
    await bad(variant('r0', { r: 0 }), 'ERR_FORMAT', /'r'/);
    await bad(variant('rank', { r: 4 }), 'ERR_FORMAT', /lora_A.weight' is \[8,256\], expected \[4, 256\]/);
    const qA = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
    await bad(variant('noB', {}, (ts) => delete ts['base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight']), 'ERR_FORMAT', /layer 1 v_proj: lora_B is missing/);
    await bad(variant('shape', {}, (ts) => (ts[qA] = { dtype: 'F32', shape: [8, 300], data: new Float32Array(2400) })), 'ERR_FORMAT', /\[8,300\], expected \[8, 256\]/);
    await bad(variant('extra', {}, (ts) => (ts['base_model.model.model.layers.0.self_attn.q_proj.weight'] = { dtype: 'F32', shape: [1], data: new Float32Array(1) })),
      'ERR_FORMAT', /unexpected tensor 'base_model.model.model.layers.0.self_attn.q_proj.weight'/);
    await bad(variant('layer', {}, (ts) => {
      ts['base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight'] = ts[qA];
      ts['base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight'] = ts['base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'];
    }), 'ERR_FORMAT', /layer 9, the model has 4/);
    await bad(variant('emb', {}, (ts) => (ts['base_model.model.model.embed_tokens.lora_embedding_A'] = { dtype: 'F32', shape: [1], data: new Float32Array(1) })), 'ERR_UNSUPPORTED', /embeddings/);
    const pickle = path.join(dir, 'pickle');
    fs.mkdirSync(pickle);
    fs.writeFileSync(path.join(pickle, 'adapter_config.json'), JSON.stringify(a8cfg));
    fs.writeFileSync(path.join(pickle, 'adapter_model.bin'), 'not read');
    await bad(pickle, 'ERR_UNSUPPORTED', /pickle/);
    await bad(path.join(dir, 'missing'), 'ERR_FORMAT', /no adapter_config.json/);
    // b16 at q|k|v needs 48 rows; this pool holds 32 per adapter
    await bad(B16, 'ERR_ARG', /needs 48 rows.*holds 32/);
    expect(model.adapters).toEqual([]);
    // a model loaded without lora refuses adapters
    const plain = await loadModel(TINY, { device: 'cpu' });
    try {
      await expect(plain.loadAdapter(A8)).rejects.toMatchObject({ code: 'ERR_ARG' });
      expect(() => plain.generate({ ids: [1], maxTokens: 1, adapter: 'a8' })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    } finally {
      await plain.dispose();
    }
  });
});
