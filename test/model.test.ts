import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { isSqueezeError } from '../ts/errors';
import { SafetensorsFile, WriteTensor, writeSafetensors } from '../ts/model/safetensors';
import { loadModel, createRandomModel, Model } from '../ts/model/model';
import { loadPplData, perplexity } from '../ts/runtime/ppl';
import { describeGpu, relErr } from './gpu';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

const TINY = path.join(__dirname, 'fixtures', 'tiny-llama-gqa');
const PYCODER = path.join(__dirname, '..', 'models', 'pycoder-mini');

const tinyRef = (() => {
  const st = SafetensorsFile.open(path.join(TINY, 'reference.safetensors'));
  const r = {
    prompt: st.readInt32('prompt_ids'),
    logits: st.readFloat32('logits'),
    greedy: st.readInt32('greedy_ids'),
    full: st.readFloat32('greedy_full_logits'),
  };
  st.close();
  return r;
})();

const pyRef = (() => {
  const st = SafetensorsFile.open(path.join(PYCODER, 'eval.safetensors'));
  const r = {
    nll: st.readFloat32('nll_fp32'),
    prompt: st.readInt32('greedy_prompt_ids'),
    greedy: st.readInt32('greedy_ids'),
  };
  st.close();
  return r;
})();

function top2(row: ArrayLike<number>): { arg: number; margin: number } {
  let a = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[a]) a = i;
  let b = -Infinity;
  for (let i = 0; i < row.length; i++) if (i !== a && row[i] > b) b = row[i];
  return { arg: a, margin: row[a] - b };
}

function concat(a: ArrayLike<number>, b: ArrayLike<number>): Int32Array {
  const out = new Int32Array(a.length + b.length);
  out.set(Array.from(a));
  out.set(Array.from(b), a.length);
  return out;
}

/** Positions whose reference margin is >= 0.1 must have the same argmax. */
function checkArgmax(ours: Float32Array, ref: Float32Array, V: number): number {
  let checked = 0;
  for (let t = 0; t < ref.length / V; t++) {
    const r = top2(ref.subarray(t * V, (t + 1) * V));
    if (r.margin < 0.1) continue;
    expect([t, top2(ours.subarray(t * V, (t + 1) * V)).arg]).toEqual([t, r.arg]);
    checked++;
  }
  return checked;
}

function suite(device: string, tol: number): void {
  let tiny: Model;
  let py: Model;
  beforeAll(async () => {
    tiny = await loadModel(TINY, { device, maxBatch: 4 });
    py = await loadModel(PYCODER, { device, maxBatch: 4 });
  });
  afterAll(async () => {
    await tiny?.dispose();
    await py?.dispose();
  });

  test('tiny-llama-gqa logits vs transformers', async () => {
    const V = tiny.config.vocabSize;
    const out = await tiny.logits(tinyRef.prompt);
    expect(out.length).toBe(tinyRef.prompt.length * V);
    expect(relErr(out, tinyRef.logits)).toBeLessThan(tol);
    const full = await tiny.logits(concat(tinyRef.prompt, tinyRef.greedy));
    expect(relErr(full, tinyRef.full)).toBeLessThan(tol);
    expect(checkArgmax(full, tinyRef.full, V)).toBeGreaterThan(40);
  });

  test('pycoder-mini: teacher-forced argmax equals the greedy reference', async () => {
    const V = py.config.vocabSize;
    const ids = concat(pyRef.prompt, pyRef.greedy);
    const out = await py.logits(ids);
    const P = pyRef.prompt.length;
    let checked = 0;
    for (let s = 0; s < pyRef.greedy.length; s++) {
      const r = top2(out.subarray((P - 1 + s) * V, (P + s) * V));
      if (r.margin < 0.1) continue;
      expect([s, r.arg]).toEqual([s, pyRef.greedy[s]]);
      checked++;
    }
    expect(checked).toBeGreaterThan(30);
  });

  test('pycoder-mini: perplexity over the first 2 eval windows', async () => {
    const data = loadPplData(py, path.join(PYCODER, 'eval.safetensors'), { windows: 2 });
    expect(data.windows.length).toBe(2);
    const r = await perplexity(py, data, { batch: 2 });
    const want = Math.exp((pyRef.nll[0] + pyRef.nll[1]) / 2);
    expect(Math.abs(r.ppl - want) / want).toBeLessThan(device === 'cpu' ? 0.002 : 0.005);
    expect(r.tokens).toBe(2 * 1023);
    expect(r.windows).toBe(2);
  });

  test('generate: greedy reproduces the reference continuation, text streams', async () => {
    const prompt = "def fibonacci(n):\n    ";
    expect(Array.from(py.tokenizer!.encode(prompt))).toEqual(Array.from(pyRef.prompt));
    const ids: number[] = [];
    let text = '';
    for await (const e of py.generate({ prompt, maxTokens: 24 })) {
      ids.push(e.id);
      text += e.text;
    }
    expect(ids).toEqual(Array.from(pyRef.greedy.subarray(0, 24)));
    expect(text).toBe(py.tokenizer!.decode(ids));
    expect(py.freeKvPages).toBe(py.kvPages);
  });

  test('generateBatch equals single generation; stop strings; seeded sampling', async () => {
    const reqs = [
      { ids: pyRef.prompt, maxTokens: 12 },
      { prompt: 'import os\n', maxTokens: 8 },
      { prompt: 'class Foo:\n', maxTokens: 10, temperature: 0.8, topK: 40, topP: 0.95, seed: 7 },
    ];
    const batch = await py.generateBatch(reqs);
    for (let i = 0; i < reqs.length; i++) {
      const single = await py.generateBatch([reqs[i]]);
      expect(batch[i].ids).toEqual(single[0].ids);
      expect(batch[i].finishReason).toBe('length');
    }
    expect(batch[0].ids).toEqual(Array.from(pyRef.greedy.subarray(0, 12)));
    const full = batch[0].text;
    const cut = full.indexOf('(');
    expect(cut).toBeGreaterThan(0);
    const [s] = await py.generateBatch([{ ids: pyRef.prompt, maxTokens: 12, stop: '(' }]);
    expect(s.finishReason).toBe('stop');
    expect(s.text).toBe(full.slice(0, cut));
    expect(py.freeKvPages).toBe(py.kvPages);
  });

  test('requests submitted together are admitted together, also by a model that has not run yet', async () => {
    // A first generateBatch must batch exactly like later ones: otherwise its tokens (batch
    // composition changes rounding) differ from the same call made a second time.
    const m = await createRandomModel(tiny.config.raw, { device, maxBatch: 4, maxContext: 64, seed: 5 });
    try {
      const reqs = [{ ids: [1, 2, 3], maxTokens: 3 }, { ids: [4, 5], maxTokens: 3 }, { ids: [6], maxTokens: 3 }];
      const first = await m.generateBatch(reqs);
      expect(m.stats.prefills).toBe(1);
      const second = await m.generateBatch(reqs);
      expect(m.stats.prefills).toBe(2);
      for (let i = 0; i < reqs.length; i++) expect(second[i].ids).toEqual(first[i].ids);
    } finally {
      await m.dispose();
    }
  });

  test('errors: bad ids, long prompt, abort frees pages, disposed model', async () => {
    const V = tiny.config.vocabSize;
    const expectCode = (fn: () => unknown, code: string) => {
      let err: unknown;
      try {
        fn();
      } catch (e) {
        err = e;
      }
      expect(isSqueezeError(err, code)).toBe(true);
    };
    expectCode(() => tiny.generate({ ids: [1, V], maxTokens: 2 }), 'ERR_ARG');
    expectCode(() => tiny.generate({ ids: [-1], maxTokens: 2 }), 'ERR_ARG');
    await expect(tiny.logits(Int32Array.from([0, V + 5]))).rejects.toMatchObject({ code: 'ERR_ARG' });
    const long = new Int32Array(tiny.maxContext + 1);
    expectCode(() => tiny.generate({ ids: long, maxTokens: 1 }), 'ERR_CONTEXT_LENGTH');
    await expect(tiny.logits(long)).rejects.toMatchObject({ code: 'ERR_CONTEXT_LENGTH' });

    const ac = new AbortController();
    const got: number[] = [];
    const other = tiny.generateBatch([{ ids: tinyRef.prompt, maxTokens: 6 }]);
    for await (const e of tiny.generate({ ids: tinyRef.prompt, maxTokens: 1000, signal: ac.signal })) {
      got.push(e.id);
      if (got.length === 3) ac.abort();
      expect(got.length).toBeLessThanOrEqual(4);
    }
    const [o] = await other;
    // The other sequence is untouched (only step 0 has a margin fp16 cannot flip).
    expect(o.ids.length).toBe(6);
    expect(o.finishReason).toBe('length');
    expect(o.ids[0]).toBe(tinyRef.greedy[0]);
    await new Promise((r) => setTimeout(r, 50));
    expect(tiny.freeKvPages).toBe(tiny.kvPages);

    const m = await createRandomModel(tiny.config.raw, { device, maxBatch: 1, maxContext: 64, seed: 3 });
    const [r] = await m.generateBatch([{ ids: [1, 2, 3], maxTokens: 2 }]);
    expect(r.ids.length).toBe(2);
    await m.dispose();
    expectCode(() => m.generate({ ids: [1], maxTokens: 1 }), 'ERR_DISPOSED');
    await expect(m.logits([1])).rejects.toMatchObject({ code: 'ERR_DISPOSED' });
  });

  test('context overflow ends only that sequence with ERR_CONTEXT_LENGTH', async () => {
    const m = await loadModel(TINY, { device, maxBatch: 2, maxContext: 52 });
    try {
      const [a, b] = await m.generateBatch([
        { ids: tinyRef.prompt, maxTokens: 20 },
        { ids: tinyRef.prompt.subarray(0, 8), maxTokens: 10 },
      ]);
      expect(a.finishReason).toBe('error');
      expect(isSqueezeError(a.error, 'ERR_CONTEXT_LENGTH')).toBe(true);
      expect(a.ids.length).toBeGreaterThan(0);
      expect(b.finishReason).toBe('length');
      expect(b.ids.length).toBe(10);
      expect(m.freeKvPages).toBe(m.kvPages);
    } finally {
      await m.dispose();
    }
  });
}

describe('decoder on cpu', () => suite('cpu', 2e-3));

describe('checkpoint variants (cpu)', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-model-'));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const cfg = JSON.parse(fs.readFileSync(path.join(TINY, 'config.json'), 'utf8'));
  const tensors: Record<string, WriteTensor> = {};
  {
    const st = SafetensorsFile.open(path.join(TINY, 'model.safetensors'));
    for (const n of st.names()) {
      const t = st.read(n);
      tensors[n] = { dtype: t.dtype, shape: t.shape, data: t.data };
    }
    st.close();
  }
  let dirs = 0;
  const variant = (config: Record<string, unknown>, edit: (t: Record<string, WriteTensor>) => void): string => {
    const dir = path.join(tmp, `m${dirs++}`);
    fs.mkdirSync(dir);
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
    const t = { ...tensors };
    edit(t);
    writeSafetensors(path.join(dir, 'model.safetensors'), t);
    return dir;
  };
  const fails = async (dir: string, ...parts: string[]) => {
    let err: unknown;
    try {
      await loadModel(dir, { device: 'cpu' });
    } catch (e) {
      err = e;
    }
    expect(isSqueezeError(err, 'ERR_FORMAT')).toBe(true);
    for (const p of parts) expect((err as Error).message).toContain(p);
  };

  test('missing and misshapen tensors -> ERR_FORMAT naming tensor and file', async () => {
    const missing = variant(cfg, (t) => delete t['model.layers.2.mlp.up_proj.weight']);
    await fails(missing, 'model.layers.2.mlp.up_proj.weight', path.join(missing, 'model.safetensors'));
    const bad = variant(cfg, (t) => {
      t['model.layers.1.self_attn.k_proj.weight'] = { ...t['model.layers.1.self_attn.k_proj.weight'], shape: [64, 512] };
    });
    await fails(bad, 'model.layers.1.self_attn.k_proj.weight', '[64, 512]', '[128, 256]');
    await fails(variant({ ...cfg, num_hidden_layers: 5 }, () => undefined), 'model.layers.4.');
  });

  test('qwen2 q/k/v biases are applied; a checkpoint without lm_head ties', async () => {
    const H = 256, kv = 128;
    const zero = (n: number): WriteTensor => ({ dtype: 'F16', shape: [n], data: new Uint16Array(n) });
    const withBias = (v: number) => (t: Record<string, WriteTensor>) => {
      for (let l = 0; l < 4; l++) {
        const b = zero(H);
        if (v) (b.data as Uint16Array).fill(v);
        t[`model.layers.${l}.self_attn.q_proj.bias`] = b;
        t[`model.layers.${l}.self_attn.k_proj.bias`] = zero(kv);
        t[`model.layers.${l}.self_attn.v_proj.bias`] = zero(kv);
      }
    };
    const qcfg = { ...cfg, model_type: 'qwen2', architectures: ['Qwen2ForCausalLM'] };
    const progress: number[] = [];
    const q0 = await loadModel(variant(qcfg, withBias(0)), { device: 'cpu', onProgress: (p) => progress.push(p.loadedBytes / p.totalBytes) });
    expect(progress[progress.length - 1]).toBe(1);
    expect(progress.length).toBeGreaterThan(10);
    const ids = tinyRef.prompt.subarray(0, 16);
    const a = await q0.logits(ids);
    await q0.dispose();
    const ref = tinyRef.logits.subarray(0, 16 * 512);
    expect(relErr(a, ref)).toBeLessThan(2e-3);
    const q1 = await loadModel(variant(qcfg, withBias(0x3c00)), { device: 'cpu' });
    const b = await q1.logits(ids);
    await q1.dispose();
    expect(relErr(b, ref)).toBeGreaterThan(1e-2);
    const tied = await loadModel(variant(cfg, (t) => delete t['lm_head.weight']), { device: 'cpu' });
    expect(relErr(await tied.logits(ids), ref)).toBeGreaterThan(1e-2);
    await tied.dispose();
  });
});

describeGpu('decoder on cuda', () => {
  suite('cuda', 1e-2);

  test('graphs on and off give identical greedy tokens', async () => {
    const on = await loadModel(PYCODER, { device: 'cuda', maxBatch: 2, graphs: true });
    const off = await loadModel(PYCODER, { device: 'cuda', maxBatch: 2, graphs: false });
    try {
      const req = { ids: pyRef.prompt, maxTokens: 48 };
      const [a] = await on.generateBatch([req]);
      const [b] = await off.generateBatch([req]);
      expect(on.stats.captureError).toBeUndefined();
      expect(on.stats.graphReplays).toBeGreaterThan(40);
      expect(off.stats.graphReplays).toBe(0);
      expect(a.ids).toEqual(b.ids);
      const two = await on.generateBatch([req, { prompt: 'import sys\n', maxTokens: 20 }]);
      expect(two[0].ids).toEqual(a.ids);
    } finally {
      await on.dispose();
      await off.dispose();
    }
  });

  test('fused and plain decode passes give the same greedy tokens', async () => {
    // Two models: the scheduler keeps captured graphs, so one model cannot switch paths.
    const m = await loadModel(PYCODER, { device: 'cuda', maxBatch: 2 });
    const p = await loadModel(PYCODER, { device: 'cuda', maxBatch: 2 });
    m.decoder.fuse = true;
    p.decoder.fuse = false;
    try {
      const reqs = [{ ids: pyRef.prompt, maxTokens: 48 }, { prompt: 'class Stack:\n', maxTokens: 32 }];
      const fused = await m.generateBatch(reqs);
      const plain = await p.generateBatch(reqs);
      expect(fused.map((r) => r.ids)).toEqual(plain.map((r) => r.ids));
      expect(fused[0].ids.slice(0, 24)).toEqual(Array.from(pyRef.greedy.subarray(0, 24)));
    } finally {
      await m.dispose();
      await p.dispose();
    }
  });

  test('bf16 activations stay close to transformers', async () => {
    const m = await loadModel(TINY, { device: 'cuda', dtype: 'bf16' });
    try {
      expect(relErr(await m.logits(tinyRef.prompt), tinyRef.logits)).toBeLessThan(3e-2);
    } finally {
      await m.dispose();
    }
  });
});

describe('tokenizer', () => {
  test('streaming decode emits only complete UTF-8; chat template renders', () => {
    const { Tokenizer } = require('../ts/model/tokenizer') as typeof import('../ts/model/tokenizer');
    const tok = Tokenizer.fromDir(PYCODER);
    const text = 'héllo 😀 wörld → ok';
    const ids = tok.encode(text);
    const sd = tok.streamDecoder();
    const pieces = Array.from(ids, (id) => sd.push(id));
    expect(pieces.some((p) => p === '')).toBe(true);
    for (const p of pieces) expect(p).not.toContain('\uFFFD');
    expect(pieces.join('') + sd.flush()).toBe(text);
    expect(tok.decode(ids)).toBe(text);
    expect(tok.hasChatTemplate).toBe(false);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-tok-'));
    try {
      fs.copyFileSync(path.join(PYCODER, 'tokenizer.json'), path.join(dir, 'tokenizer.json'));
      fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({
        eos_token: '<|endoftext|>',
        chat_template: "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
      }));
      const t2 = Tokenizer.fromDir(dir);
      expect(t2.applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('<user>hi\n<assistant>');
      expect(t2.eosToken).toBe('<|endoftext|>');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
