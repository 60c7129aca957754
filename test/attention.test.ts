import { Tensor, DType } from '../ts/tensor';
import { attention, kvAppend, attentionWorkspaceSize } from '../ts/ops/attention';
import { isSqueezeError } from '../ts/errors';
import { native } from '../ts/native';
import { describeGpu, relErr, rng, randn, freshSeed } from './gpu';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

/** A paged pool with pages handed out in a shuffled (non-contiguous) order. */
interface Paged {
  pages: number;
  pageSize: number;
  Hkv: number;
  D: number;
  lens: number[];
  table: Int32Array; // [B, maxPages]
  maxPages: number;
  k: Float32Array; // pool [pages, pageSize, Hkv, D]
  v: Float32Array;
}

function makePaged(r: () => number, lens: number[], pageSize: number, Hkv: number, D: number, spare = 3): Paged {
  const need = lens.map((l) => Math.ceil(l / pageSize));
  const maxPages = Math.max(1, ...need) + 1;
  const pages = need.reduce((a, b) => a + b, 0) + spare;
  const order = Array.from({ length: pages }, (_, i) => i);
  for (let i = pages - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const table = new Int32Array(lens.length * maxPages).fill(-1);
  let next = 0;
  lens.forEach((_, b) => {
    for (let i = 0; i < need[b]; i++) table[b * maxPages + i] = order[next++];
  });
  const n = pages * pageSize * Hkv * D;
  return { pages, pageSize, Hkv, D, lens, table, maxPages, k: randn(n, r), v: randn(n, r) };
}

function cacheIndex(p: Paged, b: number, t: number, h: number): number {
  const page = p.table[b * p.maxPages + Math.floor(t / p.pageSize)];
  return ((page * p.pageSize + (t % p.pageSize)) * p.Hkv + h) * p.D;
}

/** NaN in every cache slot no sequence holds (past each length, and the spare pages): a kernel that lets
 * such a slot reach its sums (a tile read whole past the end of a sequence) returns NaN. */
function poisonUnused(p: Paged): void {
  const used = new Set<number>();
  p.lens.forEach((len, b) => {
    for (let i = 0; i * p.pageSize < len; i++) used.add(p.table[b * p.maxPages + i]);
    for (let t = len; t < Math.ceil(len / p.pageSize) * p.pageSize; t++)
      for (let h = 0; h < p.Hkv; h++) {
        const at = cacheIndex(p, b, t, h);
        p.k.fill(NaN, at, at + p.D);
        p.v.fill(NaN, at, at + p.D);
      }
  });
  const slot = p.pageSize * p.Hkv * p.D;
  for (let page = 0; page < p.pages; page++)
    if (!used.has(page)) {
      p.k.fill(NaN, page * slot, (page + 1) * slot);
      p.v.fill(NaN, page * slot, (page + 1) * slot);
    }
}

/** fp64 causal attention over the paged pool (the independent oracle). */
function oracle(q: Float32Array, p: Paged, cuQ: number[], Hq: number, scale: number): Float64Array {
  const { D, Hkv } = p;
  const g = Hq / Hkv;
  const N = cuQ[cuQ.length - 1];
  const out = new Float64Array(N * Hq * D);
  for (let b = 0; b < p.lens.length; b++) {
    const n = cuQ[b + 1] - cuQ[b];
    for (let j = 0; j < n; j++) {
      const row = cuQ[b] + j;
      const pos = p.lens[b] - n + j;
      for (let h = 0; h < Hq; h++) {
        const kvh = Math.floor(h / g);
        const s: number[] = [];
        for (let t = 0; t <= pos; t++) {
          const ki = cacheIndex(p, b, t, kvh);
          let d = 0;
          for (let e = 0; e < D; e++) d += q[(row * Hq + h) * D + e] * p.k[ki + e];
          s.push(d * scale);
        }
        const m = Math.max(...s);
        let sum = 0;
        const w = s.map((x) => { const e = Math.exp(x - m); sum += e; return e; });
        for (let t = 0; t <= pos; t++) {
          const vi = cacheIndex(p, b, t, kvh);
          for (let e = 0; e < D; e++) out[(row * Hq + h) * D + e] += (w[t] / sum) * p.v[vi + e];
        }
      }
    }
  }
  return out;
}

function cumsum(ns: number[]): number[] {
  const c = [0];
  for (const n of ns) c.push(c[c.length - 1] + n);
  return c;
}

/** Uploads the pool in `dtype` and replaces p.k/p.v with the stored (rounded) values. */
async function uploadPool(p: Paged, dtype: DType, device = 'cpu') {
  const shape = [p.pages, p.pageSize, p.Hkv, p.D];
  const kc = Tensor.from(p.k, shape, { dtype, device });
  const vc = Tensor.from(p.v, shape, { dtype, device });
  p.k = await kc.toFloat32();
  p.v = await vc.toFloat32();
  return { kc, vc };
}

function indexTensors(p: Paged, cuQ: number[], device = 'cpu') {
  return {
    pt: Tensor.from(p.table, [p.lens.length, p.maxPages], { device }),
    sl: Tensor.from(Int32Array.from(p.lens), [p.lens.length], { device }),
    cq: Tensor.from(Int32Array.from(cuQ), [cuQ.length], { device }),
  };
}

function poisoned(shape: number[], dtype: DType, device = 'cpu'): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const data = dtype === 'f32' ? new Float32Array(n).fill(NaN) : new Uint16Array(n).fill(0x7fff);
  return Tensor.from(data, shape, { dtype, device });
}

describe('attention (CPU) vs fp64 oracle', () => {
  const cases = [
    { name: 'MHA D64 decode', Hkv: 2, g: 1, D: 64, lens: [1, 17, 40], ns: [1, 1, 1] },
    { name: 'GQA2 D80 prefill', Hkv: 2, g: 2, D: 80, lens: [5, 17, 23], ns: [5, 17, 23] },
    { name: 'GQA4 D64 chunked prefill', Hkv: 1, g: 4, D: 64, lens: [9, 33, 20], ns: [3, 16, 1] },
    { name: 'GQA4 D80 decode with empty seq', Hkv: 2, g: 4, D: 80, lens: [30, 0, 18], ns: [2, 0, 1] },
  ];
  for (const c of cases)
    for (const dtype of ['f32', 'f16'] as DType[])
      test(`${c.name} ${dtype} cache`, async () => {
        const seed = freshSeed();
        const r = rng(seed);
        const p = makePaged(r, c.lens, 16, c.Hkv, c.D);
        const Hq = c.Hkv * c.g;
        const cuQ = cumsum(c.ns);
        const N = cuQ[cuQ.length - 1];
        const q = randn(N * Hq * c.D, r);
        const { kc, vc } = await uploadPool(p, dtype);
        const { pt, sl, cq } = indexTensors(p, cuQ);
        const out = poisoned([N, Hq, c.D], 'f32');
        const scale = 1 / Math.sqrt(c.D);
        attention(out, Tensor.from(q, [N, Hq, c.D]), kc, vc, pt, sl, cq, scale, { maxQ: Math.max(1, ...c.ns), maxSeqLen: Math.max(...c.lens) });
        const got = await out.toFloat32();
        const want = oracle(q, p, cuQ, Hq, scale);
        const err = relErr(got, want);
        if (!(err < 1e-5)) throw new Error(`seed ${seed}: rel err ${err}`);
      });

  test('keys on out-of-range pages are ignored, never read', async () => {
    const r = rng(freshSeed());
    const p = makePaged(r, [40], 16, 1, 64);
    const Hq = 2, D = 64, cuQ = [0, 1];
    const q = randn(Hq * D, r);
    const { kc, vc } = await uploadPool(p, 'f32');
    // Block 1 (tokens 16..31) points far outside the pool: those keys drop out.
    const table = Int32Array.from(p.table);
    table[1] = 1 << 30;
    const pt = Tensor.from(table, [1, p.maxPages]);
    const sl = Tensor.from(Int32Array.from([40]), [1]);
    const cq = Tensor.from(Int32Array.from(cuQ), [2]);
    const out = poisoned([1, Hq, D], 'f32');
    attention(out, Tensor.from(q, [1, Hq, D]), kc, vc, pt, sl, cq, 0.125, { maxQ: 1, maxSeqLen: 40 });
    const got = await out.toFloat32();
    // Oracle over the visible keys only.
    const want = new Float64Array(Hq * D);
    for (let h = 0; h < Hq; h++) {
      const keys = [...Array(40).keys()].filter((t) => t < 16 || t >= 32);
      const s = keys.map((t) => { let d = 0; const ki = cacheIndex(p, 0, t, 0); for (let e = 0; e < D; e++) d += q[h * D + e] * p.k[ki + e]; return d * 0.125; });
      const m = Math.max(...s);
      const w = s.map((x) => Math.exp(x - m));
      const sum = w.reduce((a, b) => a + b, 0);
      keys.forEach((t, i) => { const vi = cacheIndex(p, 0, t, 0); for (let e = 0; e < D; e++) want[h * D + e] += (w[i] / sum) * p.v[vi + e]; });
    }
    expect(relErr(got, want)).toBeLessThan(1e-5);
  });
});

describe('kvAppend (CPU)', () => {
  test('places rows at their sequences\' pages, then attention matches the oracle', async () => {
    const seed = freshSeed();
    const r = rng(seed);
    const Hkv = 2, D = 64, g = 2, Hq = 4, pageSize = 16;
    const lens = [20, 37, 5];
    const p = makePaged(r, lens, pageSize, Hkv, D);
    // Earlier tokens are already in the pool; the last ns[b] of each sequence are appended.
    const ns = [4, 37, 1];
    const cuQ = cumsum(ns);
    const N = cuQ[3];
    const k = randn(N * Hkv * D, r), v = randn(N * Hkv * D, r);
    const { kc, vc } = await uploadPool(p, 'f32');
    const { pt, sl, cq } = indexTensors(p, cuQ);
    kvAppend(kc, vc, Tensor.from(k, [N, Hkv, D]), Tensor.from(v, [N, Hkv, D]), pt, sl, cq);
    const kAfter = await kc.toFloat32(), vAfter = await vc.toFloat32();
    const expectK = Float32Array.from(p.k), expectV = Float32Array.from(p.v);
    for (let b = 0; b < 3; b++)
      for (let j = 0; j < ns[b]; j++) {
        const pos = lens[b] - ns[b] + j;
        for (let h = 0; h < Hkv; h++) {
          const ci = cacheIndex(p, b, pos, h), ri = ((cuQ[b] + j) * Hkv + h) * D;
          expectK.set(k.subarray(ri, ri + D), ci);
          expectV.set(v.subarray(ri, ri + D), ci);
        }
      }
    expect(Buffer.from(kAfter.buffer).equals(Buffer.from(expectK.buffer))).toBe(true);
    expect(Buffer.from(vAfter.buffer).equals(Buffer.from(expectV.buffer))).toBe(true);
    p.k = expectK;
    p.v = expectV;
    const q = randn(N * Hq * D, r);
    const out = poisoned([N, Hq, D], 'f32');
    attention(out, Tensor.from(q, [N, Hq, D]), kc, vc, pt, sl, cq, 0.1, { maxQ: 37, maxSeqLen: 37 });
    const err = relErr(await out.toFloat32(), oracle(q, p, cuQ, Hq, 0.1));
    if (!(err < 1e-5)) throw new Error(`seed ${seed}: rel err ${err}`);
    void g;
  });

  test('f32 rows into an f16 cache round to nearest', async () => {
    const kc = Tensor.from(new Uint16Array(2 * 16 * 1 * 8), [2, 16, 1, 8], { dtype: 'f16' });
    const vc = Tensor.from(new Uint16Array(2 * 16 * 1 * 8), [2, 16, 1, 8], { dtype: 'f16' });
    const k = Float32Array.from({ length: 8 }, (_, i) => i + 0.5), v = Float32Array.from({ length: 8 }, (_, i) => -i);
    kvAppend(kc, vc, Tensor.from(k, [1, 1, 8]), Tensor.from(v, [1, 1, 8]),
      Tensor.from(Int32Array.from([1, 0]), [1, 2]), Tensor.from(Int32Array.from([18]), [1]), Tensor.from(Int32Array.from([0, 1]), [2]));
    const kf = await kc.toFloat32(), vf = await vc.toFloat32();
    // position 17 -> logical block 1 -> page 0, slot 1
    expect(Array.from(kf.subarray(8, 16))).toEqual(Array.from(k));
    expect(Array.from(vf.subarray(8, 16))).toEqual(Array.from(v));
  });

  test('rows without a page are dropped', async () => {
    const kc = Tensor.from(new Float32Array(16 * 8).fill(7), [1, 16, 1, 8]);
    const vc = Tensor.from(new Float32Array(16 * 8).fill(7), [1, 16, 1, 8]);
    // seqLens 40 with one page of 16: position 39 has no page; page index 5 is outside the pool.
    kvAppend(kc, vc, Tensor.from(new Float32Array(8).fill(1), [1, 1, 8]), Tensor.from(new Float32Array(8).fill(1), [1, 1, 8]),
      Tensor.from(Int32Array.from([0]), [1, 1]), Tensor.from(Int32Array.from([40]), [1]), Tensor.from(Int32Array.from([0, 1]), [2]));
    kvAppend(kc, vc, Tensor.from(new Float32Array(8).fill(1), [1, 1, 8]), Tensor.from(new Float32Array(8).fill(1), [1, 1, 8]),
      Tensor.from(Int32Array.from([5]), [1, 1]), Tensor.from(Int32Array.from([3]), [1]), Tensor.from(Int32Array.from([0, 1]), [2]));
    expect((await kc.toFloat32()).every((x) => x === 7)).toBe(true);
  });
});

describe('attention argument errors', () => {
  const mk = () => {
    const kc = Tensor.from(new Float32Array(4 * 16 * 2 * 8), [4, 16, 2, 8]);
    const vc = Tensor.from(new Float32Array(4 * 16 * 2 * 8), [4, 16, 2, 8]);
    return {
      kc, vc,
      q: Tensor.from(new Float32Array(3 * 4 * 8), [3, 4, 8]),
      out: Tensor.from(new Float32Array(3 * 4 * 8), [3, 4, 8]),
      pt: Tensor.from(Int32Array.from([0, 1, 2, 3]), [2, 2]),
      sl: Tensor.from(Int32Array.from([2, 1]), [2]),
      cq: Tensor.from(Int32Array.from([0, 2, 3]), [3]),
    };
  };
  const expectCode = (fn: () => void, code: string) => {
    let err: unknown;
    try { fn(); } catch (e) { err = e; }
    if (!isSqueezeError(err, code)) throw new Error(`expected ${code}, got ${String(err)}`);
  };
  test('bad shapes, dtypes and bounds are coded errors (wrapper and native)', () => {
    const a = mk();
    const b = { maxQ: 2, maxSeqLen: 2 };
    expectCode(() => attention(a.out, Tensor.from(new Float32Array(3 * 3 * 8), [3, 3, 8]), a.kc, a.vc, a.pt, a.sl, a.cq, 1, b), 'ERR_SHAPE');
    expectCode(() => attention(a.out, a.q, a.kc, a.vc, a.pt, a.sl, Tensor.from(Int32Array.from([0, 3]), [2]), 1, b), 'ERR_SHAPE');
    expectCode(() => attention(a.out, a.q, a.kc, a.vc, Tensor.from(new Float32Array(4), [2, 2]), a.sl, a.cq, 1, b), 'ERR_DTYPE');
    expectCode(() => attention(a.out, a.q, a.kc, a.vc, a.pt, a.sl, a.cq, 1, { maxQ: 0, maxSeqLen: 2 }), 'ERR_ARG');
    // The page table addresses 2 pages of 16 tokens.
    expectCode(() => attention(a.out, a.q, a.kc, a.vc, a.pt, a.sl, a.cq, 1, { maxQ: 2, maxSeqLen: 33 }), 'ERR_CONTEXT_LENGTH');
    const n = native().ops;
    expectCode(() => n.attention(a.out.native, a.q.native, a.kc.native, a.vc.native, a.pt.native, a.sl.native, a.cq.native, 1, 2, 33), 'ERR_CONTEXT_LENGTH');
    expectCode(() => n.attention(a.out.native, a.q.native, a.kc.native, a.vc.native, a.pt.native, a.sl.native, a.pt.native, 1, 2, 2), 'ERR_SHAPE');
    expectCode(() => n.kvAppend(a.kc.native, a.vc.native, a.q.native, a.q.native, a.pt.native, a.sl.native, a.cq.native), 'ERR_SHAPE');
    expectCode(() => kvAppend(a.kc, a.vc, a.q, a.q, a.pt, a.sl, a.cq), 'ERR_SHAPE');
    expect(attentionWorkspaceSize('cpu', 2, 4, 2, 8, 1, 32)).toBe(0);
  });
});

describeGpu('attention (CUDA) vs CPU', () => {
  const configs = [
    { Hkv: 2, g: 1, D: 64, pageSize: 16, lens: [1, 17, 300], ns: [1, 1, 1] },
    { Hkv: 1, g: 3, D: 80, pageSize: 64, lens: [1031, 5], ns: [1, 1] },
    { Hkv: 2, g: 4, D: 96, pageSize: 16, lens: [300, 17, 1, 64, 129], ns: [2, 1, 1, 4, 3] },
    { Hkv: 1, g: 8, D: 128, pageSize: 256, lens: [1031], ns: [1] },
    { Hkv: 2, g: 1, D: 256, pageSize: 16, lens: [17, 300], ns: [1, 1] },
    { Hkv: 4, g: 8, D: 128, pageSize: 16, lens: [2048], ns: [1] },
    // more than 16 query vectors per kv head: two query chunks of the tensor-core decode kernel
    { Hkv: 2, g: 6, D: 112, pageSize: 32, lens: [5000, 3], ns: [2, 3] },
    { Hkv: 1, g: 8, D: 48, pageSize: 16, lens: [77, 600], ns: [3, 4] },
    // more than 32 splits: the last block's merge past the pairs and partials it requests first
    { Hkv: 1, g: 4, D: 128, pageSize: 16, lens: [4000], ns: [1] },
    { Hkv: 2, g: 1, D: 128, pageSize: 16, lens: [3000], ns: [1] },
    // pages that do not hold a multiple of 16 tokens: the tensor-core kernel's per-token lookups
    { Hkv: 1, g: 4, D: 64, pageSize: 24, lens: [1000, 37], ns: [1, 2] },
    // head_dim 128, at most 4 query vectors per kv head, splits of a few tiles: the tensor-core
    // kernel's 4-warp deep-ring shape (whole-tile pages, then per-token lookups)
    { Hkv: 2, g: 4, D: 128, pageSize: 16, lens: [700, 33, 1], ns: [1, 1, 1] },
    { Hkv: 1, g: 3, D: 128, pageSize: 40, lens: [900, 5], ns: [1, 1] },
    // the TMA kernels (head_dim 64 / 128, pages of whole tiles) with NaN in every slot no sequence holds
    { Hkv: 2, g: 8, D: 128, pageSize: 32, lens: [2000, 45, 16], ns: [1, 1, 1], nanUnused: true },
    { Hkv: 2, g: 4, D: 64, pageSize: 64, lens: [777, 3], ns: [2, 1], nanUnused: true },
    { Hkv: 2, g: 4, D: 128, pageSize: 16, lens: [300, 33], ns: [1, 1], nanUnused: true }, // the deep ring (cp.async)
    // the same through the cp.async kernels
    { Hkv: 2, g: 8, D: 128, pageSize: 32, lens: [2000, 45, 16], ns: [1, 1, 1], env: { SQUEEZELM_ATTN_TMA: '0' } },
    { Hkv: 2, g: 4, D: 64, pageSize: 64, lens: [777, 3], ns: [2, 1], env: { SQUEEZELM_ATTN_TMA: '0' } },
    // prefill and chunked prefill
    { Hkv: 2, g: 1, D: 64, pageSize: 16, lens: [300, 17, 1], ns: [300, 17, 1] },
    { Hkv: 1, g: 3, D: 80, pageSize: 64, lens: [1031, 200], ns: [100, 200] },
    { Hkv: 2, g: 4, D: 96, pageSize: 16, lens: [129, 65, 300], ns: [129, 1, 77] },
    { Hkv: 1, g: 8, D: 128, pageSize: 256, lens: [1031, 300, 17, 5], ns: [1031, 31, 17, 5] },
    { Hkv: 2, g: 1, D: 256, pageSize: 16, lens: [300, 70], ns: [150, 70] },
    { Hkv: 2, g: 2, D: 72, pageSize: 16, lens: [90, 33], ns: [90, 5] }, // head_dim without a prefill kernel
  ];
  for (const dtype of ['f16', 'bf16'] as DType[])
    for (const c of configs) {
      const Hq = c.Hkv * c.g;
      const env: Record<string, string> = (c as { env?: Record<string, string> }).env ?? {};
      const envName = Object.entries(env).map(([k, v]) => ` ${k}=${v}`).join('');
      test(`${dtype} Hq=${Hq} Hkv=${c.Hkv} D=${c.D} page=${c.pageSize} lens=${c.lens} n=${c.ns}${envName}`, async () => {
        Object.assign(process.env, env);
        try {
          const seed = freshSeed();
          const r = rng(seed);
          const p = makePaged(r, c.lens, c.pageSize, c.Hkv, c.D);
          if ((c as { nanUnused?: boolean }).nanUnused) poisonUnused(p);
          const cuQ = cumsum(c.ns);
          const N = cuQ[cuQ.length - 1];
          const q = randn(N * Hq * c.D, r);
          const kcG = Tensor.from(p.k, [p.pages, c.pageSize, c.Hkv, c.D], { dtype, device: 'cuda' });
          const vcG = Tensor.from(p.v, [p.pages, c.pageSize, c.Hkv, c.D], { dtype, device: 'cuda' });
          const qG = Tensor.from(q, [N, Hq, c.D], { dtype, device: 'cuda' });
          const ig = indexTensors(p, cuQ, 'cuda');
          const outG = poisoned([N, Hq, c.D], dtype, 'cuda');
          const scale = 1 / Math.sqrt(c.D);
          const bounds = { maxQ: Math.max(...c.ns), maxSeqLen: Math.max(...c.lens) };
          attention(outG, qG, kcG, vcG, ig.pt, ig.sl, ig.cq, scale, bounds);
          const got = await outG.toFloat32();
          const firstBits = Buffer.from((await outG.toArray()).buffer);
          // CPU op on the same (rounded) data.
          const kc = await kcG.to('cpu'), vc = await vcG.to('cpu'), qc = await qG.to('cpu');
          const ic = indexTensors(p, cuQ);
          const out = poisoned([N, Hq, c.D], 'f32');
          attention(out, qc, kc, vc, ic.pt, ic.sl, ic.cq, scale, bounds);
          const want = await out.toFloat32();
          const err = relErr(got, want);
          const tol = dtype === 'f16' ? 2e-3 : 1e-2;
          if (!(err <= tol)) throw new Error(`seed ${seed}: rel err ${err} > ${tol}`);
          // Determinism: a second launch gives the same bits.
          attention(outG, qG, kcG, vcG, ig.pt, ig.sl, ig.cq, scale, bounds);
          expect(Buffer.from((await outG.toArray()).buffer).equals(firstBits)).toBe(true);
          // Decode: the splits merged by a separate kernel give the same bits as the in-kernel merge.
          if (bounds.maxQ <= 4) {
            process.env.SQUEEZELM_ATTN_COMBINE_KERNEL = '1';
            try {
              const o2 = poisoned([N, Hq, c.D], dtype, 'cuda');
              attention(o2, qG, kcG, vcG, ig.pt, ig.sl, ig.cq, scale, bounds);
              expect(Buffer.from((await o2.toArray()).buffer).equals(firstBits)).toBe(true);
            } finally {
              delete process.env.SQUEEZELM_ATTN_COMBINE_KERNEL;
            }
            // The CUDA-core decode kernel (the tensor-core one's A/B reference) on the same data.
            process.env.SQUEEZELM_ATTN_SIMT = '1';
            try {
              const o3 = poisoned([N, Hq, c.D], dtype, 'cuda');
              attention(o3, qG, kcG, vcG, ig.pt, ig.sl, ig.cq, scale, bounds);
              const e3 = relErr(await o3.toFloat32(), want);
              if (!(e3 <= tol)) throw new Error(`seed ${seed}: CUDA-core kernel rel err ${e3} > ${tol}`);
            } finally {
              delete process.env.SQUEEZELM_ATTN_SIMT;
            }
          }
        } finally {
          for (const k of Object.keys(env)) delete process.env[k];
        }
      }, 60000);
    }

  for (const dtype of ['f16', 'bf16'] as DType[])
    test(`kvAppend ${dtype} matches CPU bit for bit`, async () => {
      const r = rng(freshSeed());
      const Hkv = 3, D = 80;
      const lens = [17, 300, 1, 64];
      const ns = [17, 3, 1, 64];
      const p = makePaged(r, lens, 16, Hkv, D);
      const cuQ = cumsum(ns);
      const N = cuQ[4];
      const k = randn(N * Hkv * D, r), v = randn(N * Hkv * D, r);
      const shape = [p.pages, 16, Hkv, D];
      const kcG = Tensor.from(p.k, shape, { dtype, device: 'cuda' }), vcG = Tensor.from(p.v, shape, { dtype, device: 'cuda' });
      const kc = Tensor.from(p.k, shape, { dtype }), vc = Tensor.from(p.v, shape, { dtype });
      const ig = indexTensors(p, cuQ, 'cuda'), ic = indexTensors(p, cuQ);
      kvAppend(kcG, vcG, Tensor.from(k, [N, Hkv, D], { dtype, device: 'cuda' }), Tensor.from(v, [N, Hkv, D], { dtype, device: 'cuda' }), ig.pt, ig.sl, ig.cq);
      kvAppend(kc, vc, Tensor.from(k, [N, Hkv, D], { dtype }), Tensor.from(v, [N, Hkv, D], { dtype }), ic.pt, ic.sl, ic.cq);
      const a = await kcG.toArray(), b = await kc.toArray();
      const c2 = await vcG.toArray(), d = await vc.toArray();
      expect(Buffer.from(a.buffer).equals(Buffer.from(b.buffer))).toBe(true);
      expect(Buffer.from(c2.buffer).equals(Buffer.from(d.buffer))).toBe(true);
    });

  test('decode captured in a graph replays with new lengths (workspace passed)', async () => {
    const r = rng(freshSeed());
    const Hkv = 2, g = 4, Hq = 8, D = 128, lens = [500, 1200];
    const p = makePaged(r, lens, 16, Hkv, D);
    const shape = [p.pages, 16, Hkv, D];
    const kcG = Tensor.from(p.k, shape, { dtype: 'f16', device: 'cuda' }), vcG = Tensor.from(p.v, shape, { dtype: 'f16', device: 'cuda' });
    const cuQ = [0, 1, 2];
    const q = randn(2 * Hq * D, r);
    const qG = Tensor.from(q, [2, Hq, D], { dtype: 'f16', device: 'cuda' });
    const ig = indexTensors(p, cuQ, 'cuda');
    const bounds = { maxQ: 1, maxSeqLen: 1200 };
    const ws = Tensor.empty([attentionWorkspaceSize('cuda', 2, Hq, Hkv, D, 1, 1200)], { dtype: 'f32', device: 'cuda' });
    const outG = poisoned([2, Hq, D], 'f16', 'cuda');
    const n = native();
    expect(() => { n.captureBegin('cuda:0'); try { attention(outG, qG, kcG, vcG, ig.pt, ig.sl, ig.cq, 0.09, bounds); } finally { n.captureEnd('cuda:0').dispose(); } }).toThrow();
    n.captureBegin('cuda:0');
    let graph;
    try {
      attention(outG, qG, kcG, vcG, ig.pt, ig.sl, ig.cq, 0.09, { ...bounds, workspace: ws });
    } finally {
      graph = n.captureEnd('cuda:0');
    }
    const kc = await kcG.to('cpu'), vc = await vcG.to('cpu'), qc = await qG.to('cpu');
    for (const newLens of [[500, 1200], [7, 999]]) {
      ig.sl.write(Int32Array.from(newLens));
      graph.replay();
      const got = await outG.toFloat32();
      const ic = indexTensors({ ...p, lens: newLens }, cuQ);
      const out = poisoned([2, Hq, D], 'f32');
      attention(out, qc, kc, vc, ic.pt, ic.sl, ic.cq, 0.09, bounds);
      expect(relErr(got, await out.toFloat32())).toBeLessThan(2e-3);
    }
    graph.dispose();
  });
});
