/**
 * Squeezed Attention building blocks: the offline k-means of a context's keys and the decode op
 * that attends, within the context, only to the keys of the clusters whose centroids score highest
 * (CPU against a plain reference and against dense attention; CUDA against the CPU).
 */
import { DType, Tensor } from '../ts/tensor';
import * as ops from '../ts/ops';
import { clusterKeys, clusterKeysOnDevice, kmeans, kmeansOnDevice } from '../ts/quant/squeezed';
import { describeGpu, freshSeed, randn, relErr, rng } from './gpu';

interface Ctx {
  C: number; Pc: number; cen: Float32Array; cs: Int32Array; ct: Int32Array;
}

interface Case {
  B: number; Hq: number; Hkv: number; D: number; ps: number; maxPages: number; pages: number; C: number; Pc: number;
  q: Float32Array; k: Float32Array; v: Float32Array; pt: Int32Array; lens: Int32Array; pre: Int32Array;
  cen: Float32Array; cs: Int32Array; ct: Int32Array;
  /** The contexts (the first is cen/cs/ct above) and each sequence's (-1: none; out of range: none). */
  contexts: Ctx[]; cof: Int32Array;
}

/** Sequences over shuffled pages; each sequence's first Pc tokens are the clustered context (or not: prefix 0). */
function makeCase(seed: number, B: number, Hq: number, Hkv: number, D: number, Pc: number, C: number, extra: number[]): Case {
  const r = rng(seed), ps = 8;
  const lens = Int32Array.from({ length: B }, (_, b) => Math.max(1, Pc + extra[b % extra.length]));
  const maxPages = Math.ceil(Math.max(...lens) / ps), pages = B * maxPages + 3;
  const perm = Array.from({ length: pages }, (_, i) => i).sort(() => r() - 0.5);
  const pt = Int32Array.from({ length: B * maxPages }, (_, i) => perm[i]);
  const k = randn(pages * ps * Hkv * D, r), v = randn(pages * ps * Hkv * D, r);
  const q = randn(B * Hq * D, r, 0.5);
  // clusters from the first sequence's context keys (the shared context's pages are the same rows here)
  const keys = new Float32Array(Pc * Hkv * D);
  for (let t = 0; t < Pc; t++) for (let g = 0; g < Hkv; g++) {
    const page = pt[Math.floor(t / ps)];
    keys.set(k.subarray(((page * ps + (t % ps)) * Hkv + g) * D, ((page * ps + (t % ps)) * Hkv + g + 1) * D), (t * Hkv + g) * D);
  }
  const idx = clusterKeys(keys, Pc, Hkv, D, C, 8);
  // sequences b > 0 read their own pages, so give them the first one's context page table prefix
  for (let b = 1; b < B; b++) for (let j = 0; j < Math.ceil(Pc / ps) - (Pc % ps ? 1 : 0); j++) pt[b * maxPages + j] = pt[j];
  const pre = Int32Array.from({ length: B }, (_, b) => (b === B - 1 ? 0 : b === 1 ? Pc + 1000 : Pc));  // dense row; a prefix past the length (clamped)
  const ctx0 = { C: idx.clusters, Pc, cen: idx.centroids, cs: idx.clusterStart, ct: idx.clusterTokens };
  return { B, Hq, Hkv, D, ps, maxPages, pages, C: idx.clusters, Pc, q, k, v, pt, lens, pre, cen: ctx0.cen, cs: ctx0.cs, ct: ctx0.ct,
    contexts: [ctx0], cof: new Int32Array(B) };
}

/** The op's definition, in float64 (tops: clusters attended per context). */
function reference(c0: Case, tops: number | number[], scale: number): Float64Array {
  const out = new Float64Array(c0.B * c0.Hq * c0.D), G = c0.Hq / c0.Hkv;
  for (let b = 0; b < c0.B; b++) for (let h = 0; h < c0.Hq; h++) {
    const n = c0.cof[b], x = c0.contexts[n];
    const topC = typeof tops === 'number' ? tops : tops[n];
    // (a sequence without a valid context attends densely)
    const c = { ...c0, ...(x ?? { C: 0, Pc: 0 }) } as Case;
    const g = Math.floor(h / G), len = c.lens[b], P = x ? Math.min(Math.max(0, c.pre[b]), len) : 0;
    const qo = (b * c.Hq + h) * c.D;
    const vis: number[] = [];
    if (P > 0) {
      const sc = Array.from({ length: c.C }, (_, j) => {
        let s = 0;
        for (let d = 0; d < c.D; d++) s += c.q[qo + d] * c.cen[(g * c.C + j) * c.D + d];
        return s;
      });
      const order = sc.map((s, j) => j).sort((x, y) => sc[y] - sc[x] || x - y);
      for (const j of order.slice(0, Math.min(topC, c.C)))
        for (let i = c.cs[g * (c.C + 1) + j]; i < c.cs[g * (c.C + 1) + j + 1]; i++) if (c.ct[g * c.Pc + i] < P) vis.push(c.ct[g * c.Pc + i]);
    }
    for (let t = P; t < len; t++) vis.push(t);
    const at = (t: number) => ((c.pt[b * c.maxPages + Math.floor(t / c.ps)] * c.ps + (t % c.ps)) * c.Hkv + g) * c.D;
    const s = vis.map((t) => {
      let x = 0;
      for (let d = 0; d < c.D; d++) x += c.q[qo + d] * c.k[at(t) + d];
      return x * scale;
    });
    const m = Math.max(...s);
    let sum = 0;
    vis.forEach((t, i) => {
      const p = Math.exp(s[i] - m);
      sum += p;
      for (let d = 0; d < c.D; d++) out[qo + d] += p * c.v[at(t) + d];
    });
    for (let d = 0; d < c.D; d++) out[qo + d] = sum > 0 ? out[qo + d] / sum : 0;
  }
  return out;
}

/** The contexts as the op takes them: the table and the three flat arrays. */
function pack(contexts: Ctx[], tops: number[]) {
  const table: number[] = [];
  let cen = 0, start = 0, tok = 0;
  for (const [n, x] of contexts.entries()) {
    table.push(cen, start, tok, x.C, x.Pc, tops[n]);
    cen += x.cen.length;
    start += x.cs.length;
    tok += x.ct.length;
  }
  const cat = <T extends Float32Array | Int32Array>(parts: T[], make: (n: number) => T) => {
    const o = make(parts.reduce((a, p) => a + p.length, 0));
    let at = 0;
    for (const p of parts) {
      o.set(p as never, at);
      at += p.length;
    }
    return o;
  };
  return {
    table: Int32Array.from(table), cen: cat(contexts.map((x) => x.cen), (n) => new Float32Array(n)),
    cs: cat(contexts.map((x) => x.cs), (n) => new Int32Array(n)), ct: cat(contexts.map((x) => x.ct), (n) => new Int32Array(n)),
  };
}

function run(c: Case, tops: number | number[], scale: number, dtype: DType = 'f32', device = 'cpu'): Promise<Float32Array> {
  const f = (a: Float32Array, shape: number[], dt: DType = dtype) => Tensor.from(a, shape, { dtype: dt, device });
  const i = (a: Int32Array, shape: number[]) => Tensor.from(a, shape, { device });
  const t = typeof tops === 'number' ? c.contexts.map(() => tops) : tops;
  const pk = pack(c.contexts, t);
  const out = Tensor.from(new Float32Array(c.B * c.Hq * c.D).fill(NaN), [c.B, c.Hq, c.D], { dtype, device });
  ops.squeezedAttention(out, f(c.q, [c.B, c.Hq, c.D]), f(c.k, [c.pages, c.ps, c.Hkv, c.D]), f(c.v, [c.pages, c.ps, c.Hkv, c.D]),
    i(c.pt, [c.B, c.maxPages]), i(c.lens, [c.B]), scale, i(c.pre, [c.B]), i(c.cof, [c.B]), i(pk.table, [c.contexts.length, 6]),
    f(pk.cen, [pk.cen.length], 'f32'), i(pk.cs, [pk.cs.length]), i(pk.ct, [pk.ct.length]), Math.max(...c.contexts.map((x) => x.C)));
  return out.toFloat32();
}

describe('k-means of context keys', () => {
  test('well-separated groups come back as clusters; the index lists every token once, by cluster', () => {
    const r = rng(7), D = 6, groups = 5, per = 40, n = groups * per;
    const pts = new Float32Array(n * D);
    for (let i = 0; i < n; i++) for (let d = 0; d < D; d++) pts[i * D + d] = (d === (i % groups) ? 20 : 0) + (r() - 0.5);
    const { assign } = kmeans(pts, n, D, groups, 30, 3);
    for (let gidx = 0; gidx < groups; gidx++) {
      const labels = new Set<number>();
      for (let i = gidx; i < n; i += groups) labels.add(assign[i]);
      expect(labels.size).toBe(1);
    }
    expect(new Set(assign).size).toBe(groups);
    const keys = randn(50 * 2 * 8, r);
    const idx = clusterKeys(keys, 50, 2, 8, 7);
    for (let g = 0; g < 2; g++) {
      expect(idx.clusterStart[g * 8]).toBe(0);
      expect(idx.clusterStart[g * 8 + 7]).toBe(50);
      expect(Array.from(idx.clusterTokens.subarray(g * 50, g * 50 + 50)).sort((a, b) => a - b)).toEqual(Array.from({ length: 50 }, (_, t) => t));
    }
    expect(clusterKeys(keys, 50, 2, 8, 500).clusters).toBe(50);  // at most one cluster per token
    expect(() => kmeans(pts, n, D, 0)).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
  });
});

describe('k-means with the distances as ops (the device path, run on the CPU here)', () => {
  test('converged, every point sits at its nearest centroid; clusters as tight as the host loop\'s; f16 stays in range', async () => {
    const r = rng(11), D = 8, n = 300, k = 12;
    const pts = randn(n * D, r, 40);
    const { assign, centroids } = await kmeansOnDevice(Tensor.from(pts, [n, D]), k, 200, 5);
    const d2 = (i: number, c: number) => {
      let s = 0;
      for (let d = 0; d < D; d++) s += (pts[i * D + d] - centroids[c * D + d]) ** 2;
      return s;
    };
    let inertia = 0;
    for (let i = 0; i < n; i++) {
      let best = Infinity;
      for (let c = 0; c < k; c++) best = Math.min(best, d2(i, c));
      expect(d2(i, assign[i])).toBeLessThanOrEqual(best * (1 + 1e-5) + 1e-3);
      inertia += d2(i, assign[i]);
    }
    const host = kmeans(pts, n, D, k, 200, 5);
    let hostInertia = 0;
    for (let i = 0; i < n; i++) for (let d = 0; d < D; d++) hostInertia += (pts[i * D + d] - host.centroids[host.assign[i] * D + d]) ** 2;
    expect(inertia).toBeLessThan(1.1 * hostInertia);
    // half precision: points of norm ~1e4 would overflow f16 products without the scaling
    const big = pts.map((x) => x * 250);
    const h = await kmeansOnDevice(Tensor.from(big, [n, D], { dtype: 'f16' }), k, 50, 5);
    expect(h.centroids.every((x) => Number.isFinite(x))).toBe(true);
    expect(new Set(h.assign).size).toBeGreaterThan(k / 2);
    const keys = randn(40 * 3 * 8, r);
    const idx = await clusterKeysOnDevice(Tensor.from(keys, [40 * 3, 8]), 40, 3, 6);
    for (let g = 0; g < 3; g++) {
      expect(idx.clusterStart[g * 7 + 6]).toBe(40);
      expect(Array.from(idx.clusterTokens.subarray(g * 40, g * 40 + 40)).sort((a, b) => a - b)).toEqual(Array.from({ length: 40 }, (_, t) => t));
    }
    await expect(kmeansOnDevice(Tensor.from(pts, [n, D]), 0)).rejects.toMatchObject({ code: 'ERR_ARG' });
  });
});

describe('squeezedAttention (CPU)', () => {
  test.each([[3, 4, 2, 40, 37, 6], [4, 8, 8, 64, 64, 16], [2, 6, 2, 16, 9, 9]])(
    'B=%i Hq=%i Hkv=%i D=%i context %i, %i clusters, against the definition', async (B, Hq, Hkv, D, Pc, C) => {
      const seed = freshSeed();
      const c = makeCase(seed, B, Hq, Hkv, D, Pc, C, [5, 0, 17, 1]);
      const scale = 1 / Math.sqrt(D);
      for (const topC of [0, 1, Math.ceil(c.C / 2), c.C, c.C + 5]) {
        const got = await run(c, topC, scale), want = reference(c, topC, scale);
        expect({ seed, topC, err: relErr(got, want) < 1e-5 }).toEqual({ seed, topC, err: true });
      }
    });

  test('with every cluster kept it is plain decode attention', async () => {
    const seed = freshSeed();
    const c = makeCase(seed, 3, 4, 2, 32, 40, 8, [3, 9, 2]);
    c.pre = Int32Array.from([40, 40, 0]);  // (a prefix past the clustered tokens would hide the rest of it)
    const scale = 0.2;
    const got = await run(c, c.C, scale);
    const f = (a: Float32Array, shape: number[]) => Tensor.from(a, shape, {});
    const out = Tensor.empty([c.B, c.Hq, c.D], { dtype: 'f32' });
    ops.attention(out, f(c.q, [c.B, c.Hq, c.D]), f(c.k, [c.pages, c.ps, c.Hkv, c.D]), f(c.v, [c.pages, c.ps, c.Hkv, c.D]),
      Tensor.from(c.pt, [c.B, c.maxPages]), Tensor.from(c.lens, [c.B]), Tensor.from(Int32Array.from({ length: c.B + 1 }, (_, i) => i), [c.B + 1]), scale,
      { maxQ: 1, maxSeqLen: Math.max(...c.lens) });
    expect(relErr(got, await out.toFloat32())).toBeLessThan(1e-5);
    // and fewer clusters change it (the selection is real)
    expect(relErr(await run(c, 1, scale), await out.toFloat32())).toBeGreaterThan(1e-3);
  });

  test('out-of-range cluster data is clamped, never read past', async () => {
    const c = makeCase(5, 2, 2, 1, 16, 20, 4, [4]);
    c.cs[1] = 999; c.cs[2] = -5;  // starts beyond the list and negative
    c.ct[3] = 1 << 30; c.ct[4] = -7;  // positions outside the context
    const got = await run(c, 4, 0.25);
    expect(got.every((x) => Number.isFinite(x))).toBe(true);
  });

  test('shapes and arguments are checked', () => {
    const c = makeCase(9, 2, 4, 2, 8, 10, 3, [2]);
    const f = (a: Float32Array, shape: number[]) => Tensor.from(a, shape, {});
    const i = (a: Int32Array, shape: number[]) => Tensor.from(a, shape, {});
    const pk = pack(c.contexts, [2]);
    const args = () => [f(new Float32Array(c.B * c.Hq * c.D), [c.B, c.Hq, c.D]), f(c.q, [c.B, c.Hq, c.D]), f(c.k, [c.pages, c.ps, c.Hkv, c.D]),
      f(c.v, [c.pages, c.ps, c.Hkv, c.D]), i(c.pt, [c.B, c.maxPages]), i(c.lens, [c.B]), 0.3, i(c.pre, [c.B]), i(c.cof, [c.B]),
      i(pk.table, [1, 6]), f(pk.cen, [pk.cen.length]), i(pk.cs, [pk.cs.length]), i(pk.ct, [pk.ct.length]), c.C] as Parameters<typeof ops.squeezedAttention>;
    const call = (mod: (a: Parameters<typeof ops.squeezedAttention>) => void) => {
      const a = args();
      mod(a);
      return () => ops.squeezedAttention(...a);
    };
    expect(call(() => undefined)).not.toThrow();
    expect(call((a) => (a[9] = i(pk.table, [2, 3])))).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(call((a) => (a[8] = i(new Int32Array(1), [1])))).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(call((a) => (a[7] = i(new Int32Array(1), [1])))).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(call((a) => (a[10] = f(pk.cen, [1, pk.cen.length])))).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(call((a) => (a[13] = 0))).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    expect(call((a) => (a[6] = 0))).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    expect(call((a) => (a[10] = Tensor.from(pk.cen, [pk.cen.length], { dtype: 'f16' })))).toThrow(expect.objectContaining({ code: 'ERR_DTYPE' }));
  });

  test('several contexts in one call; a bad or missing context attends densely', async () => {
    const seed = freshSeed();
    const c = makeCase(seed, 5, 4, 2, 24, 48, 8, [6, 3, 9, 2, 5]);
    // a second context over the first 30 tokens of the same pages, clustered differently
    const keys = new Float32Array(30 * c.Hkv * c.D);
    for (let t = 0; t < 30; t++) for (let g = 0; g < c.Hkv; g++) {
      const page = c.pt[Math.floor(t / c.ps)];
      keys.set(c.k.subarray(((page * c.ps + (t % c.ps)) * c.Hkv + g) * c.D, ((page * c.ps + (t % c.ps)) * c.Hkv + g + 1) * c.D), (t * c.Hkv + g) * c.D);
    }
    const i2 = clusterKeys(keys, 30, c.Hkv, c.D, 5, 8);
    c.contexts.push({ C: i2.clusters, Pc: 30, cen: i2.centroids, cs: i2.clusterStart, ct: i2.clusterTokens });
    c.cof = Int32Array.from([0, 1, 7, -1, 1]);  // 7: no such context
    c.pre = Int32Array.from([48, 30, 48, 48, 30]);
    for (const tops of [[3, 2], [8, 5], [1, 1]]) {
      const got = await run(c, tops, 0.3), want = reference(c, tops, 0.3);
      expect({ seed, tops, ok: relErr(got, want) < 1e-5 }).toEqual({ seed, tops, ok: true });
    }
    // a context whose entry does not fit the arrays is ignored (dense), never read past
    const pk = pack(c.contexts, [3, 2]);
    pk.table[6 + 2] = 1 << 28;  // context 1's token offset far past the list
    const f = (a: Float32Array, shape: number[]) => Tensor.from(a, shape, {});
    const t = (a: Int32Array, shape: number[]) => Tensor.from(a, shape, {});
    const out = Tensor.empty([c.B, c.Hq, c.D], { dtype: 'f32' });
    ops.squeezedAttention(out, f(c.q, [c.B, c.Hq, c.D]), f(c.k, [c.pages, c.ps, c.Hkv, c.D]), f(c.v, [c.pages, c.ps, c.Hkv, c.D]),
      t(c.pt, [c.B, c.maxPages]), t(c.lens, [c.B]), 0.3, t(c.pre, [c.B]), t(c.cof, [c.B]), t(pk.table, [2, 6]), f(pk.cen, [pk.cen.length]),
      t(pk.cs, [pk.cs.length]), t(pk.ct, [pk.ct.length]), 8);
    const dense = reference({ ...c, cof: Int32Array.from([0, -1, -1, -1, -1]) }, [3, 2], 0.3);
    const got = await out.toFloat32();
    const rows = (a: ArrayLike<number>, b: number) => Array.from({ length: c.Hq * c.D }, (_, j) => a[b * c.Hq * c.D + j]);
    expect(relErr(rows(got, 1), rows(dense, 1))).toBeLessThan(1e-5);
  });
});

describeGpu('squeezedAttention: CUDA vs CPU', () => {
  const TOL: Record<string, number> = { f32: 1e-5, f16: 2e-3, bf16: 1e-2 };
  for (const dt of ['f16', 'bf16', 'f32'] as DType[]) {
    test(`${dt}: GQA, odd sizes, clamped prefixes, a dense row, every topC`, async () => {
      for (const [B, Hq, Hkv, D, Pc, C] of [[3, 8, 2, 128, 300, 40], [2, 4, 4, 80, 77, 77], [5, 32, 8, 64, 1000, 1000], [2, 2, 1, 256, 50, 5], [2, 12, 4, 96, 200, 30], [2, 16, 1, 64, 90, 9]]) {
        const seed = freshSeed();
        const c = makeCase(seed, B, Hq, Hkv, D, Pc, C, [11, 0, 130]);
        // the inputs as the dtype rounds them, for both devices
        const q = await Tensor.from(c.q, [c.q.length], { dtype: dt }).toFloat32(), k = await Tensor.from(c.k, [c.k.length], { dtype: dt }).toFloat32();
        const v = await Tensor.from(c.v, [c.v.length], { dtype: dt }).toFloat32();
        const cr = { ...c, q, k, v };
        for (const topC of [0, 3, Math.ceil(c.C / 4), c.C]) {
          const cpu = await run(cr, topC, 1 / Math.sqrt(D), 'f32', 'cpu'), gpu = await run(cr, topC, 1 / Math.sqrt(D), dt, 'cuda');
          expect({ seed, topC, ok: relErr(gpu, cpu) < TOL[dt] }).toEqual({ seed, topC, ok: true });
          expect(Array.from(await run(cr, topC, 1 / Math.sqrt(D), dt, 'cuda'))).toEqual(Array.from(gpu));  // deterministic
        }
      }
    });
  }
  test('cluster starts past the list, negative or running backwards: CUDA clamps them as the CPU does', async () => {
    const seed = freshSeed();
    const c = makeCase(seed, 2, 8, 2, 64, 300, 40, [11, 0, 130]);
    const n = c.C + 1;
    for (let g = 0; g < 2; g++) {
      c.cs[g * n + 3] = 999;   // past the list: clamped, and every later start is at least this
      c.cs[g * n + 7] = -5;    // negative
      c.cs[g * n + 20] = c.cs[g * n + 10];  // backwards
      c.cs[g * n + 33] = 1 << 30;
    }
    for (const topC of [3, 10, c.C]) {
      const cpu = await run(c, topC, 0.125, 'f32', 'cpu'), gpu = await run(c, topC, 0.125, 'f32', 'cuda');
      expect({ seed, topC, finite: gpu.every(Number.isFinite), ok: relErr(gpu, cpu) < 1e-5 }).toEqual({ seed, topC, finite: true, ok: true });
    }
  });
  test('tied centroid scores: the lower clusters are kept, as on the CPU (the cut inside a tie)', async () => {
    for (const [B, Hq, Hkv, D, Pc, C, distinct] of [[3, 8, 2, 128, 300, 40, 4], [2, 4, 4, 80, 77, 33, 3]]) {
      const seed = freshSeed();
      const c = makeCase(seed, B, Hq, Hkv, D, Pc, C, [11, 0, 130]);
      const cen = c.contexts[0].cen, K = c.C;
      for (let g = 0; g < Hkv; g++)
        for (let j = distinct; j < K; j++) cen.copyWithin((g * K + j) * D, (g * K + (j % distinct)) * D, (g * K + (j % distinct) + 1) * D);
      for (const topC of [1, Math.ceil(K / distinct) + 1, Math.floor(K / 2), K - 1]) {
        const cpu = await run(c, topC, 1 / Math.sqrt(D), 'f32', 'cpu'), gpu = await run(c, topC, 1 / Math.sqrt(D), 'f32', 'cuda');
        expect({ seed, topC, ok: relErr(gpu, cpu) < TOL.f32 }).toEqual({ seed, topC, ok: true });
      }
    }
  });
});
