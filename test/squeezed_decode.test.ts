/**
 * Squeezed Attention in the decoder (CPU): a cached prefix clustered offline, requests forked from
 * it decoding over its top clusters. With every cluster kept it is dense attention (the same
 * tokens, the same NLL); with fewer the selection is real and the quality cost small on
 * pycoder-mini; one squeezed context at a time; disposal leaves running requests correct.
 */
import * as path from 'path';
import { loadModel, Model } from '../ts/model/model';
import { SafetensorsFile } from '../ts/model/safetensors';
import { describeGpu } from './gpu';

const PYCODER = path.join(__dirname, '..', 'models', 'pycoder-mini');

describe('Squeezed Attention over a cached prefix (pycoder-mini, CPU)', () => {
  let model: Model;
  let windows: Int32Array[];
  const P = 384;

  beforeAll(async () => {
    model = await loadModel(PYCODER, { device: 'cpu', maxBatch: 4, maxContext: 512 });
    const ev = SafetensorsFile.open(path.join(PYCODER, 'eval.safetensors'));
    const ids = ev.readInt32('ids');
    ev.close();
    windows = [0, 1].map((w) => ids.slice(w * 1024, w * 1024 + 448));
  });
  afterAll(async () => {
    await model.dispose();
  });

  const greedy = async (prompts: number[][]) =>
    (await model.generateBatch(prompts.map((ids) => ({ ids, maxTokens: 16, temperature: 0 })))).map((r) => r.ids);

  test('every cluster kept: the tokens and the NLL of dense attention over the same prefix', async () => {
    const prompts = [Array.from(windows[0].subarray(0, P + 10)), Array.from(windows[0].subarray(0, P + 30))];
    const dense = await model.cachePrefix(windows[0].subarray(0, P));
    const want = await greedy(prompts);
    const [nllDense] = await model.prefixNll(dense, [windows[0]]);
    dense.dispose();
    const sq = await model.cachePrefix(windows[0].subarray(0, P), { squeeze: { clusters: 24, keep: 1 } });
    try {
      expect(sq).toMatchObject({ length: P, clusters: 24, topClusters: 24 });
      expect(model.graphs).toBe(false);
      expect(await greedy(prompts)).toEqual(want);
      const [nll] = await model.prefixNll(sq, [windows[0]]);
      expect(Math.abs(nll - nllDense)).toBeLessThan(1e-4);
    } finally {
      sq.dispose();
    }
    expect(model.freeKvPages).toBe(model.kvPages);
  });

  test('fewer clusters: the selection changes the attention, at a small cost in NLL', async () => {
    const nll = async (opts: object) => {
      const nlls: number[] = [];
      for (const w of windows) {
        const p = await model.cachePrefix(w.subarray(0, P), opts);
        nlls.push((await model.prefixNll(p, [w]))[0]);
        p.dispose();
      }
      return nlls.reduce((a, b) => a + b, 0) / nlls.length;
    };
    const dense = await nll({});
    const half = await nll({ squeeze: { clusters: 24, keep: 0.5 } });
    // the k-means with its distances as ops (random seeds) clusters about as well as the host loop (k-means++)
    const halfDevice = await nll({ squeeze: { clusters: 24, keep: 0.5, kmeans: 'device' } });
    expect(Math.abs(Math.exp(halfDevice - half) - 1)).toBeLessThan(0.03);
    const one = await nll({ squeeze: { clusters: 24, keep: 1 / 24 } });
    // (measured: ppl dense 6.3546, half the clusters 6.3643, one cluster 9.5369)
    expect(half).not.toBe(dense);
    // half the clusters costs little; one cluster costs more (which clusters are kept is what matters)
    expect(Math.exp(half - dense)).toBeLessThan(1.03);
    expect(one).toBeGreaterThan(half);
  });

  test('a context reads its own index whatever contexts come and go beside it', async () => {
    // The decoder holds every context's index once, in flat arrays rebuilt when one is added or
    // removed (each copied from where it is). A quarter of the clusters: which ones matter.
    const opts = { squeeze: { clusters: 24, keep: 0.25 } };
    const alone = await model.cachePrefix(windows[1].subarray(0, P), opts);
    const want = (await model.prefixNll(alone, [windows[1]]))[0];
    alone.dispose();
    const s0 = await model.cachePrefix(windows[0].subarray(0, P), { squeeze: { clusters: 12, keep: 0.25 } });
    const s1 = await model.cachePrefix(windows[1].subarray(0, P), opts);
    const s2 = await model.cachePrefix(windows[0].subarray(0, P), opts);
    expect((await model.prefixNll(s1, [windows[1]]))[0]).toBe(want);  // behind s0's index
    s0.dispose();  // s1 and s2 move to the front of the arrays
    expect((await model.prefixNll(s1, [windows[1]]))[0]).toBe(want);
    const first = (await model.prefixNll(s2, [windows[0]]))[0];
    s1.dispose();
    expect((await model.prefixNll(s2, [windows[0]]))[0]).toBe(first);
    // and the selection is real here: all clusters give another NLL
    const all = await model.cachePrefix(windows[1].subarray(0, P), { squeeze: { clusters: 24, keep: 1 } });
    expect((await model.prefixNll(all, [windows[1]]))[0]).not.toBe(want);
    all.dispose();
    s2.dispose();
    expect(model.decoder.squeezedContexts).toBe(0);
    expect(model.freeKvPages).toBe(model.kvPages);
  });

  test('several squeezed contexts at once, each request on its own; disposal mid-generation leaves requests correct; refusals', async () => {
    const prompts = [Array.from(windows[0].subarray(0, P + 12)), Array.from(windows[1].subarray(0, P + 12))];
    const d0 = await model.cachePrefix(windows[0].subarray(0, P)), d1 = await model.cachePrefix(windows[1].subarray(0, P));
    const want = await greedy(prompts);
    d0.dispose();
    d1.dispose();
    const s0 = await model.cachePrefix(windows[0].subarray(0, P), { squeeze: { keep: 1 } });
    const s1 = await model.cachePrefix(windows[1].subarray(0, P), { squeeze: { keep: 1, clusters: 12 } });
    expect(s0.clusters).toBe(24);  // one per 16 tokens by default
    expect([s0.topClusters, s1.topClusters]).toEqual([24, 12]);
    const hits = model.stats.prefixHits;
    expect(await greedy(prompts)).toEqual(want);  // one batch, two contexts, every cluster kept: dense
    expect(model.stats.prefixHits - hits).toBe(2);
    const running = model.generateBatch([{ ids: prompts[1], maxTokens: 24, temperature: 0 }]);
    s1.dispose();
    const [r] = await running;
    expect(r.finishReason).toBe('length');
    expect(r.ids).toHaveLength(24);
    expect(await greedy([prompts[0]])).toEqual([want[0]]);  // the other context goes on
    s0.dispose();
    expect(model.freeKvPages).toBe(model.kvPages);
    await expect(model.cachePrefix([1, 2, 3], { squeeze: { keep: 0 } })).rejects.toMatchObject({ code: 'ERR_ARG' });
    await expect(model.cachePrefix([1, 2, 3], { squeeze: { clusters: 0 } })).rejects.toMatchObject({ code: 'ERR_ARG' });
    await expect(model.cachePrefix([1, 2, 3], { squeeze: { iterations: 1.5 } })).rejects.toMatchObject({ code: 'ERR_ARG' });
    await expect(model.cachePrefix([1, 2, 3], { squeeze: { kmeans: 'gpu' as 'device' } })).rejects.toMatchObject({ code: 'ERR_ARG' });
    await expect(model.prefixNll(s0, windows)).rejects.toMatchObject({ code: 'ERR_ARG' });
    expect(model.freeKvPages).toBe(model.kvPages);
  });
});

describeGpu('Squeezed Attention over a cached prefix (pycoder-mini, CUDA)', () => {
  test('all clusters: the NLL of dense attention; half: close to it; the CUDA decode matches the CPU', async () => {
    const ev = SafetensorsFile.open(path.join(PYCODER, 'eval.safetensors'));
    const ids = ev.readInt32('ids');
    ev.close();
    const w = ids.slice(0, 448), P = 384;
    const nll = async (m: Model, opts: object) => {
      const p = await m.cachePrefix(w.subarray(0, P), opts);
      try {
        return (await m.prefixNll(p, [w]))[0];
      } finally {
        p.dispose();
      }
    };
    const gpu = await loadModel(PYCODER, { device: 'cuda', maxBatch: 2, maxContext: 512 });
    const cpu = await loadModel(PYCODER, { device: 'cpu', maxBatch: 2, maxContext: 512 });
    try {
      const dense = await nll(gpu, {});
      expect(Math.abs((await nll(gpu, { squeeze: { clusters: 24, keep: 1 } })) - dense)).toBeLessThan(2e-3);
      const half = await nll(gpu, { squeeze: { clusters: 24, keep: 0.5 } });
      expect(Math.abs(half - (await nll(cpu, { squeeze: { clusters: 24, keep: 0.5 } })))).toBeLessThan(1e-2);
      expect(Math.exp(half - dense)).toBeLessThan(1.03);
      expect(gpu.graphs).toBe(true);  // back on once the squeezed context is gone
    } finally {
      await gpu.dispose();
      await cpu.dispose();
    }
  });
});
