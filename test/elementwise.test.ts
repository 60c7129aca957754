import { Tensor, DType } from '../ts/tensor';
import { isSqueezeError } from '../ts/errors';
import * as ops from '../ts/ops/elementwise';
import { describeGpu, freshSeed, randn, relErr, rng } from './gpu';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

const FLOATS: DType[] = ['f32', 'f16', 'bf16'];

function t(data: ArrayLike<number>, shape: number[], dtype: DType = 'f32', device = 'cpu'): Tensor {
  if (dtype === 'i32') return Tensor.from(Int32Array.from(data), shape, { dtype, device });
  if (dtype === 'u32') return Tensor.from(Uint32Array.from(data), shape, { dtype, device });
  return Tensor.from(Float32Array.from(data), shape, { dtype, device });
}

/** An output tensor filled with NaN (floats) or garbage (ints) so unwritten elements show. */
function poisoned(shape: number[], dtype: DType, device = 'cpu'): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  if (dtype === 'i32') return Tensor.from(new Int32Array(n).fill(-12345), shape, { device });
  return Tensor.from(new Float32Array(n).fill(NaN), shape, { dtype, device });
}

/** The values a float array rounds to in a dtype (what the op's inputs really are). */
async function roundTo(a: Float32Array, dtype: DType): Promise<Float32Array> {
  return t(a, [a.length], dtype).toFloat32();
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

function rmsOracle(x: ArrayLike<number>, w: ArrayLike<number>, h: number, eps: number): Float64Array {
  const out = new Float64Array(x.length);
  for (let r = 0; r < x.length / h; r++) {
    let ss = 0;
    for (let j = 0; j < h; j++) ss += x[r * h + j] ** 2;
    const inv = 1 / Math.sqrt(ss / h + eps);
    for (let j = 0; j < h; j++) out[r * h + j] = x[r * h + j] * inv * w[j];
  }
  return out;
}

function ropeOracle(x: ArrayLike<number>, pos: number[], invFreq: Float32Array, heads: number, d: number): Float64Array {
  const out = Float64Array.from(x);
  const half = d / 2;
  pos.forEach((p, ti) => {
    for (let h = 0; h < heads; h++)
      for (let i = 0; i < half; i++) {
        const a = Math.fround(Math.fround(p) * invFreq[i]); // fp32 angle, as transformers
        const c = Math.cos(a), s = Math.sin(a);
        const o = (ti * heads + h) * d;
        const x1 = x[o + i], x2 = x[o + i + half];
        out[o + i] = x1 * c - x2 * s;
        out[o + i + half] = x2 * c + x1 * s;
      }
  });
  return out;
}

function invFreqFor(d: number, theta = 10000): Float32Array {
  const f = new Float32Array(d / 2);
  for (let i = 0; i < d / 2; i++) f[i] = 1 / Math.pow(theta, (2 * i) / d);
  return f;
}

function distinctLogits(b: number, v: number, r: () => number, scale = 3): Float32Array {
  // A random permutation of distinct values per row, so every order is strict.
  const out = new Float32Array(b * v);
  for (let row = 0; row < b; row++) {
    const perm = Array.from({ length: v }, (_, i) => i);
    for (let i = v - 1; i > 0; i--) {
      const j = Math.floor(r() * (i + 1));
      [perm[i], perm[j]] = [perm[j], perm[i]];
    }
    for (let i = 0; i < v; i++) out[row * v + i] = ((perm[i] / v) * 2 - 1) * scale + (r() - 0.5) * 1e-4;
  }
  return out;
}

async function sampleCpu(logits: Float32Array, b: number, v: number, temp: number[], k: number[], p: number[], seeds: number[][], dtype: DType = 'f32', device = 'cpu') {
  const out = poisoned([b], 'i32', device);
  const rngT = t(seeds.flat(), [b, 2], 'u32', device);
  ops.sample(out, t(logits, [b, v], dtype, device), t(temp, [b], 'f32', device), t(k, [b], 'i32', device), t(p, [b], 'f32', device), rngT);
  return { tokens: Array.from(await out.toArray()), rng: Array.from(await rngT.toArray()) };
}

describe('elementwise ops on CPU', () => {
  const seed = freshSeed();
  const r = rng(seed);

  test(`rmsNorm matches the fp64 oracle: f32, f16, bf16, f32 over f16 weights (seed ${seed})`, async () => {
    const T = 3, H = 257, eps = 1e-5;
    for (const [xd, wd] of [['f32', 'f32'], ['f16', 'f16'], ['bf16', 'bf16'], ['f32', 'f16']] as [DType, DType][]) {
      const x = await roundTo(randn(T * H, r, 2), xd), w = await roundTo(randn(H, r), wd);
      const out = poisoned([T, H], xd);
      ops.rmsNorm(out, t(x, [T, H], xd), t(w, [H], wd), eps);
      const got = await out.toFloat32();
      const tol = xd === 'f32' ? 1e-5 : xd === 'f16' ? 2e-3 : 1e-2;
      expect(relErr(got, rmsOracle(x, w, H, eps))).toBeLessThan(tol);
    }
  });

  test('addRmsNorm updates the residual and normalises it', async () => {
    const T = 5, H = 96, eps = 1e-6;
    for (const dt of ['f32', 'f16'] as DType[]) {
      const res = await roundTo(randn(T * H, r), dt), x = await roundTo(randn(T * H, r), dt), w = randn(H, r);
      const resT = t(res, [T, H], dt), out = poisoned([T, H], dt);
      ops.addRmsNorm(resT, t(x, [T, H], dt), out, t(w, [H], 'f32'), eps);
      const sum = await roundTo(res.map((v, i) => v + x[i]), dt);
      expect(maxAbsDiff(await resT.toFloat32(), sum)).toBe(0);
      expect(relErr(await out.toFloat32(), rmsOracle(sum, w, H, eps))).toBeLessThan(dt === 'f32' ? 1e-5 : 2e-3);
    }
  });

  test('rope matches the oracle at small and large positions', async () => {
    const heads = 3, D = 80, pos = [0, 1, 7, 4095, 100000, 999999];
    const T = pos.length, f = invFreqFor(D, 500000);
    const x = randn(T * heads * D, r);
    const xt = t(x, [T, heads, D]);
    ops.rope(xt, t(pos, [T], 'i32'), t(f, [D / 2]));
    const got = await xt.toFloat32();
    expect(maxAbsDiff(got, ropeOracle(x, pos, f, heads, D))).toBeLessThan(2e-5);
    // position 0 is the identity
    expect(maxAbsDiff(got.subarray(0, heads * D), x.subarray(0, heads * D))).toBe(0);
  });

  test('siluMul, add and cast', async () => {
    const T = 3, I = 37;
    const gu = randn(T * 2 * I, r, 3);
    const out = poisoned([T, I], 'f32');
    ops.siluMul(out, t(gu, [T, 2 * I]));
    const want = new Float64Array(T * I);
    for (let i = 0; i < T; i++)
      for (let j = 0; j < I; j++) {
        const g = gu[i * 2 * I + j];
        want[i * I + j] = (g / (1 + Math.exp(-g))) * gu[i * 2 * I + I + j];
      }
    expect(relErr(await out.toFloat32(), want)).toBeLessThan(1e-6);

    const a = randn(101, r), b = randn(101, r);
    const s = poisoned([101], 'f16');
    ops.add(s, t(a, [101]), t(b, [101], 'bf16'));
    const bb = await roundTo(b, 'bf16');
    expect(maxAbsDiff(await s.toFloat32(), await roundTo(a.map((v, i) => v + bb[i]), 'f16'))).toBe(0);

    // b as one row added to every row (a bias), in place
    const R = 5, C = 19, x = randn(R * C, r), bias = randn(C, r);
    const y = t(x, [R, C]);
    ops.add(y, y, t(bias, [C]));
    expect(maxAbsDiff(await y.toFloat32(), x.map((v, i) => v + bias[i % C]))).toBeLessThan(1e-6);
    for (const bad of [[C + 1], [R]])
      expect(() => ops.add(poisoned([R, C], 'f32'), t(x, [R, C]), poisoned(bad, 'f32'))).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));

    for (const from of FLOATS)
      for (const to of FLOATS) {
        const src = await roundTo(randn(33, r, 100), from);
        const o = poisoned([33], to);
        ops.cast(o, t(src, [33], from));
        expect(maxAbsDiff(await o.toFloat32(), await roundTo(src, to))).toBe(0);
      }
  });

  test('embedding and gatherRows give zero rows for ids out of range', async () => {
    const V = 11, H = 7;
    const table = randn(V * H, r);
    const ids = [3, -1, 10, 11, 0, 3];
    const out = poisoned([ids.length, H], 'f16');
    ops.embedding(out, t(ids, [ids.length], 'i32'), t(table, [V, H]));
    const got = await out.toFloat32();
    const tab16 = await roundTo(table, 'f16');
    ids.forEach((id, i) => {
      for (let j = 0; j < H; j++) expect(got[i * H + j]).toBe(id >= 0 && id < V ? tab16[id * H + j] : 0);
    });
    const g = poisoned([3, H], 'f32');
    ops.gatherRows(g, t(table, [V, H]), t([10, 2, 99], [3], 'i32'));
    const gg = await g.toFloat32();
    expect(Array.from(gg.subarray(0, H))).toEqual(Array.from(table.subarray(10 * H, 11 * H)));
    expect(Array.from(gg.subarray(2 * H))).toEqual(new Array(H).fill(0));
  });

  test('fill, fillRandom and fillRandomInt', async () => {
    const f = poisoned([5, 3], 'bf16');
    ops.fill(f, 1.5);
    expect(Array.from(await f.toFloat32())).toEqual(new Array(15).fill(1.5));
    const i = Tensor.empty([9], { dtype: 'i8' });
    ops.fill(i, -7);
    expect(Array.from(await i.toArray())).toEqual(new Array(9).fill(-7));

    const n = 20001;
    const a = poisoned([n], 'f32'), b = poisoned([n], 'f32');
    ops.fillRandom(a, 1234, 2, 3);
    ops.fillRandom(b, 1234, 2, 3);
    const av = await a.toFloat32();
    expect(Array.from(await b.toFloat32())).toEqual(Array.from(av));
    let mean = 0, sq = 0;
    for (const v of av) mean += v / n;
    for (const v of av) sq += (v - mean) ** 2 / n;
    expect(Math.abs(mean - 2)).toBeLessThan(0.1);
    expect(Math.abs(Math.sqrt(sq) - 3)).toBeLessThan(0.1);

    const u = Tensor.empty([4096], { dtype: 'u8' });
    ops.fillRandomInt(u, 7);
    const uv = await u.toArray();
    const hist = new Array(2).fill(0);
    for (const v of uv) hist[v >> 7]++;
    expect(Math.abs(hist[0] - 2048)).toBeLessThan(200);
  });

  test('argmax: ties go to the lowest index', async () => {
    const logits = [1, 5, 5, 2, /**/ -3, -1, -1, -2, /**/ 0, 0, 0, 0];
    const out = poisoned([3], 'i32');
    for (const dt of FLOATS) {
      ops.argmax(out, t(logits, [3, 4], dt));
      expect(Array.from(await out.toArray())).toEqual([1, 1, 0]);
    }
  });

  test('sample: greedy cases, reproducibility, counters and distribution', async () => {
    const B = 4, V = 1000;
    const logits = distinctLogits(B, V, r);
    const am = poisoned([B], 'i32');
    ops.argmax(am, t(logits, [B, V]));
    const greedy = Array.from(await am.toArray());
    const seeds = [[1, 0], [2, 5], [3, 9], [4, 4294967295]];
    // temperature 0, topK 1, tiny topP: all pick the argmax
    for (const [temp, k, p] of [[0, 0, 1], [1, 1, 1], [0.8, 0, 0.0001]]) {
      const s = await sampleCpu(logits, B, V, new Array(B).fill(temp), new Array(B).fill(k), new Array(B).fill(p), seeds);
      expect(s.tokens).toEqual(greedy);
      expect(s.rng).toEqual([1, 1, 2, 6, 3, 10, 4, 0]);
    }
    const one = await sampleCpu(logits, B, V, [1, 1, 1, 1], [0, 50, 0, 7], [1, 0.9, 0.5, 1], seeds);
    const two = await sampleCpu(logits, B, V, [1, 1, 1, 1], [0, 50, 0, 7], [1, 0.9, 0.5, 1], seeds);
    expect(two.tokens).toEqual(one.tokens);

    // Frequencies follow softmax(logits / T) within topK.
    const N = 4000, v = 4, probs = [0.1, 0.2, 0.3, 0.4];
    const lg = new Float32Array(N * v);
    for (let i = 0; i < N; i++) probs.forEach((q, j) => (lg[i * v + j] = Math.log(q)));
    const sd = Array.from({ length: N }, (_, i) => [i * 7 + 1, 3]);
    const all = await sampleCpu(lg, N, v, new Array(N).fill(1), new Array(N).fill(0), new Array(N).fill(1), sd);
    const cnt = [0, 0, 0, 0];
    all.tokens.forEach((x) => cnt[x]++);
    probs.forEach((q, j) => expect(Math.abs(cnt[j] / N - q)).toBeLessThan(0.035));
    const top2 = await sampleCpu(lg, N, v, new Array(N).fill(1), new Array(N).fill(2), new Array(N).fill(1), sd);
    const c2 = [0, 0, 0, 0];
    top2.tokens.forEach((x) => c2[x]++);
    expect(c2[0] + c2[1]).toBe(0);
    expect(Math.abs(c2[3] / N - 4 / 7)).toBeLessThan(0.035);
    // topP 0.5 keeps {0.4, 0.3} (0.4 alone is < 0.5)
    const tp = await sampleCpu(lg, N, v, new Array(N).fill(1), new Array(N).fill(0), new Array(N).fill(0.5), sd);
    expect(tp.tokens.every((x) => x === 2 || x === 3)).toBe(true);
  });

  test('errors name the op and argument', () => {
    const x = t([1, 2, 3, 4], [1, 4]);
    const expectErr = (fn: () => void, code: string, text: string) => {
      let err: unknown;
      try {
        fn();
      } catch (e) {
        err = e;
      }
      expect(isSqueezeError(err, code)).toBe(true);
      expect((err as Error).message).toContain(text);
    };
    expectErr(() => ops.rmsNorm(poisoned([1, 4], 'f32'), x, t([1, 1, 1], [3]), 1e-5), 'ERR_SHAPE', 'weight');
    expectErr(() => ops.rope(t(new Array(8).fill(0), [1, 1, 8]), t([0], [1], 'i32'), t([1, 1, 1, 1], [4], 'f16')), 'ERR_DTYPE', 'invFreq');
    expectErr(() => ops.fill(Tensor.empty([2], { dtype: 'i32' }), 1.5), 'ERR_ARG', 'fill');
    expectErr(() => ops.argmax(poisoned([2], 'i32'), x), 'ERR_SHAPE', 'out');
    expectErr(() => ops.siluMul(poisoned([1, 3], 'f32'), x), 'ERR_SHAPE', 'siluMul');
    expectErr(() => ops.fillRandomInt(t([1], [1]), 3), 'ERR_DTYPE', 't');
  });
});

describeGpu('elementwise ops: CUDA vs CPU', () => {
  const seed = freshSeed();
  const r = rng(seed);
  const TOL: Record<string, number> = { f32: 1e-6, f16: 1e-3, bf16: 8e-3 };

  /** Runs `op` with the same inputs on CPU and CUDA; returns both outputs as floats. */
  async function both(make: (dev: string) => Tensor[], run: (ts: Tensor[]) => void, pick: number[]) {
    const c = make('cpu'), g = make('cuda');
    run(c);
    run(g);
    const res: Array<[Float32Array, Float32Array]> = [];
    for (const i of pick) res.push([await c[i].toFloat32(), await g[i].toFloat32()]);
    return res;
  }

  for (const dt of ['f16', 'bf16', 'f32'] as DType[]) {
    test(`norms, rope, siluMul, add, cast, gathers in ${dt} (seed ${seed})`, async () => {
      const T = 5, H = 257, eps = 1e-5;
      for (const h of [H, 4096]) {
        const x = randn(T * h, r, 3), w = randn(h, r), res = randn(T * h, r);
        const [[c, g]] = await both((d) => [poisoned([T, h], dt, d), t(x, [T, h], dt, d), t(w, [h], dt, d)], ([o, a, b]) => ops.rmsNorm(o, a, b, eps), [0]);
        expect(relErr(g, c)).toBeLessThan(TOL[dt]);
        const out2 = await both(
          (d) => [t(res, [T, h], dt, d), t(x, [T, h], dt, d), poisoned([T, h], dt, d), t(w, [h], dt, d)],
          ([a, b, o, ww]) => ops.addRmsNorm(a, b, o, ww, eps), [0, 2]);
        expect(maxAbsDiff(out2[0][1], out2[0][0])).toBe(0); // the residual add rounds once
        expect(relErr(out2[1][1], out2[1][0])).toBeLessThan(TOL[dt]);
      }
      const heads = 3, D = 80, pos = [0, 3, 17, 100000, 999999];
      const xr = randn(pos.length * heads * D, r), f = invFreqFor(D);
      const [[rc, rg]] = await both((d) => [t(xr, [pos.length, heads, D], dt, d), t(pos, [pos.length], 'i32', d), t(f, [D / 2], 'f32', d)], ([a, p, ff]) => ops.rope(a, p, ff), [0]);
      expect(relErr(rg, rc)).toBeLessThan(TOL[dt] + 1e-5);

      for (const I of [37, 1024]) {
        const gu = randn(T * 2 * I, r, 3);
        const [[sc, sg]] = await both((d) => [poisoned([T, I], dt, d), t(gu, [T, 2 * I], dt, d)], ([o, a]) => ops.siluMul(o, a), [0]);
        expect(relErr(sg, sc)).toBeLessThan(TOL[dt]);
      }
      for (const n of [1, 1001, 65536 + 3]) {
        const a = randn(n, r), b = randn(n, r);
        const [[ac, ag]] = await both((d) => [poisoned([n], dt, d), t(a, [n], dt, d), t(b, [n], dt, d)], ([o, x1, x2]) => ops.add(o, x1, x2), [0]);
        expect(maxAbsDiff(ag, ac)).toBe(0);
        for (const to of FLOATS) {
          const [[cc, cg]] = await both((d) => [poisoned([n], to, d), t(a, [n], dt, d)], ([o, x1]) => ops.cast(o, x1), [0]);
          expect(maxAbsDiff(cg, cc)).toBe(0);
        }
      }
      // b one row added to every row (a bias): odd widths take the scalar loop, multiples of 8 the vectors
      for (const [rows, h] of [[5, 1], [143, 7], [64, 16], [9, 4096], [3, 1001]]) {
        const a = randn(rows * h, r), b = randn(h, r);
        const [[bc, bg]] = await both((d) => [poisoned([rows, h], dt, d), t(a, [rows, h], dt, d), t(b, [h], dt, d)],
          ([o, x1, x2]) => ops.add(o, x1, x2), [0]);
        expect(maxAbsDiff(bg, bc)).toBe(0);
      }
      const V = 50001, EH = 72;
      const table = randn(V * EH, r);
      const ids = [0, 50000, -5, 50001, 1234, 7];
      const [[ec, eg]] = await both((d) => [poisoned([ids.length, EH], dt, d), t(ids, [ids.length], 'i32', d), t(table, [V, EH], dt, d)], ([o, i, tb]) => ops.embedding(o, i, tb), [0]);
      expect(maxAbsDiff(eg, ec)).toBe(0);
      const odd = randn(7 * 13, r);
      const [[gc, gg]] = await both((d) => [poisoned([4, 13], dt, d), t(odd, [7, 13], dt, d), t([6, 0, 7, 3], [4], 'i32', d)], ([o, x1, i]) => ops.gatherRows(o, x1, i), [0]);
      expect(maxAbsDiff(gg, gc)).toBe(0);
    });
  }

  test('fill, fillRandom and fillRandomInt match the CPU', async () => {
    for (const dt of FLOATS) {
      const [[c, g]] = await both((d) => [poisoned([1001], dt, d)], ([a]) => ops.fillRandom(a, 99, 0.5, 2), [0]);
      expect(maxAbsDiff(g, c)).toBeLessThan(dt === 'f32' ? 1e-5 : dt === 'f16' ? 1e-2 : 5e-2);
      expect(relErr(g, c)).toBeLessThan(1e-3);
      const [[fc, fg]] = await both((d) => [poisoned([77], dt, d)], ([a]) => ops.fill(a, -2.25), [0]);
      expect(Array.from(fg)).toEqual(Array.from(fc));
    }
    for (const dt of ['i32', 'u32', 'i8', 'u8'] as DType[]) {
      const c = Tensor.empty([1001], { dtype: dt }), g = Tensor.empty([1001], { dtype: dt, device: 'cuda' });
      ops.fillRandomInt(c, 5);
      ops.fillRandomInt(g, 5);
      expect(Array.from(await g.toArray())).toEqual(Array.from(await c.toArray()));
    }
  });

  test('argmax and sample pick the same tokens as the CPU', async () => {
    const B = 8, V = 50001;
    for (const dt of FLOATS) {
      const logits = distinctLogits(B, V, r, dt === 'f32' ? 8 : 4); // f16/bf16 rounding makes ties
      const ac = poisoned([B], 'i32'), ag = poisoned([B], 'i32', 'cuda');
      ops.argmax(ac, t(logits, [B, V], dt));
      ops.argmax(ag, t(logits, [B, V], dt, 'cuda'));
      expect(Array.from(await ag.toArray())).toEqual(Array.from(await ac.toArray()));
      const temp = [0, 1, 0.7, 1.3, 1, 1, 2, 0.5];
      const k = [0, 0, 50, 0, 1, 1000, 40, 0];
      const p = [1, 1, 1, 0.9, 1, 0.95, 0.8, 0.0001];
      let seeds = Array.from({ length: B }, (_, i) => [(r() * 2 ** 32) >>> 0, i === 3 ? 4294967295 : i]);
      for (let step = 0; step < 4; step++) {
        const c = await sampleCpu(logits, B, V, temp, k, p, seeds, dt);
        const g = await sampleCpu(logits, B, V, temp, k, p, seeds, dt, 'cuda');
        expect(g.tokens).toEqual(c.tokens);
        expect(g.rng).toEqual(c.rng);
        seeds = Array.from({ length: B }, (_, i) => [c.rng[2 * i], c.rng[2 * i + 1]]);
      }
    }
  });
});
