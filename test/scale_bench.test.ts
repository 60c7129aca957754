/**
 * The "scale" benchmark's code path on the CPU at toy sizes: the memory plan at LLaMA-2-7B
 * shapes, the synthetic metadata and its device-side replication, and one full run of the
 * suite body (model, synthetic fill, page bookkeeping, timed decode steps, rows).
 */
import { KvqCache, kvqMetaBytes } from '../ts/ops/kvquant';
import { parseConfig } from '../ts/model/config';
import { f16ToFloat } from '../ts/util/half';
import { BenchContext } from '../bench/harness';
import { LLAMA2_7B } from '../bench/decode';
import { fillSynthetic, largestFit, runScale, scalePlan, syntheticCalibration, syntheticMeta } from '../bench/scale';

function checkMeta(bytes: Uint8Array, D: number, nk: number, nv: number): void {
  const mb = kvqMetaBytes(nk, nv), dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  expect(bytes.length % mb).toBe(0);
  for (let o = 0; o < bytes.length; o += mb) {
    const lo = f16ToFloat(dv.getUint16(o, true)), hi = f16ToFloat(dv.getUint16(o + 2, true));
    if (!(lo < hi) || !Number.isFinite(lo) || !Number.isFinite(hi)) throw new Error(`record ${o / mb}: value range ${lo}..${hi}`);
    for (let i = 0; i < nk + nv; i++) {
      const v = f16ToFloat(dv.getUint16(o + 4 + 2 * i, true));
      if (!Number.isFinite(v)) throw new Error(`record ${o / mb}: outlier ${i} = ${v}`);
      if (bytes[o + 4 + 2 * (nk + nv) + i] >= D) throw new Error(`record ${o / mb}: outlier channel ${bytes[o + 4 + 2 * (nk + nv) + i]}`);
    }
  }
}

const TINY = {
  model_type: 'llama', hidden_size: 256, intermediate_size: 512, num_hidden_layers: 2, num_attention_heads: 4,
  num_key_value_heads: 2, vocab_size: 512, max_position_embeddings: 256, rms_norm_eps: 1e-5, rope_theta: 10000,
  torch_dtype: 'float16', tie_word_embeddings: false,
};

describe('scale benchmark (CPU, toy sizes)', () => {
  test('memory plan at LLaMA-2-7B shapes, 2-bit, 1% outliers, 1M tokens', () => {
    const cfg = parseConfig({ ...LLAMA2_7B, max_position_embeddings: 1_000_000 }, 'test');
    const cal = syntheticCalibration(cfg, 2, 0.01, 1);
    const p = scalePlan(cfg, cal, 1_000_000, 16, 'cpu', 2);
    // per kv head: 2 x 32 code bytes + (4 + 3 x (2 + 2)) = 16 metadata bytes; 32 heads
    expect(p.codeBytesPerHead).toBe(64);
    expect(p.metaBytesPerHead).toBe(16);
    expect(p.perTokenLayer).toBe(2560);
    expect(p.perToken).toBe(81920);
    expect(p.pages).toBe(62500);
    expect(p.cacheBytes).toBe(81_920_000_000);
    expect(p.weightBytes).toBe(2 * 6_738_415_616);
  });

  test('the largest context that fits: it fits, one page more does not', () => {
    const cfg = parseConfig({ ...LLAMA2_7B, max_position_embeddings: 1_000_000 }, 'test');
    const cal = syntheticCalibration(cfg, 2, 0.01, 1);
    // (on a CUDA device the attention scratch also grows with the context; the search is the same)
    for (const free of [79.5e9, 40e9, 13.6e9 + 2e9, 1e9]) {
      const t = largestFit(cfg, cal, 16, 'cpu', 2, free);
      expect(t % 16).toBe(0);
      if (t > 0) expect(scalePlan(cfg, cal, t, 16, 'cpu', 2).needBytes).toBeLessThanOrEqual(free);
      expect(scalePlan(cfg, cal, t + 16, 16, 'cpu', 2).needBytes).toBeGreaterThan(free);
    }
    expect(largestFit(cfg, cal, 16, 'cpu', 2, 1e9)).toBe(0);
  });

  test('synthetic metadata is valid and replicates over the whole tensor', async () => {
    checkMeta(syntheticMeta(100, 64, 2, 2, 3), 64, 2, 2);
    const c = new KvqCache({ pages: 37, pageSize: 16, kvHeads: 2, headDim: 64, bits: 2, keyOutliers: 1, valueOutliers: 1, sink: 1, maxSeqs: 2 });
    const c2 = new KvqCache({ ...c.opts });
    try {
      await fillSynthetic([c, c2], 5, 7);
      const meta = (await c.meta.toArray()) as Uint8Array;
      checkMeta(meta, 64, 1, 1);
      const mb = kvqMetaBytes(1, 1);
      // record r is block record r % 7 (doubling copies keep record boundaries)
      for (let r = 7; r < meta.length / mb; r++) expect(meta.subarray(r * mb, (r + 1) * mb)).toEqual(meta.subarray((r % 7) * mb, (r % 7 + 1) * mb));
      expect(await c2.meta.toArray()).toEqual(meta);
      const codes = (await c.kCodes.toArray()) as Uint8Array;
      expect(codes.some((x) => x !== 0)).toBe(true);
      expect(await c2.kCodes.toArray()).not.toEqual(codes);
    } finally {
      c.dispose();
      c2.dispose();
    }
  });

  test('the suite body runs end to end and reports rows', async () => {
    const logs: string[] = [];
    const ctx: BenchContext = { device: null, deviceName: 'cpu', l2Bytes: 0, copyBandwidthGBs: 0, quick: true, log: (l) => logs.push(l) };
    const rows = await runScale(ctx, 'cpu', { config: TINY, tokens: 300, compareTokens: 100, repeats: 2 });
    expect(rows.map((r) => r.name)).toEqual(['step b1 ctx 100', 'step b1 ctx 100, bound 300', 'step b1 ctx 300']);
    for (const r of rows) {
      expect(r.suite).toBe('scale');
      expect(r.timeUs).toBeGreaterThan(0);
      expect(r.gbs).toBeGreaterThan(0);
      expect(r.note).toContain('tokens/s');
      expect(r.note).not.toContain('non-finite');
    }
    expect(rows[2].note).toContain('H100 80GB (computed, not measured)');
    expect(logs.join('\n')).toContain('B/token/layer');
  });
});
