/**
 * Prompt-prefix caching (model.cachePrefix, KVCache.fork): requests that start with a cached
 * prefix begin from its keys and values (full pages shared, a partial page copied) and generate
 * what they generate without it; pages are counted and come back; adapters keep their own
 * prefixes; refusals are coded.
 */
import * as path from 'path';
import { loadModel, Model } from '../ts/model/model';
import { KVCache } from '../ts/runtime/kv-cache';
import * as ops from '../ts/ops';
import { Tensor } from '../ts/tensor';
import { SafetensorsFile } from '../ts/model/safetensors';
import { QuantizedAttention } from '../ts/runtime/kvq-attention';
import { calibrateKv } from '../ts/quant/kvquant-calibrate';
import { kvqAppend, kvqDequantize } from '../ts/ops/kvquant';
import { randn, rng } from './gpu';

const PYCODER = path.join(__dirname, '..', 'models', 'pycoder-mini');
const A8 = path.join(__dirname, 'fixtures', 'tiny-llama-gqa', 'adapters', 'a8');

const SYSTEM = 'import os\nimport sys\nimport json\n\n\ndef load_config(path):\n    """Load a JSON config file."""\n    with open(path) as f:\n        return json.load(f)\n\n\n';
const TAILS = ['def main():', 'class Config:', 'def save_config(path, cfg):', 'if __name__ == "__main__":'];

describe('KVCache.fork', () => {
  test('a fork holds its parent\'s first tokens: full pages shared, the partial one copied', async () => {
    const c = new KVCache({ device: 'cpu', dtype: 'f32', numLayers: 2, numKvHeads: 2, headDim: 4, pageSize: 4, maxContext: 32, numPages: 12 });
    try {
      c.k.forEach((t, i) => ops.fillRandom(t, 1 + i, 0, 1));
      c.v.forEach((t, i) => ops.fillRandom(t, 11 + i, 0, 1));
      const parent = c.createSequence();
      c.grow(parent, 10);  // pages: 4 + 4 + 2 tokens
      const pt = new Int32Array(c.maxPagesPerSeq), ft = new Int32Array(c.maxPagesPerSeq);
      c.writePageTable(parent, pt, 0);
      expect(c.freePages).toBe(9);
      const child = c.fork(parent, 10);
      c.writePageTable(child, ft, 0);
      expect([ft[0], ft[1]]).toEqual([pt[0], pt[1]]);   // shared
      expect(ft[2]).not.toBe(pt[2]);                    // copied
      expect(c.sharedPages(child)).toBe(2);
      expect(c.freePages).toBe(8);
      const per = 4 * 2 * 4;  // floats per page
      for (const pool of [c.k, c.v])
        for (const t of pool) {
          const all = await t.toFloat32();
          expect(Array.from(all.subarray(ft[2] * per, (ft[2] + 1) * per))).toEqual(Array.from(all.subarray(pt[2] * per, (pt[2] + 1) * per)));
        }
      // the child grows into pages of its own; freeing the parent keeps the shared pages for the child
      c.grow(child, 13);
      expect(c.freePages).toBe(7);
      c.free(parent);
      expect(c.freePages).toBe(8);  // only the parent's own third page came back
      c.free(child);
      expect(c.freePages).toBe(12);
      // a fork at a page boundary copies nothing
      const p2 = c.createSequence();
      c.grow(p2, 8);
      const c2 = c.fork(p2, 8);
      expect(c.freePages).toBe(10);
      expect(() => c.fork(p2, 9)).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
      expect(() => c.fork(p2, 0)).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
      c.free(c2);
      c.free(p2);
      expect(c.freePages).toBe(12);
    } finally {
      c.dispose();
    }
  });
});

describe('cachePrefix on pycoder-mini (CPU)', () => {
  let model: Model;
  const greedy = async (m: Model, prompts: string[], adapter?: string) =>
    (await m.generateBatch(prompts.map((prompt) => ({ prompt, maxTokens: 20, temperature: 0, adapter })))).map((r) => r.text);

  beforeAll(async () => {
    model = await loadModel(PYCODER, { device: 'cpu', maxBatch: 4, maxContext: 256, lora: { maxAdapters: 2 } });
    await model.loadAdapter(A8);
  });
  afterAll(async () => {
    await model.dispose();
  });

  test('requests starting with the prefix generate what they generate without it, from shared pages', async () => {
    const prompts = TAILS.map((t) => SYSTEM + t);
    const plain = await greedy(model, prompts);
    const total = model.kvPages;
    const pre = await model.cachePrefix(SYSTEM);
    const P = model.tokenizer!.encode(SYSTEM).length;
    expect(pre.length).toBe(P);
    expect(P % 16).not.toBe(0);  // a partial last page: the copy path
    expect(model.freeKvPages).toBe(total - Math.ceil(P / 16));
    const hits0 = model.stats.prefixHits, tokens0 = model.stats.prefixTokens;
    expect(await greedy(model, prompts)).toEqual(plain);
    expect(model.stats.prefixHits - hits0).toBe(prompts.length);
    expect(model.stats.prefixTokens - tokens0).toBe(prompts.length * P);
    // one at a time too (a different batch)
    for (let i = 0; i < 2; i++) expect(await greedy(model, [prompts[i]])).toEqual([plain[i]]);
    expect(model.freeKvPages).toBe(total - Math.ceil(P / 16));
    pre.dispose();
    pre.dispose();  // idempotent
    expect(pre.disposed).toBe(true);
    expect(model.freeKvPages).toBe(total);
    const hits1 = model.stats.prefixHits;
    expect(await greedy(model, [prompts[0]])).toEqual([plain[0]]);
    expect(model.stats.prefixHits).toBe(hits1);
  });

  test('a prefix at a page boundary, the longest of several, and a prompt that is only the prefix', async () => {
    const ids = Array.from(model.tokenizer!.encode(SYSTEM + TAILS[0]));
    const aligned = ids.slice(0, 32), longer = ids.slice(0, 40);
    const want = (await model.generateBatch([{ ids, maxTokens: 12, temperature: 0 }]))[0].ids;
    const a = await model.cachePrefix(aligned), b = await model.cachePrefix(longer);
    try {
      const t0 = model.stats.prefixTokens;
      expect((await model.generateBatch([{ ids, maxTokens: 12, temperature: 0 }]))[0].ids).toEqual(want);
      expect(model.stats.prefixTokens - t0).toBe(40);  // the longest match
      // a prompt equal to a prefix: all but its last token come from the prefix (that one is prefilled for its logits)
      const t1 = model.stats.prefixTokens;
      const only = (await model.generateBatch([{ ids: longer, maxTokens: 6, temperature: 0 }]))[0].ids;
      expect(model.stats.prefixTokens - t1).toBe(39);
      const h = model.stats.prefixHits;
      b.dispose();
      expect((await model.generateBatch([{ ids: longer, maxTokens: 6, temperature: 0 }]))[0].ids).toEqual(only);
      expect(model.stats.prefixHits).toBe(h + 1);  // now the 32-token prefix matches
      // a prompt sharing less than a page with a longer prefix does not fork it
      const t2 = model.stats.prefixTokens;
      await model.generateBatch([{ ids: [...aligned.slice(0, 10), 7, 7, 7], maxTokens: 2, temperature: 0 }]);
      expect(model.stats.prefixTokens).toBe(t2);
    } finally {
      a.dispose();
      b.dispose();
    }
    expect(model.freeKvPages).toBe(model.kvPages);
  });

  test('a text prefix whose last token merges differently in the prompt still lends the tokens before it', async () => {
    const tok = model.tokenizer!;
    const prefix = 'import os\nimport sys\nimport json\nimport re\nimport math\nimport time\n\n';
    const prompt = prefix + 'def main():';
    const pi = tok.encode(prefix), qi = tok.encode(prompt);
    let lcp = 0;
    while (lcp < pi.length && pi[lcp] === qi[lcp]) lcp++;
    expect(lcp).toBeLessThan(pi.length);  // the trailing newline pair is one token alone, two before 'def'
    const want = (await greedy(model, [prompt]))[0];
    const p = await model.cachePrefix(prefix);
    try {
      const t0 = model.stats.prefixTokens;
      expect((await greedy(model, [prompt]))[0]).toBe(want);
      expect(model.stats.prefixTokens - t0).toBe(lcp);
    } finally {
      p.dispose();
    }
  });

  test('disposing a prefix while requests use its pages: they finish right, then every page is back', async () => {
    const prompts = TAILS.map((t) => SYSTEM + t);
    const plain = await greedy(model, prompts.slice(0, 2));
    const pre = await model.cachePrefix(SYSTEM);
    const running = greedy(model, prompts.slice(0, 2));
    pre.dispose();
    expect(await running).toEqual(plain);
    expect(model.freeKvPages).toBe(model.kvPages);
  });

  test('adapters keep their own prefixes', async () => {
    const prompts = TAILS.slice(0, 2).map((t) => SYSTEM + t);
    const plainA = await greedy(model, prompts, 'a8');
    const base = await model.cachePrefix(SYSTEM);
    try {
      const h = model.stats.prefixHits;
      expect(await greedy(model, prompts, 'a8')).toEqual(plainA);
      expect(model.stats.prefixHits).toBe(h);  // the base prefix is not the adapter's
      const withA = await model.cachePrefix(SYSTEM, { adapter: 'a8' });
      try {
        expect(await greedy(model, prompts, 'a8')).toEqual(plainA);
        expect(model.stats.prefixHits).toBe(h + 2);
        // its keys came from a8: a8 stays loaded while the prefix lives
        expect(() => model.unloadAdapter('a8')).toThrow(expect.objectContaining({ code: 'ERR_STATE' }));
      } finally {
        withA.dispose();
      }
      expect(model.adapters).toContain('a8');
    } finally {
      base.dispose();
    }
    expect(model.freeKvPages).toBe(model.kvPages);
  });

  test('refusals', async () => {
    await expect(model.cachePrefix([])).rejects.toMatchObject({ code: 'ERR_ARG' });
    await expect(model.cachePrefix(new Array(256).fill(5))).rejects.toMatchObject({ code: 'ERR_CONTEXT_LENGTH' });
    await expect(model.cachePrefix([1, 99999])).rejects.toMatchObject({ code: 'ERR_ARG' });
    await expect(model.cachePrefix('x', { adapter: 'nope' })).rejects.toMatchObject({ code: 'ERR_ARG' });
    expect(model.freeKvPages).toBe(model.kvPages);
    const m = await loadModel(PYCODER, { device: 'cpu', maxBatch: 1, maxContext: 64 });
    await m.dispose();
    await expect(m.cachePrefix('x')).rejects.toMatchObject({ code: 'ERR_DISPOSED' });
  });
});

// A KVQuant cache shares a prefix the same way: its quantized pages by reference, the partial last
// page (codes and metadata) and the fp16 sink rows copied for the fork.
describe('cachePrefix with a KVQuant cache (CPU)', () => {
  let model: Model;
  const greedy = async (m: Model, prompts: string[]) =>
    (await m.generateBatch(prompts.map((prompt) => ({ prompt, maxTokens: 12, temperature: 0 })))).map((r) => r.text);

  beforeAll(async () => {
    const base = await loadModel(PYCODER, { device: 'cpu', maxBatch: 2, maxContext: 256 });
    const calib = SafetensorsFile.open(path.join(PYCODER, 'calib.safetensors'));
    const ids = calib.readInt32('ids');
    calib.close();
    const cal = await calibrateKv(base, [ids.slice(0, 192)], { bits: 4, sink: 3, iterations: 6, slots: 'uniform' });
    await base.dispose();
    model = await loadModel(PYCODER, { device: 'cpu', maxBatch: 3, maxContext: 256, kvCache: { bits: 4, calibration: cal } });
  });
  afterAll(async () => {
    await model.dispose();
  });

  test('a fork dequantizes to its parent, position by position, sink rows included', async () => {
    const cache = model.decoder.cache, attn = model.decoder.attn as QuantizedAttention, cfg = model.config;
    const L = 37, H = cfg.numKvHeads, D = cfg.headDim, P = cache.maxPagesPerSeq;
    const parent = cache.createSequence();
    cache.grow(parent, L);
    const pt = new Int32Array(P);
    cache.writePageTable(parent, pt, 0);
    const r = rng(7);
    const k = Tensor.from(randn(L * H * D, r), [L, H, D]), v = Tensor.from(randn(L * H * D, r), [L, H, D]);
    const ptT = Tensor.from(pt, [1, P]), lens = Tensor.from(Int32Array.of(L), [1]), cu = Tensor.from(Int32Array.of(0, L), [2]);
    const sink = Tensor.from(Int32Array.of(cache.slot(parent)), [1]);
    attn.caches.forEach((c, l) => kvqAppend(c, attn.cal[l], k, v, ptT, lens, cu, sink));
    const child = cache.fork(parent, L);
    expect(L % cache.pageSize).not.toBe(0);  // the partial page is copied
    expect(cache.sharedPages(child)).toBe(Math.floor(L / cache.pageSize));
    const both = new Int32Array(2 * P);
    cache.writePageTable(parent, both, 0);
    cache.writePageTable(child, both, P);
    const table = Tensor.from(both, [2, P]);
    try {
      for (const [l, c] of attn.caches.entries()) {
        const out = [0, 1].map(() => [Tensor.empty([L, H, D]), Tensor.empty([L, H, D])]);
        kvqDequantize(out[0][0], out[0][1], c, attn.cal[l], table, 0, cache.slot(parent));
        kvqDequantize(out[1][0], out[1][1], c, attn.cal[l], table, 1, cache.slot(child));
        for (const i of [0, 1]) expect(Array.from(await out[1][i].toFloat32())).toEqual(Array.from(await out[0][i].toFloat32()));
        // the sink rows are the fp16 inputs, the rest went through the quantizer
        const kp = await out[0][0].toFloat32(), kin = await k.toFloat32();
        expect(Math.abs(kp[0] - kin[0])).toBeLessThan(1e-2);
        out.flat().forEach((t) => t.dispose());
      }
    } finally {
      [k, v, ptT, lens, cu, sink, table].forEach((t) => t.dispose());
      cache.free(child);
      cache.free(parent);
    }
    expect(cache.freePages).toBe(cache.numPages);
  });

  test('requests starting with the prefix decode from its shared pages, within the 4-bit noise; squeeze is refused', async () => {
    const prompts = TAILS.slice(0, 2).map((t) => SYSTEM + t);
    const pre = await model.cachePrefix(SYSTEM);
    const hits0 = model.stats.prefixHits;
    const cached = await greedy(model, prompts);
    expect(model.stats.prefixHits - hits0).toBe(prompts.length);
    cached.forEach((t) => expect(t.length).toBeGreaterThan(0));
    expect(model.freeKvPages).toBe(model.kvPages - Math.ceil(pre.length / 16));
    // A prompt's own tokens attend its fp16 keys when it is prefilled whole, but a cached prefix
    // only through the quantizer (as decode reads it). So the NLL of a continuation over the cached
    // prefix (token by token) stays within the 4-bit cache's noise of the whole-window prefill.
    const calib = SafetensorsFile.open(path.join(PYCODER, 'eval.safetensors'));
    const ev = calib.readInt32('ids');
    calib.close();
    const P = pre.length, L = P + 40, V = model.config.vocabSize;
    const prefixIds = model.tokenizer!.encode(SYSTEM);
    const wins = [0, 1].map((w) => Int32Array.from([...prefixIds, ...ev.slice(w * 1000, w * 1000 + L - P)]));
    const viaPrefix = await model.prefixNll(pre, wins);
    const full = await model.logitsBatch(wins);
    const { windowNll } = await import('../ts/runtime/ppl');
    wins.forEach((w, i) => {
      // prefixNll scores tokens P + 1 .. L - 1 (fed from position P on): the same part of the prefill.
      // Nats per token, absolute: one tail here is easy text (0.42 nats), where a relative bound would
      // magnify the noise; with this short calibration the whole windows fed token by token differ
      // from their prefill by 0.02-0.03 nats, pages read from the wrong place by several nats.
      const tail = windowNll(full[i].subarray(P * V), w.subarray(P), V);
      expect(Math.abs(viaPrefix[i] - tail)).toBeLessThan(0.1);
    });
    pre.dispose();
    expect(model.freeKvPages).toBe(model.kvPages);
    await expect(model.cachePrefix(SYSTEM, { squeeze: { keep: 0.5 } })).rejects.toMatchObject({ code: 'ERR_UNSUPPORTED' });
    expect(model.freeKvPages).toBe(model.kvPages);
  });
});
