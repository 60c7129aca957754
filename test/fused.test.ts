import { Tensor, DType } from '../ts/tensor';
import { isSqueezeError } from '../ts/errors';
import { rope } from '../ts/ops/elementwise';
import { kvAppend } from '../ts/ops/attention';
import { ropeAppend, linearRopeAppend } from '../ts/ops/fused';
import { fusedLinear } from '../ts/ops/gemm';
import { describeGpu, freshSeed, randn, relErr, rng } from './gpu';
import { SqueezeLinear, SqueezeLinearModule, packCodes, uploadSqueezeLinear } from '../ts/quant/squeezellm';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

interface Case {
  T: number;
  Hq: number;
  Hkv: number;
  D: number;
  pageSize: number;
  pages: number;
  /** Rows per sequence; rows past their sum belong to no sequence. */
  ns: number[];
  lens: number[];
  maxPages: number;
  table: Int32Array;
  positions: Int32Array;
  qkv: Float32Array;
  kc: Float32Array;
  vc: Float32Array;
  invFreq: Float32Array;
}

function invFreqFor(d: number, theta = 10000): Float32Array {
  const f = new Float32Array(d / 2);
  for (let i = 0; i < d / 2; i++) f[i] = 1 / Math.pow(theta, (2 * i) / d);
  return f;
}

/** Random sequences with shuffled pages; one page-table entry out of the pool, extra unowned rows. */
function makeCase(r: () => number, o: { Hq: number; Hkv: number; D: number; pageSize: number; ns: number[]; extraRows?: number; badPage?: boolean }): Case {
  const { Hq, Hkv, D, pageSize, ns } = o;
  const lens = ns.map((n) => n + Math.floor(r() * 40));
  const need = lens.map((l) => Math.ceil(l / pageSize));
  const maxPages = Math.max(...need) + 1;
  const pages = need.reduce((a, b) => a + b, 0) + 2;
  const order = Array.from({ length: pages }, (_, i) => i);
  for (let i = pages - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const table = new Int32Array(ns.length * maxPages).fill(-1);
  let next = 0;
  need.forEach((n, b) => { for (let j = 0; j < n; j++) table[b * maxPages + j] = order[next++]; });
  if (o.badPage) table[need[0] - 1] = pages + 5; // the last page of sequence 0 names no page of the pool
  const T = ns.reduce((a, b) => a + b, 0) + (o.extraRows ?? 0);
  const positions = Int32Array.from({ length: T }, () => Math.floor(r() * 200000));
  const W = (Hq + 2 * Hkv) * D;
  return {
    T, Hq, Hkv, D, pageSize, pages, ns, lens, maxPages, table, positions,
    qkv: randn(T * W, r), kc: randn(pages * pageSize * Hkv * D, r), vc: randn(pages * pageSize * Hkv * D, r),
    invFreq: invFreqFor(D),
  };
}

interface Result { q: Float32Array; kc: Float32Array; vc: Float32Array }

function indexTensors(c: Case, device: string) {
  const cuQ = new Int32Array(c.ns.length + 1);
  c.ns.forEach((n, b) => { cuQ[b + 1] = cuQ[b] + n; });
  return {
    pos: Tensor.from(c.positions, [c.T], { device }),
    f: Tensor.from(c.invFreq, [c.invFreq.length], { device }),
    pt: Tensor.from(c.table, [c.ns.length, c.maxPages], { device }),
    sl: Tensor.from(Int32Array.from(c.lens), [c.ns.length], { device }),
    cq: Tensor.from(cuQ, [c.ns.length + 1], { device }),
  };
}

function caches(c: Case, device: string, dtype: DType) {
  const shape = [c.pages, c.pageSize, c.Hkv, c.D];
  return { kc: Tensor.from(c.kc, shape, { dtype, device }), vc: Tensor.from(c.vc, shape, { dtype, device }) };
}

async function runFused(c: Case, device: string, dtype: DType): Promise<Result> {
  const W = (c.Hq + 2 * c.Hkv) * c.D;
  const { pos, f, pt, sl, cq } = indexTensors(c, device);
  const { kc, vc } = caches(c, device, dtype);
  const qkv = Tensor.from(c.qkv, [c.T, W], { dtype, device });
  const qOut = Tensor.from(new Float32Array(c.T * c.Hq * c.D).fill(NaN), [c.T, c.Hq, c.D], { dtype, device });
  ropeAppend(qOut, kc, vc, qkv, pos, f, pt, sl, cq);
  return { q: await qOut.toFloat32(), kc: await kc.toFloat32(), vc: await vc.toFloat32() };
}

/** rope(q), rope(k), kvAppend(k, v) on separate buffers: what the fused op replaces. */
async function runComposed(c: Case, device: string, dtype: DType): Promise<Result> {
  const { T, Hq, Hkv, D } = c;
  const W = (Hq + 2 * Hkv) * D;
  const q = new Float32Array(T * Hq * D), k = new Float32Array(T * Hkv * D), v = new Float32Array(T * Hkv * D);
  for (let t = 0; t < T; t++) {
    q.set(c.qkv.subarray(t * W, t * W + Hq * D), t * Hq * D);
    k.set(c.qkv.subarray(t * W + Hq * D, t * W + (Hq + Hkv) * D), t * Hkv * D);
    v.set(c.qkv.subarray(t * W + (Hq + Hkv) * D, (t + 1) * W), t * Hkv * D);
  }
  const { pos, f, pt, sl, cq } = indexTensors(c, device);
  const { kc, vc } = caches(c, device, dtype);
  const qt = Tensor.from(q, [T, Hq, D], { dtype, device });
  const kt = Tensor.from(k, [T, Hkv, D], { dtype, device });
  const vt = Tensor.from(v, [T, Hkv, D], { dtype, device });
  rope(qt, pos, f);
  rope(kt, pos, f);
  // kvAppend takes the rows its sequences own; unowned rows are past cuQ[B] and ignored.
  kvAppend(kc, vc, kt, vt, pt, sl, cq);
  return { q: await qt.toFloat32(), kc: await kc.toFloat32(), vc: await vc.toFloat32() };
}

/** The code of what fn throws ('none' when it returns). */
function errorCode(fn: () => void): string {
  try {
    fn();
  } catch (e) {
    return isSqueezeError(e) ? e.code : String(e);
  }
  return 'none';
}

/** linearRopeAppend's index options for a case. */
function ropeIndex(c: Case, device: string) {
  const { pos, f, pt, sl, cq } = indexTensors(c, device);
  return { positions: pos, invFreq: f, pageTable: pt, seqLens: sl, cuQ: cq };
}

function same(a: Float32Array, b: Float32Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

/**
 * A fused op's CUDA result `fused` against the same steps launched apart on CUDA (`composed`: bit for
 * bit) and against the CPU's fused op (`cpu`: within 2e-3, bf16 1e-2).
 */
function expectFusedOnCuda(what: string, dtype: DType, fused: Result, composed: Result, cpu: Result): void {
  if (!same(fused.q, composed.q) || !same(fused.kc, composed.kc) || !same(fused.vc, composed.vc))
    throw new Error(`${what}: fused and composed differ on CUDA`);
  const tol = dtype === 'bf16' ? 1e-2 : 2e-3;
  for (const [name, x, y] of [['q', fused.q, cpu.q], ['kCache', fused.kc, cpu.kc], ['vCache', fused.vc, cpu.vc]] as const) {
    const e = relErr(x, y);
    if (!(e < tol)) throw new Error(`${what}: ${name} rel err ${e}`);
  }
}
const SHAPES = [
  { Hq: 4, Hkv: 2, D: 64, pageSize: 16, ns: [3, 1, 17], extraRows: 2, badPage: true },
  { Hq: 2, Hkv: 2, D: 8, pageSize: 5, ns: [1, 1, 1], extraRows: 0 },
  { Hq: 32, Hkv: 8, D: 128, pageSize: 16, ns: [1, 1, 1, 1, 1, 1, 1], extraRows: 1 },
  { Hq: 3, Hkv: 1, D: 24, pageSize: 7, ns: [41], extraRows: 0, badPage: true },
];

describe('ropeAppend (CPU)', () => {
  for (const dtype of ['f32', 'f16', 'bf16'] as DType[])
    test(`equals rope + rope + kvAppend bit for bit (${dtype})`, async () => {
      const seed = freshSeed();
      const r = rng(seed);
      for (const s of SHAPES) {
        const c = makeCase(r, s);
        const a = await runFused(c, 'cpu', dtype), b = await runComposed(c, 'cpu', dtype);
        if (!same(a.q, b.q) || !same(a.kc, b.kc) || !same(a.vc, b.vc))
          throw new Error(`seed ${seed} shape ${JSON.stringify(s)}: fused and composed differ`);
        expect(a.q.every(Number.isFinite)).toBe(true);
      }
    });

  test('matches a float64 oracle and leaves other slots alone (f32)', async () => {
    const seed = freshSeed();
    const r = rng(seed);
    const c = makeCase(r, SHAPES[0]);
    const a = await runFused(c, 'cpu', 'f32');
    const { T, Hq, Hkv, D } = c, half = D / 2, W = (Hq + 2 * Hkv) * D;
    const rot = (t: number, h: number): Float64Array => {
      const o = new Float64Array(D), base = t * W + h * D;
      for (let i = 0; i < half; i++) {
        const ang = Math.fround(Math.fround(c.positions[t]) * c.invFreq[i]);
        const co = Math.cos(ang), si = Math.sin(ang), x1 = c.qkv[base + i], x2 = c.qkv[base + i + half];
        o[i] = x1 * co - x2 * si;
        o[i + half] = x2 * co + x1 * si;
      }
      return o;
    };
    const wantQ = new Float64Array(T * Hq * D);
    for (let t = 0; t < T; t++) for (let h = 0; h < Hq; h++) wantQ.set(rot(t, h), (t * Hq + h) * D);
    const eq = relErr(a.q, wantQ);
    if (!(eq < 1e-5)) throw new Error(`seed ${seed}: q rel err ${eq}`);
    const wantK = Float64Array.from(c.kc), wantV = Float64Array.from(c.vc);
    let row = 0;
    c.ns.forEach((n, b) => {
      for (let j = 0; j < n; j++, row++) {
        const pos = c.lens[b] - n + j;
        const page = c.table[b * c.maxPages + Math.floor(pos / c.pageSize)];
        if (page < 0 || page >= c.pages) continue;
        const off = (page * c.pageSize + (pos % c.pageSize)) * Hkv * D;
        for (let h = 0; h < Hkv; h++) {
          wantK.set(rot(row, Hq + h), off + h * D);
          wantV.set(c.qkv.subarray(row * W + (Hq + Hkv + h) * D, row * W + (Hq + Hkv + h + 1) * D), off + h * D);
        }
      }
    });
    const ek = relErr(a.kc, wantK);
    if (!(ek < 1e-5)) throw new Error(`seed ${seed}: k cache rel err ${ek}`);
    expect(same(a.vc, Float32Array.from(wantV))).toBe(true);
  });

  test('coded errors', () => {
    const c = makeCase(rng(1), SHAPES[1]);
    const { pos, f, pt, sl, cq } = indexTensors(c, 'cpu');
    const { kc, vc } = caches(c, 'cpu', 'f32');
    const W = (c.Hq + 2 * c.Hkv) * c.D;
    const qkv = Tensor.empty([c.T, W]);
    expect(errorCode(() => ropeAppend(Tensor.empty([c.T, c.Hq, c.D]), kc, vc, Tensor.empty([c.T, W + 1]), pos, f, pt, sl, cq))).toBe('ERR_SHAPE');
    expect(errorCode(() => ropeAppend(Tensor.empty([c.T, c.Hq + 1, c.D]), kc, vc, qkv, pos, f, pt, sl, cq))).toBe('ERR_SHAPE');
    expect(errorCode(() => ropeAppend(Tensor.empty([c.T, c.Hq, c.D]), kc, vc, qkv, Tensor.empty([c.T], { dtype: 'f32' }), f, pt, sl, cq))).toBe('ERR_DTYPE');
    expect(errorCode(() => ropeAppend(qkv.view(0, [c.T, c.Hq, c.D]), kc, vc, qkv, pos, f, pt, sl, cq))).toBe('ERR_ARG');
    expect(errorCode(() => ropeAppend(Tensor.empty([c.T, c.Hq, c.D]), kc, vc, qkv, pos, f, pt, sl, Tensor.empty([2], { dtype: 'i32' })))).toBe('ERR_SHAPE');
    expect(errorCode(() => ropeAppend(Tensor.empty([c.T, c.Hq, c.D]), kc, vc, qkv, pos, f, pt, sl, cq))).toBe('none');
  });
});

describeGpu('ropeAppend (CUDA)', () => {
  for (const dtype of ['f16', 'bf16', 'f32'] as DType[])
    test(`equals the CUDA rope + kvAppend composition bit for bit and the CPU reference (${dtype})`, async () => {
      const seed = freshSeed();
      const r = rng(seed);
      const shapes = dtype === 'f32' ? SHAPES.slice(0, 1) : [...SHAPES, { Hq: 32, Hkv: 32, D: 128, pageSize: 16, ns: [300], extraRows: 3 }];
      for (const s of shapes) {
        const c = makeCase(r, s);
        const g = await runFused(c, 'cuda', dtype);
        if (dtype !== 'f32') {
          const b = await runComposed(c, 'cuda', dtype);
          if (!same(g.q, b.q) || !same(g.kc, b.kc) || !same(g.vc, b.vc))
            throw new Error(`seed ${seed} shape ${JSON.stringify(s)}: fused and composed differ on CUDA`);
        }
        const h = await runFused(c, 'cpu', dtype);
        // cos/sin of the CUDA math library and of the host differ by an ulp at most.
        const tol = dtype === 'bf16' ? 1e-2 : dtype === 'f16' ? 2e-3 : 1e-5;
        for (const [name, x, y] of [['q', g.q, h.q], ['kCache', g.kc, h.kc]] as const) {
          const e = relErr(x, y);
          if (!(e < tol)) throw new Error(`seed ${seed} shape ${JSON.stringify(s)}: ${name} rel err ${e}`);
        }
        if (!same(g.vc, h.vc)) throw new Error(`seed ${seed} shape ${JSON.stringify(s)}: vCache differs`);
      }
    });

  test('coded errors: mixed dtypes', () => {
    const c = makeCase(rng(2), SHAPES[1]);
    const { pos, f, pt, sl, cq } = indexTensors(c, 'cuda');
    const { kc, vc } = caches(c, 'cuda', 'f16');
    const W = (c.Hq + 2 * c.Hkv) * c.D;
    expect(errorCode(() => ropeAppend(Tensor.empty([c.T, c.Hq, c.D], { dtype: 'f32', device: 'cuda' }), kc, vc,
      Tensor.empty([c.T, W], { dtype: 'f16', device: 'cuda' }), pos, f, pt, sl, cq))).toBe('ERR_DTYPE');
  });
});

// linearRopeAppend: the q|k|v projection feeding ropeAppend, with the norm and bias options.
interface LinearCase { c: Case; K: number; x: Float32Array; w: Float32Array; bias?: Float32Array; gamma?: Float32Array }

const LINEAR_SHAPES = [
  { Hq: 4, Hkv: 2, D: 64, pageSize: 16, ns: [1], K: 256, norm: true, bias: false },
  { Hq: 32, Hkv: 8, D: 128, pageSize: 16, ns: [1, 1], K: 512, norm: true, bias: true, badPage: true },
  { Hq: 3, Hkv: 1, D: 24, pageSize: 7, ns: [1], extraRows: 1, K: 100, norm: true, bias: true },
  { Hq: 8, Hkv: 8, D: 64, pageSize: 16, ns: [1, 1], K: 320, norm: false, bias: true },
  { Hq: 6, Hkv: 2, D: 80, pageSize: 16, ns: [2], K: 96, norm: false, bias: false },
  { Hq: 32, Hkv: 32, D: 128, pageSize: 16, ns: [1], K: 512, norm: true, bias: false },
];

function makeLinearCase(r: () => number, s: (typeof LINEAR_SHAPES)[number]): LinearCase {
  const c = makeCase(r, s);
  const W = (c.Hq + 2 * c.Hkv) * c.D;
  const gamma = s.norm ? Float32Array.from({ length: s.K }, () => 0.5 + r()) : undefined;
  return {
    c, K: s.K, x: randn(c.T * s.K, r), w: randn(W * s.K, r, 1 / Math.sqrt(s.K)),
    bias: s.bias ? randn(W, r, 0.5) : undefined, gamma,
  };
}

async function runLinear(l: LinearCase, device: string, dtype: DType, composed: boolean): Promise<Result> {
  const { c, K } = l;
  const W = (c.Hq + 2 * c.Hkv) * c.D;
  const { pos, f, pt, sl, cq } = indexTensors(c, device);
  const { kc, vc } = caches(c, device, dtype);
  const x = Tensor.from(l.x, [c.T, K], { dtype, device }), w = Tensor.from(l.w, [W, K], { dtype, device });
  const bias = l.bias ? Tensor.from(l.bias, [W], { dtype, device }) : undefined;
  const normWeight = l.gamma ? Tensor.from(l.gamma, [K], { dtype, device }) : undefined;
  const qOut = Tensor.from(new Float32Array(c.T * c.Hq * c.D).fill(NaN), [c.T, c.Hq, c.D], { dtype, device });
  if (composed) {
    const qkv = Tensor.from(new Float32Array(c.T * W).fill(NaN), [c.T, W], { dtype, device });
    fusedLinear(qkv, x, w, { bias, normWeight, eps: 1e-5 });
    ropeAppend(qOut, kc, vc, qkv, pos, f, pt, sl, cq);
  } else {
    linearRopeAppend(qOut, kc, vc, x, w, { bias, normWeight, eps: 1e-5, positions: pos, invFreq: f, pageTable: pt, seqLens: sl, cuQ: cq });
  }
  return { q: await qOut.toFloat32(), kc: await kc.toFloat32(), vc: await vc.toFloat32() };
}

describe('linearRopeAppend (CPU)', () => {
  for (const dtype of ['f32', 'f16', 'bf16'] as DType[])
    test(`equals fusedLinear + ropeAppend bit for bit (${dtype})`, async () => {
      const seed = freshSeed();
      const r = rng(seed);
      for (const s of LINEAR_SHAPES.slice(0, 5)) {
        const l = makeLinearCase(r, s);
        const a = await runLinear(l, 'cpu', dtype, false), b = await runLinear(l, 'cpu', dtype, true);
        if (!same(a.q, b.q) || !same(a.kc, b.kc) || !same(a.vc, b.vc))
          throw new Error(`seed ${seed} shape ${JSON.stringify(s)}: fused and composed differ`);
        expect(a.q.every(Number.isFinite)).toBe(true);
      }
    });

  test('coded errors', () => {
    const l = makeLinearCase(rng(3), LINEAR_SHAPES[0]);
    const { c, K } = l;
    const W = (c.Hq + 2 * c.Hkv) * c.D;
    const { kc, vc } = caches(c, 'cpu', 'f32');
    const x = Tensor.empty([c.T, K]), w = Tensor.empty([W, K]);
    const idx = ropeIndex(c, 'cpu');
    const q = () => Tensor.empty([c.T, c.Hq, c.D]);
    expect(errorCode(() => linearRopeAppend(q(), kc, vc, x, Tensor.empty([W + 2, K]), idx))).toBe('ERR_SHAPE');
    expect(errorCode(() => linearRopeAppend(q(), kc, vc, x, Tensor.empty([W, K + 1]), idx))).toBe('ERR_SHAPE');
    expect(errorCode(() => linearRopeAppend(q(), kc, vc, x, w, { ...idx, bias: Tensor.empty([W - 1]) }))).toBe('ERR_SHAPE');
    expect(errorCode(() => linearRopeAppend(q(), kc, vc, x, w, { ...idx, normWeight: Tensor.empty([K + 8]) }))).toBe('ERR_SHAPE');
    expect(errorCode(() => linearRopeAppend(q(), kc, vc, x, w, { ...idx, eps: -1 }))).toBe('ERR_ARG');
    expect(errorCode(() => linearRopeAppend(q(), kc, vc, x, w, { ...idx, positions: Tensor.empty([c.T], { dtype: 'f32' }) }))).toBe('ERR_DTYPE');
    expect(errorCode(() => linearRopeAppend(x.view(0, [c.T, c.Hq, c.D]), kc, vc, x, w, idx))).toBe('ERR_ARG');
    expect(errorCode(() => linearRopeAppend(q(), kc, vc, x, w, undefined as unknown as typeof idx))).toBe('ERR_ARG');
    expect(errorCode(() => linearRopeAppend(q(), kc, vc, x, w, idx))).toBe('none');
  });
});

describeGpu('linearRopeAppend (CUDA)', () => {
  for (const dtype of ['f16', 'bf16'] as DType[])
    test(`equals the CUDA fusedLinear + ropeAppend bit for bit and the CPU reference (${dtype})`, async () => {
      const seed = freshSeed();
      const r = rng(seed);
      for (const s of LINEAR_SHAPES) {
        const l = makeLinearCase(r, s);
        const g = await runLinear(l, 'cuda', dtype, false);
        const b = await runLinear(l, 'cuda', dtype, true);
        expectFusedOnCuda(`seed ${seed} shape ${JSON.stringify(s)}`, dtype, g, b, await runLinear(l, 'cpu', dtype, false));
      }
    });

  test('coded errors: more than 2 rows, mixed dtypes', () => {
    const l = makeLinearCase(rng(4), LINEAR_SHAPES[0]);
    const { c, K } = l;
    const W = (c.Hq + 2 * c.Hkv) * c.D;
    const { kc, vc } = caches(c, 'cuda', 'f16');
    const idx = ropeIndex(c, 'cuda');
    const x = Tensor.empty([c.T, K], { dtype: 'f16', device: 'cuda' });
    expect(errorCode(() => linearRopeAppend(Tensor.empty([c.T, c.Hq, c.D], { dtype: 'f16', device: 'cuda' }), kc, vc, x,
      Tensor.empty([W, K], { dtype: 'bf16', device: 'cuda' }), idx))).toBe('ERR_DTYPE');
    const big = makeCase(rng(5), { Hq: 4, Hkv: 2, D: 64, pageSize: 16, ns: [3] });
    const bc = caches(big, 'cuda', 'f16');
    expect(errorCode(() => linearRopeAppend(Tensor.empty([3, 4, 64], { dtype: 'f16', device: 'cuda' }), bc.kc, bc.vc,
      Tensor.empty([3, K], { dtype: 'f16', device: 'cuda' }), Tensor.empty([W, K], { dtype: 'f16', device: 'cuda' }),
      ropeIndex(big, 'cuda')))).toBe('ERR_UNSUPPORTED');
  });
});

// lutRopeAppend: the quantized q|k|v projection (rows stored paired at D/2) feeding ropeAppend.
// (K = 168: a tail past the last 32; K % 8 != 0 would leave x unaligned, the GEMV then takes at most 16 rows)
const LUT_SHAPES = [
  { Hq: 4, Hkv: 2, D: 64, pageSize: 16, ns: [3, 1, 17], extraRows: 2, badPage: true, K: 168, bits: 4 as const },
  { Hq: 32, Hkv: 8, D: 128, pageSize: 16, ns: [1, 1], K: 256, bits: 3 as const },
  { Hq: 6, Hkv: 2, D: 80, pageSize: 16, ns: [2], K: 96, bits: 4 as const },
  { Hq: 3, Hkv: 1, D: 32, pageSize: 7, ns: [41], K: 64, bits: 3 as const, badPage: true },
];

/** A random dense-and-sparse q|k|v linear of a case (about 2% outliers). */
function randomQkv(r: () => number, c: Case, K: number, bits: 3 | 4): SqueezeLinear {
  const N = (c.Hq + 2 * c.Hkv) * c.D, E = 1 << bits;
  const codes = Uint8Array.from({ length: N * K }, () => Math.floor(r() * E));
  const rows = new Int32Array(N + 1), cols: number[] = [], vals: number[] = [];
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) if (r() < 0.02) { cols.push(k); vals.push((r() - 0.5) * 4); }
    rows[n + 1] = cols.length;
  }
  return { N, K, bits, qweight: packCodes(codes, N, K, bits), lut: randn(N * E, r, 0.3), rows, cols: Int32Array.from(cols), vals: Float32Array.from(vals) };
}

async function runLut(c: Case, m: SqueezeLinearModule, xs: Float32Array, device: string, dtype: DType, composed: boolean): Promise<Result> {
  const W = (c.Hq + 2 * c.Hkv) * c.D;
  const { pos, f, pt, sl, cq } = indexTensors(c, device);
  const { kc, vc } = caches(c, device, dtype);
  const x = Tensor.from(xs, [c.T, m.K], { dtype, device });
  const qOut = Tensor.from(new Float32Array(c.T * c.Hq * c.D).fill(NaN), [c.T, c.Hq, c.D], { dtype, device });
  if (composed) {
    const qkv = Tensor.from(new Float32Array(c.T * W).fill(NaN), [c.T, W], { dtype, device });
    m.forward(qkv, x);
    ropeAppend(qOut, kc, vc, qkv, pos, f, pt, sl, cq);
  } else {
    m.ropeAppend!(qOut, kc, vc, x, { positions: pos, invFreq: f, pageTable: pt, seqLens: sl, cuQ: cq });
  }
  return { q: await qOut.toFloat32(), kc: await kc.toFloat32(), vc: await vc.toFloat32() };
}

describe('lutRopeAppend (CPU)', () => {
  for (const dtype of ['f32', 'f16'] as DType[])
    test(`equals the paired module's forward + ropeAppend bit for bit (${dtype})`, async () => {
      const seed = freshSeed();
      const r = rng(seed);
      for (const s of LUT_SHAPES.slice(0, 3)) {
        const c = makeCase(r, s), lin = randomQkv(r, c, s.K, s.bits), xs = randn(c.T * s.K, r);
        const m = uploadSqueezeLinear(lin, 'cpu', 'f32', { pairHalf: c.D / 2 });
        const a = await runLut(c, m, xs, 'cpu', dtype, false), b = await runLut(c, m, xs, 'cpu', dtype, true);
        m.dispose();
        if (!same(a.q, b.q) || !same(a.kc, b.kc) || !same(a.vc, b.vc))
          throw new Error(`seed ${seed} shape ${JSON.stringify(s)}: fused and composed differ`);
        expect(a.q.every(Number.isFinite)).toBe(true);
      }
    });

  test('coded errors: rows not paired at D/2, a weight of other rows', () => {
    const r = rng(8);
    const c = makeCase(r, LUT_SHAPES[0]), lin = randomQkv(r, c, 64, 4);
    const idx = ropeIndex(c, 'cpu');
    const x = Tensor.empty([c.T, 64]), q = () => Tensor.empty([c.T, c.Hq, c.D]);
    const { kc, vc } = caches(c, 'cpu', 'f32');
    const at16 = uploadSqueezeLinear(lin, 'cpu', 'f32', { pairHalf: 16 });
    expect(errorCode(() => at16.ropeAppend!(q(), kc, vc, x, idx))).toBe('ERR_ARG');
    const fewer = uploadSqueezeLinear({ ...lin, N: lin.N - 64, qweight: lin.qweight.slice(0, (lin.N - 64) * 8), lut: lin.lut.slice(0, (lin.N - 64) * 16),
      rows: undefined, cols: undefined, vals: undefined }, 'cpu', 'f32', { pairHalf: 32 });
    // (qweight rows are [K/32 * bits, N]: slicing the flat array is not a valid weight, but shapes are what is checked)
    expect(errorCode(() => fewer.ropeAppend!(q(), kc, vc, x, idx))).toBe('ERR_SHAPE');
    const ok = uploadSqueezeLinear(lin, 'cpu', 'f32', { pairHalf: 32 });
    expect(errorCode(() => ok.ropeAppend!(q(), kc, vc, x, undefined as unknown as typeof idx))).toBe('ERR_ARG');
    expect(errorCode(() => ok.ropeAppend!(q(), kc, vc, x, idx))).toBe('none');
    [at16, fewer, ok].forEach((m) => m.dispose());
  });
});

describeGpu('lutRopeAppend (CUDA)', () => {
  for (const dtype of ['f16', 'bf16'] as DType[])
    test(`equals the CUDA forward + ropeAppend bit for bit and the CPU reference (${dtype})`, async () => {
      const seed = freshSeed();
      const r = rng(seed);
      for (const s of LUT_SHAPES) {
        const c = makeCase(r, s), lin = randomQkv(r, c, s.K, s.bits), xs = randn(c.T * s.K, r);
        const mc = uploadSqueezeLinear(lin, 'cuda', dtype, { pairHalf: c.D / 2 });
        const mh = uploadSqueezeLinear(lin, 'cpu', 'f32', { pairHalf: c.D / 2 });
        const g = await runLut(c, mc, xs, 'cuda', dtype, false);
        const b = await runLut(c, mc, xs, 'cuda', dtype, true);
        expectFusedOnCuda(`seed ${seed} shape ${JSON.stringify(s)}`, dtype, g, b, await runLut(c, mh, xs, 'cpu', dtype, false));
        expect(g.q.every(Number.isFinite)).toBe(true);
        mc.dispose();
        mh.dispose();
      }
    });

  test('coded errors: more than 64 rows, mixed dtypes', () => {
    const r = rng(9);
    const c = makeCase(r, { Hq: 4, Hkv: 2, D: 64, pageSize: 16, ns: [65] }), lin = randomQkv(r, c, 64, 4);
    const m = uploadSqueezeLinear(lin, 'cuda', 'f16', { pairHalf: 32 });
    const idx = ropeIndex(c, 'cuda');
    const { kc, vc } = caches(c, 'cuda', 'f16');
    const q = Tensor.empty([c.T, c.Hq, c.D], { dtype: 'f16', device: 'cuda' });
    expect(errorCode(() => m.ropeAppend!(q, kc, vc, Tensor.empty([c.T, 64], { dtype: 'f16', device: 'cuda' }), idx))).toBe('ERR_UNSUPPORTED');
    const b = caches(c, 'cuda', 'bf16');
    expect(errorCode(() => m.ropeAppend!(q, b.kc, b.vc, Tensor.empty([c.T, 64], { dtype: 'f16', device: 'cuda' }), idx))).toBe('ERR_DTYPE');
    m.dispose();
  });
});
