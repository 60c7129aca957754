import { Tensor } from '../ts/tensor';
import { isSqueezeError } from '../ts/errors';
import {
  lutMatmul, lutMatmulPacked, lutRepack, lutPackedShape, kmeansRows, checkOutlierCsr, sortOutlierRows, lutPairRow, lutPairable,
} from '../ts/ops/lut';
import {
  SqueezeLinear, packCodes, unpackCodes, dequantize, quantizeLinear, rtnQuantize, weightedError,
  squeezeTensors, squeezeMetadata, loadSqueezeLinear, uploadSqueezeLinear, pairSqueezeRows,
} from '../ts/quant/squeezellm';
import { SafetensorsFile, writeSafetensors } from '../ts/model/safetensors';
import { add, rmsNorm } from '../ts/ops/elementwise';
import { describeGpu, relErr, rng, randn, freshSeed, maxAbsErr } from './gpu';
import { emptyCache, memoryStats, synchronize } from '../ts/device';
import { bf16BitsToFloat32, f16BitsToFloat32, float32ToBf16Bits, float32ToF16Bits } from '../ts/util/half';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { spawnSync } from 'child_process';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

/** A random dense-and-sparse linear (outliers ~2% when asked). */
function randomLinear(N: number, K: number, bits: 3 | 4, outliers: boolean, r: () => number): SqueezeLinear {
  const E = 1 << bits;
  const codes = new Uint8Array(N * K);
  for (let i = 0; i < codes.length; i++) codes[i] = Math.floor(r() * E);
  const lut = randn(N * E, r, 0.5);
  const l: SqueezeLinear = { N, K, bits, qweight: packCodes(codes, N, K, bits), lut };
  if (outliers) {
    const rows = new Int32Array(N + 1), cols: number[] = [], vals: number[] = [];
    for (let n = 0; n < N; n++) {
      for (let k = 0; k < K; k++) if (r() < 0.02) { cols.push(k); vals.push((r() - 0.5) * 8); }
      rows[n + 1] = cols.length;
    }
    Object.assign(l, { rows, cols: Int32Array.from(cols), vals: Float32Array.from(vals) });
  }
  return l;
}

function denseRef(x: Float32Array, w: Float32Array, M: number, N: number, K: number): Float32Array {
  const y = new Float32Array(M * N);
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += x[m * K + k] * w[n * K + k];
      y[m * N + n] = s;
    }
  return y;
}

function tensorsOf(l: SqueezeLinear, device: string, fd: 'f16' | 'f32') {
  const f = (a: Float32Array) => Tensor.from(a, [a.length], { dtype: fd, device });
  return {
    q: Tensor.from(l.qweight, [Math.ceil(l.K / 32) * l.bits, l.N], { dtype: 'i32', device }),
    lut: Tensor.from(l.lut, [l.N, 1 << l.bits], { dtype: fd, device }),
    rows: l.rows ? Tensor.from(l.rows, [l.N + 1], { dtype: 'i32', device }) : null,
    cols: l.cols ? Tensor.from(l.cols, [l.cols.length], { dtype: 'i32', device }) : null,
    vals: l.vals ? f(l.vals) : null,
  };
}

/**
 * For the coded-error tests: a random 32x64 4-bit linear (no outliers) packed on the CPU, x [2, 64],
 * and call(out, opts, xi = x), a thunk of lutMatmulPacked on them. `r` goes on from where they left it.
 */
function packedCallFixture(seed: number) {
  const r = rng(seed);
  const l = randomLinear(32, 64, 4, false, r);
  const t = tensorsOf(l, 'cpu', 'f32'), c = packedOf(l, 'cpu');
  const x = Tensor.from(randn(2 * 64, r), [2, 64]);
  const call = (out: Tensor, o: Parameters<typeof lutMatmulPacked>[8], xi: Tensor = x) => () =>
    lutMatmulPacked(out, xi, c, t.lut, null, null, null, 4, o);
  return { r, x, call, dispose: () => [x, c, t.q, t.lut].forEach((z) => z.dispose()) };
}

/** Code (n, k) of packed codes, read as csrc/cpu/lut_gemm.h specifies (independent of the C++). */
function packedCode(c: Int32Array, N: number, K: number, bits: number, n: number, k: number): number {
  const [, wpr] = lutPackedShape(N, K, bits);
  const KU = bits === 4 ? 128 : 512, WU = bits === 4 ? 4 : 12, U = (wpr * 32) / bits / KU;
  const tile = Math.floor(n / 16), r = n % 16, u = Math.floor(k / KU), kk = k % KU;
  const ch = Math.floor(kk / 32), q = Math.floor((kk % 32) / 8), j = kk % 8;
  const base = (tile * U + u) * 64 * WU;
  const w = (i: number) => c[base + ((i >> 2) * 64 + r * 4 + q) * 4 + (i & 3)] >>> 0;
  if (bits === 4) return (w(ch) >>> (4 * j)) & 15;
  // 3 bits: pair i = j >> 1 of chunk cc < 3 in the low 6 bits of byte i of word 3b + cc; of chunk 3,
  // spread over bits 6-7 of byte i of words 3b, 3b + 1, 3b + 2 (2 bits each, low bits first)
  const b = ch >> 2, cc = ch & 3, i = j >> 1;
  const pair = cc < 3 ? (w(3 * b + cc) >>> (8 * i)) & 0x3f
    : [0, 1, 2].reduce((a, s) => a | (((w(3 * b + s) >>> (8 * i + 6)) & 3) << (2 * s)), 0);
  return (pair >>> (3 * (j & 1))) & 7;
}

/** Packed codes of a linear on a device (repacked there). */
function packedOf(l: SqueezeLinear, device: string): Tensor {
  const q = Tensor.from(l.qweight, [Math.ceil(l.K / 32) * l.bits, l.N], { dtype: 'i32', device });
  const c = Tensor.from(new Int32Array(lutPackedShape(l.N, l.K, l.bits).reduce((a, b) => a * b)).fill(-1),
    lutPackedShape(l.N, l.K, l.bits), { dtype: 'i32', device });
  lutRepack(c, q, l.bits);
  q.dispose();
  return c;
}

describe('packing', () => {
  test.each([3, 4])('pack -> unpack round trip, %i bits, K with a tail', (bits) => {
    const r = rng(7 + bits);
    for (const [N, K] of [[5, 161], [3, 32], [2, 7], [4, 96]]) {
      const codes = new Uint8Array(N * K).map(() => Math.floor(r() * (1 << bits)));
      const q = packCodes(codes, N, K, bits);
      expect(q.length).toBe(Math.ceil(K / 32) * bits * N);
      expect(unpackCodes(q, N, K, bits)).toEqual(codes);
    }
  });
  test('3-bit straddles words like GPTQ (code 10 at bits 30..32)', () => {
    const codes = new Uint8Array(32);
    codes[10] = 7;
    const q = packCodes(codes, 1, 32, 3);
    expect(q[0] >>> 0).toBe(0xc0000000);
    expect(q[1]).toBe(1);
    expect(q[2]).toBe(0);
  });
  test('bad bits -> ERR_UNSUPPORTED', () => {
    expect(() => packCodes(new Uint8Array(32), 1, 32, 2)).toThrow(expect.objectContaining({ code: 'ERR_UNSUPPORTED' }));
  });
  test.each([3, 4])('lutRepack (CPU) puts every code where the packed layout says, %i bits; padding is 0', async (bits) => {
    const r = rng(17 + bits);
    for (const [N, K] of [[37, 161], [16, 1024], [5, 600], [1, 32]]) {
      const codes = new Uint8Array(N * K).map(() => Math.floor(r() * (1 << bits)));
      const l: SqueezeLinear = { N, K, bits: bits as 3 | 4, qweight: packCodes(codes, N, K, bits), lut: new Float32Array(N << bits) };
      const c = packedOf(l, 'cpu');
      const got = (await c.toArray()) as Int32Array;
      const [Np, wpr] = lutPackedShape(N, K, bits);
      expect(got.length).toBe(Np * wpr);
      const Kp = (wpr * 32) / bits;
      const bad: string[] = [];
      for (let n = 0; n < Np; n++)
        for (let k = 0; k < Kp; k++)
          if (packedCode(got, N, K, bits, n, k) !== (n < N && k < K ? codes[n * K + k] : 0) && bad.length < 5) bad.push(`(${n}, ${k})`);
      expect(bad).toEqual([]);
      c.dispose();
    }
  });
});

/** silu(z[m, j]) * z[m, j + N/2] of y [M, N] in f32 (the gated MLP's activation). */
function siluPairsRef(z: Float32Array, M: number, N: number): Float32Array {
  const H = N / 2, out = new Float32Array(M * H);
  for (let m = 0; m < M; m++)
    for (let j = 0; j < H; j++) {
      const a = z[m * N + j];
      out[m * H + j] = (a / (1 + Math.exp(-a))) * z[m * N + H + j];
    }
  return out;
}

describe('paired rows (stored order for fused epilogues)', () => {
  const seed = freshSeed();
  test('lutPairRow is a permutation that puts rows j and j + H of each 2H block in one tile, 8 rows apart', () => {
    for (const [N, H] of [[16, 8], [48, 8], [48, 24], [96, 16], [160, 80]]) {
      expect(lutPairable(N, H)).toBe(true);
      const seen = new Set<number>();
      for (let p = 0; p < N; p++) {
        const n = lutPairRow(p, H);
        seen.add(n);
        if (p % 16 < 8) {
          const partner = lutPairRow(p + 8, H);
          expect([p, partner - n, Math.floor(n / (2 * H)) === Math.floor(partner / (2 * H)), n % (2 * H) < H]).toEqual([p, H, true, true]);
        }
      }
      expect(seen.size).toBe(N);
      expect(Math.max(...seen)).toBe(N - 1);
    }
    expect(lutPairRow(37, 0)).toBe(37);
    for (const [N, H] of [[40, 20], [48, 16], [80, 0], [24, 12]]) expect(lutPairable(N, H)).toBe(false);
  });

  test(`pairSqueezeRows moves each row's codes, table and outliers together (seed ${seed})`, () => {
    const r = rng(seed + 1);
    const l = randomLinear(48, 70, 3, true, r), p = pairSqueezeRows(l, 8);
    const codes = unpackCodes(l.qweight, 48, 70, 3), pc = unpackCodes(p.qweight, 48, 70, 3);
    for (let s = 0; s < 48; s++) {
      const n = lutPairRow(s, 8);
      expect(pc.subarray(s * 70, s * 70 + 70)).toEqual(codes.subarray(n * 70, n * 70 + 70));
      expect(p.lut.subarray(s * 8, s * 8 + 8)).toEqual(l.lut.subarray(n * 8, n * 8 + 8));
      expect(p.cols!.subarray(p.rows![s], p.rows![s + 1])).toEqual(l.cols!.subarray(l.rows![n], l.rows![n + 1]));
      expect(p.vals!.subarray(p.rows![s], p.rows![s + 1])).toEqual(l.vals!.subarray(l.rows![n], l.rows![n + 1]));
    }
    expect(() => pairSqueezeRows(l, 16)).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
  });

  for (const dt of ['f32', 'f16'] as const)
    test(`CPU (${dt}): a module stored paired gives the unpaired module's outputs bit for bit, and siluPairs the siluMul of them (seed ${seed})`, async () => {
      const r = rng(seed + (dt === 'f16' ? 3 : 2));
      // [N, K, H]: gate|up (H = N/2) and RoPE-like halves (H = 8 of 16-row heads); K with a tail
      for (const [N, K, H, bits] of [[96, 161, 48, 4], [64, 300, 8, 3], [32, 40, 16, 3]] as const) {
        const l = randomLinear(N, K, bits, true, r);
        const plain = uploadSqueezeLinear(l, 'cpu', 'f32'), paired = uploadSqueezeLinear(l, 'cpu', 'f32', { pairHalf: H });
        expect([plain.pairHalf, paired.pairHalf, plain.siluPairs, !!paired.siluPairs]).toEqual([0, H, undefined, 2 * H === N]);
        for (const M of [1, 3, 20, 200]) {
          const x = Tensor.from(randn(M * K, r), [M, K], { dtype: dt });
          const y1 = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: dt });
          const y2 = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: dt });
          plain.forward(y1, x);
          paired.forward(y2, x);
          const z = await y1.toFloat32();
          expect(z.every(Number.isFinite)).toBe(true);
          expect(await y2.toFloat32()).toEqual(z);
          if (paired.siluPairs) {
            const act = Tensor.from(new Float32Array(M * H).fill(NaN), [M, H], { dtype: dt });
            paired.siluPairs(act, x);
            const got = await act.toFloat32(), want = siluPairsRef(z, M, N);
            expect([M, maxAbsErr(got, want) <= (dt === 'f16' ? 2e-3 : 1e-5) * Math.max(1, ...want.map(Math.abs))]).toEqual([M, true]);
            act.dispose();
          }
          [x, y1, y2].forEach((t) => t.dispose());
        }
        plain.dispose();
        paired.dispose();
      }
    });

  test('lutMatmulPacked: a half that does not pair the rows, siluPairs without pairing at N/2, a wrong y -> coded errors', () => {
    const { call, dispose } = packedCallFixture(5);
    const y = Tensor.empty([2, 32]), half = Tensor.empty([2, 16]);
    expect(call(y, { pairHalf: 12 })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    expect(call(y, { pairHalf: 32 })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    expect(call(half, { pairHalf: 8, epilogue: 'siluPairs' })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    expect(call(half, { epilogue: 'siluPairs' })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    expect(call(y, { pairHalf: 16, epilogue: 'siluPairs' })).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(call(y, { epilogue: 'gelu' as 'store' })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    expect(call(half, { pairHalf: 16, epilogue: 'siluPairs' })).not.toThrow();
    [y, half].forEach((z) => z.dispose());
    dispose();
  });
});

describe('the RMSNorm in front and the residual add behind a quantized linear (CPU)', () => {
  const seed = freshSeed();
  for (const dt of ['f32', 'f16'] as const)
    test(`${dt}: normWeight is rmsNorm then the product, residual is the product then add, bit for bit (seed ${seed})`, async () => {
      const r = rng(seed + (dt === 'f16' ? 1 : 0));
      for (const [N, K, bits, M] of [[40, 161, 3, 1], [33, 256, 4, 2], [16, 96, 4, 5]] as const) {
        const l = randomLinear(N, K, bits, true, r);
        const m = uploadSqueezeLinear(l, 'cpu', dt);
        const x = Tensor.from(randn(M * K, r, 3), [M, K], { dtype: dt });
        const g = Tensor.from(Float32Array.from({ length: K }, () => 0.5 + r()), [K], { dtype: dt });
        const h = Tensor.empty([M, K], { dtype: dt }), y = Tensor.empty([M, N], { dtype: dt }), want = Tensor.empty([M, N], { dtype: dt });
        m.forward(y, x, { normWeight: g, eps: 1e-5 });
        rmsNorm(h, x, g, 1e-5);
        m.forward(want, h);
        expect(await y.toArray()).toEqual(await want.toArray());
        const y0 = randn(M * N, r);
        const acc = Tensor.from(y0, [M, N], { dtype: dt }), sum = Tensor.from(y0, [M, N], { dtype: dt });
        m.forwardAdd(acc, x);
        m.forward(y, x);
        add(sum, sum, y);
        expect(await acc.toArray()).toEqual(await sum.toArray());
        [x, g, h, y, want, acc, sum].forEach((t) => t.dispose());
        m.dispose();
      }
    });

  test('coded errors: normWeight of the wrong length or dtype, a negative eps, a residual y that overlaps x', () => {
    const { r, x, call: callX, dispose } = packedCallFixture(7);
    const call = (out: Tensor, xi: Tensor, o: Parameters<typeof lutMatmulPacked>[8]) => callX(out, o, xi);
    const y = Tensor.empty([2, 32]);
    const g63 = Tensor.empty([63]), gi = Tensor.empty([64], { dtype: 'i32' }), g = Tensor.from(new Float32Array(64).fill(1), [64]);
    expect(call(y, x, { normWeight: g63 })).toThrow(expect.objectContaining({ code: 'ERR_SHAPE' }));
    expect(call(y, x, { normWeight: gi })).toThrow(expect.objectContaining({ code: 'ERR_DTYPE' }));
    expect(call(y, x, { normWeight: g, eps: -1 })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    // y [2, 32] inside a buffer that x [2, 64] also views
    const both = Tensor.from(randn(4 * 64, r), [4 * 64]);
    expect(call(both.view(0, [2, 32]), both.view(32, [2, 64]), { epilogue: 'residual' })).toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    expect(call(y, x, { normWeight: g, epilogue: 'residual' })).not.toThrow();
    [y, g63, gi, g, both].forEach((z) => z.dispose());
    dispose();
  });
});

describe('lutMatmul (CPU) vs dequantize-then-dense', () => {
  const seed = freshSeed();
  for (const bits of [3, 4] as const)
    for (const outl of [false, true])
      test(`${bits}-bit ${outl ? 'with' : 'without'} outliers (seed ${seed})`, async () => {
        const r = rng(seed + bits * 2 + (outl ? 1 : 0));
        // K: a tail inside a chunk of 8 (161, 1), whole units, several 3-bit units with a tail, 4096+32
        for (const [N, K] of [[37, 161], [19, 128], [7, 600], [3, 4128], [2, 1]]) {
          const l = randomLinear(N, K, bits, outl, r);
          const w = dequantize(l);
          const t = tensorsOf(l, 'cpu', 'f32');
          // M = 1: one fused row kernel; 2-15: each row dequantized once for every x row; 17, 64: the
          // weight dequantized once, then the CPU matmul (from M = 16; rows padded past K are cut)
          for (const M of [1, 2, 3, 15, 17, 64]) {
            const x = randn(M * K, r);
            const y = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N]);
            lutMatmul(y, Tensor.from(x, [M, K]), t.q, t.lut, t.rows, t.cols, t.vals, bits);
            const got = await y.toFloat32();
            expect(relErr(got, denseRef(x, w, M, N, K))).toBeLessThan(1e-5);
          }
        }
      });

  test(`f16 activations use the table in f16, outliers in f32 (seed ${seed})`, async () => {
    const r = rng(seed + 11);
    for (const bits of [3, 4] as const) {
      const N = 9, K = 300, l = randomLinear(N, K, bits, true, r);
      const l16 = { ...l, lut: f16BitsToFloat32(float32ToF16Bits(l.lut)) };
      const w = dequantize(l16), t = tensorsOf(l, 'cpu', 'f32');
      for (const M of [1, 4]) {
        const x = f16BitsToFloat32(float32ToF16Bits(randn(M * K, r)));
        const y = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: 'f16' });
        lutMatmul(y, Tensor.from(x, [M, K], { dtype: 'f16' }), t.q, t.lut, t.rows, t.cols, t.vals, bits);
        expect(relErr(await y.toFloat32(), denseRef(x, w, M, N, K))).toBeLessThan(2e-3);
      }
    }
  });

  // The CPU kernels come in a portable form and an AVX2 one, picked once per process; the
  // environment variable SQUEEZELM_CPU_PORTABLE=1 picks the portable one, so a second process
  // runs the same products with it (through the built library in dist/).
  test(`the portable row kernels give the same products (seed ${seed})`, () => {
    const dist = path.join(__dirname, '..', 'dist', 'ts');
    if (!fs.existsSync(path.join(dist, 'index.js'))) throw new Error('dist/ is missing: npm test builds it (npm run build:ts)');
    const r = rng(seed + 12);
    const cases = [];
    for (const bits of [3, 4] as const)
      for (const [N, K, M] of [[21, 161, 1], [5, 600, 3], [4, 4128, 1]]) {
        const l = randomLinear(N, K, bits, true, r), x = randn(M * K, r);
        cases.push({ l, x, M, want: denseRef(x, dequantize(l), M, N, K) });
      }
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-lut-portable-'));
    try {
      const input = path.join(dir, 'cases.json');
      const arr = (a: ArrayLike<number>) => Array.from(a);
      fs.writeFileSync(input, JSON.stringify(cases.map(({ l, x, M }) => ({
        N: l.N, K: l.K, bits: l.bits, M, qweight: arr(l.qweight), lut: arr(l.lut), rows: arr(l.rows!), cols: arr(l.cols!), vals: arr(l.vals!), x: arr(x),
      }))));
      const script = `
        const { Tensor, ops } = require(${JSON.stringify(dist)});
        const cases = JSON.parse(require('fs').readFileSync(${JSON.stringify(input)}, 'utf8'));
        (async () => {
          const out = [];
          for (const c of cases) {
            const t = (a, shape, dtype) => Tensor.from(dtype === 'i32' ? Int32Array.from(a) : Float32Array.from(a), shape, { dtype });
            const y = Tensor.from(new Float32Array(c.M * c.N).fill(NaN), [c.M, c.N]);
            ops.lutMatmul(y, t(c.x, [c.M, c.K], 'f32'), t(c.qweight, [Math.ceil(c.K / 32) * c.bits, c.N], 'i32'), t(c.lut, [c.N, 1 << c.bits], 'f32'),
              t(c.rows, [c.N + 1], 'i32'), t(c.cols, [c.cols.length], 'i32'), t(c.vals, [c.vals.length], 'f32'), c.bits);
            out.push(Array.from(await y.toFloat32()));
          }
          process.stdout.write(JSON.stringify(out));
        })().catch((e) => { console.error(e); process.exit(1); });`;
      const run = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, SQUEEZELM_CPU_PORTABLE: '1', SQUEEZELM_DEVICE: 'cpu' }, encoding: 'utf8' });
      if (run.status !== 0) throw new Error(`portable run failed: ${run.stderr}`);
      const got = JSON.parse(run.stdout) as number[][];
      expect(got.length).toBe(cases.length);
      cases.forEach((c, i) => expect(relErr(Float32Array.from(got[i]), c.want)).toBeLessThan(1e-5));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('lutMatmul validation', () => {
  const r = rng(3);
  const l = randomLinear(8, 64, 4, true, r);
  const t = tensorsOf(l, 'cpu', 'f32');
  const x = Tensor.from(randn(2 * 64, r), [2, 64]);
  const y = Tensor.empty([2, 8]);
  const code = (fn: () => void): string | undefined => {
    try { fn(); } catch (e) { return isSqueezeError(e) ? e.code : 'not-squeeze'; }
    return undefined;
  };
  test('bits', () => {
    expect(code(() => lutMatmul(y, x, t.q, t.lut, t.rows, t.cols, t.vals, 2))).toBe('ERR_UNSUPPORTED');
  });
  test('shapes name the tensor', () => {
    const badQ = Tensor.empty([3, 8], { dtype: 'i32' });
    expect(() => lutMatmul(y, x, badQ, t.lut, null, null, null, 4)).toThrow(/qweight/);
    expect(code(() => lutMatmul(y, x, badQ, t.lut, null, null, null, 4))).toBe('ERR_SHAPE');
    const badL = Tensor.empty([8, 8]);
    expect(() => lutMatmul(y, x, t.q, badL, null, null, null, 4)).toThrow(/lut/);
    expect(code(() => lutMatmul(y, x, t.q, t.lut, t.rows, null, null, 4))).toBe('ERR_ARG');
  });
  test('packed shapes name the tensor', () => {
    const q = Tensor.from(l.qweight, [2 * 4, 8], { dtype: 'i32' });
    const good = Tensor.empty(lutPackedShape(8, 64, 4), { dtype: 'i32' });
    expect(code(() => lutRepack(Tensor.empty([16, 3], { dtype: 'i32' }), q, 4))).toBe('ERR_SHAPE');
    expect(() => lutRepack(Tensor.empty([16, 3], { dtype: 'i32' }), q, 4)).toThrow(/dst/);
    expect(code(() => lutRepack(good, q, 3))).toBe('ERR_SHAPE');
    lutRepack(good, q, 4);
    expect(code(() => lutMatmulPacked(y, x, Tensor.empty([8, 16], { dtype: 'i32' }), t.lut, null, null, null, 4))).toBe('ERR_SHAPE');
    expect(() => lutMatmulPacked(y, x, Tensor.empty([8, 16], { dtype: 'i32' }), t.lut, null, null, null, 4)).toThrow(/codes/);
    expect(code(() => lutMatmulPacked(y, x, good, t.lut, null, null, null, 3))).toBe('ERR_SHAPE');
    expect(code(() => lutMatmulPacked(y, x, good, t.lut, t.rows, t.cols, null, 4))).toBe('ERR_ARG');
    expect(code(() => lutMatmulPacked(y, x, good, Tensor.empty([8, 8]), null, null, null, 4))).toBe('ERR_SHAPE');
  });
  test('prefetchNext: i32 2-D codes on x\'s device, else a coded error; on the CPU it changes nothing', async () => {
    const good = Tensor.empty(lutPackedShape(8, 64, 4), { dtype: 'i32' });
    const q = Tensor.from(l.qweight, [2 * 4, 8], { dtype: 'i32' });
    lutRepack(good, q, 4);
    const y0 = Tensor.empty([2, 8]), y1 = Tensor.empty([2, 8]);
    lutMatmulPacked(y0, x, good, t.lut, t.rows, t.cols, t.vals, 4);
    lutMatmulPacked(y1, x, good, t.lut, t.rows, t.cols, t.vals, 4, { prefetchNext: good });
    expect(Array.from(await y1.toFloat32())).toEqual(Array.from(await y0.toFloat32()));
    expect(code(() => lutMatmulPacked(y, x, good, t.lut, null, null, null, 4, { prefetchNext: Tensor.empty([8, 16]) }))).toBe('ERR_DTYPE');
    expect(() => lutMatmulPacked(y, x, good, t.lut, null, null, null, 4, { prefetchNext: Tensor.empty([8, 16]) })).toThrow(/nextCodes/);
    expect(code(() => lutMatmulPacked(y, x, good, t.lut, null, null, null, 4, { prefetchNext: Tensor.empty([128], { dtype: 'i32' }) }))).toBe('ERR_SHAPE');
    expect(code(() => lutMatmulPacked(y, x, good, t.lut, null, null, null, 4, { prefetchNext: {} as Tensor }))).toBe('ERR_ARG');
    [good, q, y0, y1].forEach((z) => z.dispose());
  });
  test('sortOutlierRows orders each row by column, values along', () => {
    const rows = Int32Array.from([0, 3, 3, 5]), cols = Int32Array.from([7, 1, 4, 2, 0]), vals = Float32Array.from([70, 10, 40, 20, 0]);
    expect(sortOutlierRows(rows, cols, vals)).toBe(true);
    expect(Array.from(cols)).toEqual([1, 4, 7, 0, 2]);
    expect(Array.from(vals)).toEqual([10, 40, 70, 0, 20]);
    expect(sortOutlierRows(rows, cols, vals)).toBe(false);
    checkOutlierCsr(rows, cols, 3, 8, 'w');
  });
  test('CSR content -> ERR_FORMAT', () => {
    const rows = Int32Array.from([0, 1, 2]), cols = Int32Array.from([0, 5]);
    expect(() => checkOutlierCsr(rows, cols, 2, 8, 'w')).not.toThrow();
    for (const [rr, cc] of [[[1, 1, 2], [0, 5]], [[0, 2, 1], [0, 5]], [[0, 1, 3], [0, 5]], [[0, 1, 2], [0, 8]], [[0, 1, 2], [-1, 0]],
      [[0, 2, 2], [5, 0]], [[0, 2, 2], [3, 3]]]) {
      let err: unknown;
      try { checkOutlierCsr(Int32Array.from(rr), Int32Array.from(cc), 2, 8, 'layer0.q'); } catch (e) { err = e; }
      expect(isSqueezeError(err, 'ERR_FORMAT')).toBe(true);
      expect(String((err as Error).message)).toMatch(/layer0\.q/);
    }
  });
});

describe('quantizer', () => {
  test('kmeans beats RTN on weighted error; codes/lut consistent', async () => {
    const r = rng(11);
    const N = 16, K = 512;
    const w = randn(N * K, r, 0.02);
    const sens = new Float32Array(K).map(() => 0.5 + r());
    for (const bits of [3, 4]) {
      const km = await quantizeLinear(w, N, K, { bits, sens, iters: 40 });
      const rtn = rtnQuantize(w, N, K, bits);
      const eK = weightedError(w, dequantize(km), N, K, sens), eR = weightedError(w, dequantize(rtn), N, K, sens);
      expect(eK).toBeLessThan((bits === 3 ? 0.8 : 0.97) * eR);
    }
  });
  test('outliers are kept exact and hit the share', async () => {
    const r = rng(12);
    const N = 32, K = 200;
    const w = randn(N * K, r, 0.02);
    for (let i = 0; i < 40; i++) w[Math.floor(r() * N * K)] = (r() - 0.5) * 2;
    const q = await quantizeLinear(w, N, K, { bits: 4, outliers: 0.01 });
    expect(q.cols!.length).toBeGreaterThan(0.005 * N * K);
    expect(q.cols!.length).toBeLessThan(0.02 * N * K);
    checkOutlierCsr(q.rows!, q.cols!, N, K, 'q');
    const d = dequantize(q);
    for (let n = 0; n < N; n++)
      for (let j = q.rows![n]; j < q.rows![n + 1]; j++) expect(Math.abs(d[n * K + q.cols![j]] - w[n * K + q.cols![j]])).toBeLessThan(1e-6);
  });
  test('kmeansRows: well-separated clusters are found exactly, deterministic', async () => {
    const N = 3, K = 64, E = 4, centers = [-3, -1, 1, 3];
    const w = new Float32Array(N * K).map((_, i) => centers[i % E] + ((i * 7919) % 13 - 6) * 1e-3);
    const run = async () => {
      const lut = Tensor.empty([N, E]), codes = Tensor.empty([N, K], { dtype: 'u8' });
      kmeansRows(lut, codes, Tensor.from(w, [N, K]), Tensor.from(new Float32Array(K).fill(1), [K]), 30);
      return [await lut.toFloat32(), await codes.toArray()] as const;
    };
    const [l1, c1] = await run(), [l2, c2] = await run();
    expect(c1).toEqual(c2);
    expect(l1).toEqual(l2);
    for (let i = 0; i < N * K; i++) expect(c1[i]).toBe(i % E);
  });
  test('safetensors round trip and loader hook', async () => {
    const r = rng(13);
    const N = 24, K = 96;
    const w = randn(N * K, r, 0.05);
    const q = await quantizeLinear(w, N, K, { bits: 3, outliers: 0.01 });
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-'));
    const file = path.join(dir, 'l.safetensors');
    writeSafetensors(file, squeezeTensors('model.layers.0.mlp.up_proj', q, 'f32', 'f32'),
      squeezeMetadata({ bits: 3, lut_dtype: 'f32', outlier_dtype: 'f32', outlier_share: 0.01, source: 'test' }));
    const f = SafetensorsFile.open(file);
    expect(f.metadata.format).toBe('squeezellm');
    const lin = loadSqueezeLinear(f, 'model.layers.0.mlp.up_proj', 'cpu', 'f32', K);
    const x = randn(2 * K, r);
    const y = Tensor.empty([2, N]);
    lin.forward(y, Tensor.from(x, [2, K]));
    expect(relErr(await y.toFloat32(), denseRef(x, dequantize(q), 2, N, K))).toBeLessThan(1e-5);
    lin.dispose();
    f.close();
    // a table entry or an outlier value that is not a finite fp16 number: ERR_FORMAT naming the tensor
    const damaged: Array<[string, (l: SqueezeLinear) => void]> = [
      ['lookup_table: value NaN at index 9', (l) => { l.lut[9] = NaN; }],
      ['lookup_table: value Infinity', (l) => { l.lut[0] = Infinity; }],
      ['vals: value 70000 at index 1', (l) => { l.vals![1] = 70000; }],
    ];
    for (const [msg, hurt] of damaged) {
      const l: SqueezeLinear = { ...q, lut: q.lut.slice(), vals: q.vals!.slice() };
      hurt(l);
      writeSafetensors(file, squeezeTensors('model.layers.0.mlp.up_proj', l, 'f32', 'f32'),
        squeezeMetadata({ bits: 3, lut_dtype: 'f32', outlier_dtype: 'f32', outlier_share: 0.01, source: 'test' }));
      const g = SafetensorsFile.open(file);
      let err: unknown;
      try { loadSqueezeLinear(g, 'model.layers.0.mlp.up_proj', 'cpu', 'f32', K); } catch (e) { err = e; }
      g.close();
      expect(isSqueezeError(err, 'ERR_FORMAT')).toBe(true);
      expect((err as Error).message).toContain(`model.layers.0.mlp.up_proj.${msg}`);
    }
    fs.rmSync(dir, { recursive: true });
  });
});

describeGpu('lutRepack / lutMatmulPacked CUDA vs CPU', () => {
  const seed = freshSeed();
  test.each([3, 4])(`lutRepack %i-bit: CUDA equals CPU (seed ${seed})`, async (bits) => {
    const r = rng(seed + 100 + bits);
    for (const [N, K] of [[301, 161], [16, 1024], [40, 4096 + 32], [3, 100]]) {
      const codes = new Uint8Array(N * K).map(() => Math.floor(r() * (1 << bits)));
      const l: SqueezeLinear = { N, K, bits: bits as 3 | 4, qweight: packCodes(codes, N, K, bits), lut: new Float32Array(N << bits) };
      const cc = packedOf(l, 'cuda'), ch = packedOf(l, 'cpu');
      expect(await cc.toArray()).toEqual(await ch.toArray());
      cc.dispose();
      ch.dispose();
    }
  });
  // [N, K, outliers]: K with a 32-tail, K not a multiple of 32 (161) or of 8 (100: the unvectorised
  // activation path), odd N, N < 16.
  const shapes = [[301, 161, true], [256, 4096 + 32, true], [77, 100, false], [5, 1024, true]] as const;
  const Ms = [1, 2, 3, 5, 8, 16, 17, 33, 64, 300];
  for (const dt of ['f16', 'bf16'] as const)
    for (const bits of [3, 4] as const)
      test(`${dt} ${bits}-bit, M in {${Ms}} (seed ${seed})`, async () => {
        const r = rng(seed + bits + (dt === 'bf16' ? 10 : 0));
        const tol = dt === 'bf16' ? 8e-3 : 2e-3;
        for (const [N, K, outl] of shapes) {
          const l = randomLinear(N, K, bits, outl, r);
          // the op's contract: table entries in the activation dtype, outliers in fp32 (ts/ops/lut.ts)
          const lutT = dt === 'f16' ? f16BitsToFloat32(float32ToF16Bits(l.lut)) : bf16BitsToFloat32(float32ToBf16Bits(l.lut));
          const wd = dequantize({ ...l, lut: lutT });
          const cc = packedOf(l, 'cuda'), ch = packedOf(l, 'cpu');
          for (const fd of ['f16', 'f32'] as const) {
            if (fd === 'f32' && K > 1024) continue;
            const tc = tensorsOf(l, 'cuda', fd), tcpu = tensorsOf(l, 'cpu', fd);
            for (const M of Ms) {
              if (M === 300 && K > 1024 && bits === 3) continue;
              const x = randn(M * K, r);
              const xc = Tensor.from(x, [M, K], { dtype: dt, device: 'cuda' });
              const xh = Tensor.from(x, [M, K], { dtype: dt });
              const yc = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: dt, device: 'cuda' });
              const yh = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N]);
              lutMatmulPacked(yc, xc, cc, tc.lut, tc.rows, tc.cols, tc.vals, bits);
              lutMatmulPacked(yh, xh, ch, tcpu.lut, tcpu.rows, tcpu.cols, tcpu.vals, bits);
              const got = await yc.toFloat32(), want = await yh.toFloat32();
              const what = `N=${N} K=${K} M=${M} ${fd} tables`;
              expect([what, got.every(Number.isFinite)]).toEqual([what, true]);
              // a failure shows the error itself
              const e = relErr(got, want);
              expect([what, e < tol ? 'ok' : e]).toEqual([what, 'ok']);
              if (fd === 'f32' && M <= 17) {
                // independent oracle: dequantize-then-dense on the activations as the GPU saw them
                const xr = await xh.toFloat32();
                const eo = relErr(got, denseRef(xr, wd, M, N, K));
                expect([what, eo < tol ? 'ok' : eo]).toEqual([what, 'ok']);
              }
              [xc, xh, yc, yh].forEach((t) => t.dispose());
            }
          }
        }
      });
  // f16 activations, CUDA against the CPU op on a random linear with outliers, for each M.
  async function expectPackedMatchesCpu(N: number, K: number, bits: 3 | 4, Ms: number[], r: () => number, label: string,
    outliers = true) {
    const l = randomLinear(N, K, bits, outliers, r);
    const cc = packedOf(l, 'cuda'), ch = packedOf(l, 'cpu');
    const tc = tensorsOf(l, 'cuda', 'f16'), tcpu = tensorsOf(l, 'cpu', 'f16');
    for (const M of Ms) {
      const x = randn(M * K, r);
      const xc = Tensor.from(x, [M, K], { dtype: 'f16', device: 'cuda' }), xh = Tensor.from(x, [M, K], { dtype: 'f16' });
      const yc = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: 'f16', device: 'cuda' });
      const yh = Tensor.empty([M, N]);
      lutMatmulPacked(yc, xc, cc, tc.lut, tc.rows, tc.cols, tc.vals, bits);
      lutMatmulPacked(yh, xh, ch, tcpu.lut, tcpu.rows, tcpu.cols, tcpu.vals, bits);
      const what = `${label} M=${M}`;
      const got = await yc.toFloat32(), want = await yh.toFloat32();
      const e = relErr(got, want);
      if (!(e < 2e-3)) {  // a failure shows the error and the rows that differ most
        const bad: string[] = [];
        for (let i = 0; i < got.length && bad.length < 8; i++)
          if (!(Math.abs(got[i] - want[i]) <= 1e-2 * (Math.abs(want[i]) + 1e-2))) bad.push(`[${Math.floor(i / N)},${i % N}] ${got[i]} vs ${want[i]}`);
        expect([what, e, bad]).toEqual([what, 'below 2e-3', []]);
      }
      [xc, xh, yc, yh].forEach((t) => t.dispose());
    }
  }
  // More row tiles than one wave of blocks holds. Each warp's code buffers take the next group's units
  // as they are freed (K = 2048 + 32: 17 4-bit units, so warp 0 decodes 3 and ends a group on its
  // first buffer); SQUEEZELM_LUT_XGROUP=0 refills them after the main loop instead.
  test(`many row tiles: each block of the GEMV walks several (seed ${seed})`, async () => {
    const r = rng(seed + 55);
    const N = 16 * 600 + 5;
    for (const xgroup of ['1', '0']) {
      process.env.SQUEEZELM_LUT_XGROUP = xgroup;
      try {
        for (const K of [256 + 32, 2048 + 32])
          for (const bits of [3, 4] as const)
            await expectPackedMatchesCpu(N, K, bits, [1, 5, 16, 33], r, `${bits}-bit K=${K} xgroup=${xgroup}`);
      } finally {
        delete process.env.SQUEEZELM_LUT_XGROUP;
      }
    }
  });
  // Outliers at M > 2 read a transposed copy of the activations by default; the gather from x[m][k]
  // (taken where that buffer cannot be had) stays tested here.
  // (4-bit at M = 3-4 takes the outlier split instead on Hopper: SQUEEZELM_LUT_OSPLIT_M=2 keeps these
  // paths there.)
  test(`outliers gathered from x[m][k] (transposed copy off) (seed ${seed})`, async () => {
    const r = rng(seed + 77);
    process.env.SQUEEZELM_LUT_XT_MIN_M = '0';
    process.env.SQUEEZELM_LUT_OSPLIT_M = '2';
    try {
      for (const [N, K] of [[301, 161], [256, 4096 + 32]])
        for (const bits of [3, 4] as const) await expectPackedMatchesCpu(N, K, bits, [3, 16, 33, 64], r, `${bits}-bit N=${N} K=${K}`);
    } finally {
      delete process.env.SQUEEZELM_LUT_XT_MIN_M;
      delete process.env.SQUEEZELM_LUT_OSPLIT_M;
    }
  });
  // Outliers through the transposed copy: a thread's first entries are requested before the main
  // loop and the rest read after it, eight at a time; SQUEEZELM_LUT_XP=1 leaves almost all of a row's
  // entries (2% of K = 4128, ~82) to that second path, the default to the first. M = 3-8 take the copy
  // where SQUEEZELM_LUT_XT_MIN_M allows (the one-row-tile kernel).
  test(`outliers through the transposed copy, prefetch depth 1 and default (seed ${seed})`, async () => {
    const r = rng(seed + 88);
    for (const xp of ['1', '0']) {
      process.env.SQUEEZELM_LUT_XP = xp;
      process.env.SQUEEZELM_LUT_XT_MIN_M = '3';
      process.env.SQUEEZELM_LUT_OSPLIT_M = '2';
      try {
        for (const bits of [3, 4] as const)
          await expectPackedMatchesCpu(16 * 40 + 3, 4096 + 32, bits, [3, 5, 8, 9, 16, 33, 64], r, `${bits}-bit xp=${xp}`);
      } finally {
        delete process.env.SQUEEZELM_LUT_XP;
        delete process.env.SQUEEZELM_LUT_XT_MIN_M;
        delete process.env.SQUEEZELM_LUT_OSPLIT_M;
      }
    }
  });
  // 4-bit at M = 9-16 runs one block of 16 warps per SM by default; SQUEEZELM_LUT_W16=0 takes the
  // 8-warp kernel (the 3-bit one). Several row groups per block, K with a tail, with and without the
  // transposed-copy outlier path.
  test(`4-bit M = 9-16: 16-warp and 8-warp blocks (seed ${seed})`, async () => {
    const r = rng(seed + 99);
    for (const w16 of ['1', '0']) {
      process.env.SQUEEZELM_LUT_W16 = w16;
      try {
        for (const [N, K] of [[16 * 600 + 5, 2048 + 32], [37, 8192 + 32]])
          for (const xtMin of ['6', '0']) {
            process.env.SQUEEZELM_LUT_XT_MIN_M = xtMin;
            await expectPackedMatchesCpu(N, K, 4, [9, 13, 16], r, `w16=${w16} N=${N} K=${K} xt=${xtMin}`);
          }
      } finally {
        delete process.env.SQUEEZELM_LUT_W16;
        delete process.env.SQUEEZELM_LUT_XT_MIN_M;
      }
    }
  });
  // M <= 8 on Hopper: each warp's code units come through a ring of bulk copies into shared memory
  // (SQUEEZELM_LUT_RING=0: register buffers). Several row groups per block (the ring runs on across
  // them), K = 256 + 32 (3 units at 4 bits: most warps have none) and K with a tail, both widths,
  // dense-only and dense-and-sparse, and the M <= 2 outlier split.
  // 3-bit at M <= 2: 4 warps per block where the row groups outnumber the 8-warp wave (N = 9605 here),
  // else 8 (N = 37); SQUEEZELM_LUT_DECODE_WARPS forces each on the other shapes.
  test(`M = 1-8: code ring and register buffers (seed ${seed})`, async () => {
    const r = rng(seed + 131);
    // ring kinds: the default (4-bit: slots of two units), one-unit slots (4-bit), none; then the 3-bit
    // decode kernel's warps forced either way
    const settings: Array<[string, string, string]> = [['1', '2', ''], ['1', '1', ''], ['0', '2', ''], ['1', '2', '4'], ['1', '2', '8']];
    for (const [ring, ups, warps] of settings) {
      process.env.SQUEEZELM_LUT_RING = ring;
      process.env.SQUEEZELM_LUT_RING_UPS = ups;
      if (warps) process.env.SQUEEZELM_LUT_DECODE_WARPS = warps;
      try {
        for (const [N, K] of [[16 * 600 + 5, 256 + 32], [16 * 600 + 5, 4096 + 32], [37, 8192 + 32]])
          for (const bits of [3, 4] as const) {
            if (bits === 3 && ups === '1') continue;  // (3-bit slots hold one unit in both)
            if (warps && bits === 4) continue;  // (3-bit only)
            for (const outliers of [false, true])
              await expectPackedMatchesCpu(N, K, bits, warps ? [1, 2] : [1, 2, 5, 8], r,
                `${bits}-bit ring=${ring} ups=${ups} warps=${warps || 'auto'} N=${N} K=${K} outliers=${outliers}`, outliers);
          }
      } finally {
        delete process.env.SQUEEZELM_LUT_RING;
        delete process.env.SQUEEZELM_LUT_RING_UPS;
        delete process.env.SQUEEZELM_LUT_DECODE_WARPS;
      }
    }
  });
  // M <= 2 with outliers (4-bit ring): each lane requests 2 or 4 of a row's entries before the main loop
  // (SQUEEZELM_LUT_OSPLIT_DEPTH; the launch picks 4 where an average row holds more than 1.6 per lane).
  // At 2% of K = 4128 a row holds ~83 entries, past either depth, so the entries after them are read too.
  // Their sums are added before the wait for a warp's last run of codes (the default) or after the main
  // loop (SQUEEZELM_LUT_OEARLY=0); warps with a single run of codes or none (K = 288) add them after it.
  // M = 3-4: the same split, each lane's sums over 4 activation rows passed to the lanes that hold them
  // (2 entries per lane; M = 3 leaves a row of the split empty); M = 5 takes the older kernel. 3-bit at
  // M <= 2: the same step in or after the loop.
  test(`outlier split: 2 and 4 entries per lane requested early, 1 to 4 activation rows, 3-bit at M <= 2 (seed ${seed})`, async () => {
    const r = rng(seed + 141);
    for (const early of ['1', '0'])
      for (const depth of ['2', '4']) {
        process.env.SQUEEZELM_LUT_OSPLIT_DEPTH = depth;
        process.env.SQUEEZELM_LUT_OEARLY = early;
        try {
          for (const [N, K] of [[16 * 600 + 5, 4096 + 32], [16 * 40 + 3, 8192 + 32], [37, 256 + 32]]) {
            await expectPackedMatchesCpu(N, K, 4, depth === '2' ? [1, 2, 3, 4, 5] : [1, 2], r,
              `early=${early} depth=${depth} N=${N} K=${K}`);
            // 3-bit (2 entries per lane): the in-loop step is the 8-warp kernel's (one row group per
            // block, two runs of units or more per warp: N = 643, K = 8224); N = 9605 takes 4 warps
            if (depth === '2') await expectPackedMatchesCpu(N, K, 3, [1, 2], r, `3-bit early=${early} N=${N} K=${K}`);
          }
        } finally {
          delete process.env.SQUEEZELM_LUT_OSPLIT_DEPTH;
          delete process.env.SQUEEZELM_LUT_OEARLY;
        }
      }
  });
  // A ring slot goes back to its next bulk copy only after the warp's reads of it (a proxy fence,
  // bulk_copy.cuh). Without one, about half of these launches (N = 9605, K = 2080: two to three row
  // groups per block, each warp's ring running a group ahead) read some unit's rows from the slot's next
  // copy on an H200. Repeated launches on the same data must agree bit for bit and with the CPU.
  test(`code ring: repeated launches agree bit for bit (seed ${seed})`, async () => {
    const r = rng(seed + 139);
    const N = 16 * 600 + 5, K = 2048 + 32;
    process.env.SQUEEZELM_LUT_RING = '1';
    try {
      for (const [bits, ups] of [[4, '2'], [4, '1'], [3, '1']] as const) {
        process.env.SQUEEZELM_LUT_RING_UPS = ups;
        for (const [M, outliers] of [[1, true], [2, false]] as const) {
          const l = randomLinear(N, K, bits, outliers, r);
          const cc = packedOf(l, 'cuda'), ch = packedOf(l, 'cpu');
          const tc = tensorsOf(l, 'cuda', 'f16'), tcpu = tensorsOf(l, 'cpu', 'f16');
          const x = randn(M * K, r);
          const xc = Tensor.from(x, [M, K], { dtype: 'f16', device: 'cuda' }), xh = Tensor.from(x, [M, K], { dtype: 'f16' });
          const yh = Tensor.empty([M, N]);
          lutMatmulPacked(yh, xh, ch, tcpu.lut, tcpu.rows, tcpu.cols, tcpu.vals, bits);
          const want = await yh.toFloat32();
          let first: Uint16Array | null = null;
          const what = `${bits}-bit ups=${ups} M=${M} outliers=${outliers}`;
          for (let i = 0; i < 12; i++) {
            const yc = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: 'f16', device: 'cuda' });
            lutMatmulPacked(yc, xc, cc, tc.lut, tc.rows, tc.cols, tc.vals, bits);
            const raw = (await yc.toArray()) as Uint16Array;
            if (!first) {
              first = raw;
              const e = relErr(await yc.toFloat32(), want);
              expect([what, e < 2e-3 ? 'ok' : e]).toEqual([what, 'ok']);
            } else {
              let diff = 0;
              for (let j = 0; j < raw.length; j++) if (raw[j] !== first[j]) diff++;
              expect([what, `launch ${i}`, diff]).toEqual([what, `launch ${i}`, 0]);
            }
            yc.dispose();
          }
          [xc, xh, yh].forEach((t) => t.dispose());
        }
      }
    } finally {
      delete process.env.SQUEEZELM_LUT_RING;
      delete process.env.SQUEEZELM_LUT_RING_UPS;
    }
  });
  // prefetchNext names the codes of the launch that follows; the GEMV's blocks of the last round request the
  // first codes of that weight's row groups into L2 at their end. A hint only: the output is the same bits,
  // also where the named weight has fewer row groups than the grid has blocks (its bounds clamp the
  // requests) and where blocks walk several rounds of row groups.
  test(`prefetchNext changes no bit of the output, at every M and whatever weight it names (seed ${seed})`, async () => {
    const r = rng(seed + 151);
    const K = 4096 + 32;
    for (const bits of [4, 3] as const) {
      const small = packedOf(randomLinear(40, 96, bits, false, r), 'cuda');
      for (const N of [16 * 700 + 3, 200]) {
        const l = randomLinear(N, K, bits, true, r);
        const cc = packedOf(l, 'cuda'), tc = tensorsOf(l, 'cuda', 'f16');
        const other = packedOf(randomLinear(N + 48, 2 * K, bits, false, r), 'cuda');
        for (const M of [1, 2, 4, 8, 16, 40]) {
          const xc = Tensor.from(randn(M * K, r), [M, K], { dtype: 'f16', device: 'cuda' });
          const run = async (next?: Tensor): Promise<Uint16Array> => {
            const yc = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: 'f16', device: 'cuda' });
            lutMatmulPacked(yc, xc, cc, tc.lut, tc.rows, tc.cols, tc.vals, bits, { prefetchNext: next });
            const raw = (await yc.toArray()) as Uint16Array;
            yc.dispose();
            return raw;
          };
          const want = await run();
          for (const [name, next] of [['itself', cc], ['a larger weight', other], ['a smaller weight', small]] as const) {
            const got = await run(next);
            let diff = 0;
            for (let j = 0; j < got.length; j++) if (got[j] !== want[j]) diff++;
            expect([`${bits}-bit N=${N} M=${M} next=${name}`, diff]).toEqual([`${bits}-bit N=${N} M=${M} next=${name}`, 0]);
          }
          xc.dispose();
        }
        [cc, other, tc.q, tc.lut, tc.rows, tc.cols, tc.vals].forEach((z) => z?.dispose());
      }
      small.dispose();
    }
  });
  // Through the transposed copy (3-bit from M = 3, 4-bit from 6), a thread holds fewer outlier entries in
  // registers where an average row's share fits (SQUEEZELM_LUT_XPLOW=1 forces that depth, 0 the deeper
  // one). At 2% of K = 2080 or 8224 most rows exceed the shallow depth, so the entries past it (read after
  // the main loop) are exercised too. M = 3-8: one row tile; M = 9-16: two, and 16 warps for 4 bits.
  test(`M = 3-16: outlier depth sized to the rows, both depths (seed ${seed})`, async () => {
    const r = rng(seed + 111);
    for (const low of ['1', '0']) {
      process.env.SQUEEZELM_LUT_XPLOW = low;
      process.env.SQUEEZELM_LUT_OSPLIT_M = '2';
      try {
        for (const [N, K] of [[16 * 600 + 5, 2048 + 32], [37, 8192 + 32]])
          for (const bits of [3, 4] as const)
            await expectPackedMatchesCpu(N, K, bits, [3, 6, 8, 9, 12, 16], r, `${bits}-bit xplow=${low} N=${N} K=${K}`);
      } finally {
        delete process.env.SQUEEZELM_LUT_XPLOW;
        delete process.env.SQUEEZELM_LUT_OSPLIT_M;
      }
    }
  });
  // Large M: the weight decoded once into a dense copy, then the dense GEMM (by default past the
  // GEMV's range, dense_path.cuh), and the tiled GEMM it replaces there (SQUEEZELM_LUT_DENSE_MIN_M=0),
  // which also runs where the copy would exceed SQUEEZELM_LUT_DENSE_MAX_MB; a bound between (300:
  // 65 and 256 tiled, 400 dense); K with tails, K % 8 != 0 (scalar stores, unvectorised activations),
  // odd N.
  test(`large M: dense copy of the weight, and the tiled GEMM (seed ${seed})`, async () => {
    const r = rng(seed + 99);
    const settings: Array<Record<string, string>> = [{}, { SQUEEZELM_LUT_DENSE_MIN_M: '0' }, { SQUEEZELM_LUT_DENSE_MAX_MB: '0' },
      { SQUEEZELM_LUT_DENSE_MIN_M: '300' }];
    for (const env of settings) {
      Object.assign(process.env, env);
      try {
        // (40 x 8200: ~164 outliers per row, more than the decoding block's 128 threads take at once)
        for (const [N, K] of [[301, 161], [130, 2048 + 40], [77, 100], [40, 8200]])
          for (const bits of [3, 4] as const)
            await expectPackedMatchesCpu(N, K, bits, [65, 255, 256, 400], r, `${JSON.stringify(env)} ${bits}-bit N=${N} K=${K}`);
      } finally {
        for (const k of Object.keys(env)) delete process.env[k];
      }
    }
  });
  test('large M: the dense copy is a temporary (returned to the pool, given back by emptyCache)', async () => {
    const r = rng(seed + 101);
    const l = randomLinear(512, 1024, 4, true, r);
    const t = tensorsOf(l, 'cuda', 'f16');
    const c = packedOf(l, 'cuda');
    const x = Tensor.from(randn(300 * 1024, r), [300, 1024], { dtype: 'f16', device: 'cuda' });
    const y = Tensor.empty([300, 512], { dtype: 'f16', device: 'cuda' });
    lutMatmulPacked(y, x, c, t.lut, t.rows, t.cols, t.vals, 4);  // whatever a first call sets up for good
    await synchronize('cuda');
    const before = memoryStats('cuda').allocated;
    for (let i = 0; i < 3; i++) lutMatmulPacked(y, x, c, t.lut, t.rows, t.cols, t.vals, 4);
    await synchronize('cuda');
    const after = memoryStats('cuda');
    expect(after.allocated).toBe(before);
    expect(after.cached).toBeGreaterThanOrEqual(512 * 1024 * 2);  // the copy, kept for the next call
    emptyCache('cuda');
    expect(memoryStats('cuda').cached).toBe(0);
    [x, y, c, t.q, t.lut, t.rows, t.cols, t.vals].forEach((z) => z?.dispose());
  });
  test('deterministic across runs (GEMV and GEMM paths)', async () => {
    const r = rng(5);
    const l = randomLinear(512, 1024, 4, true, r);
    const t = tensorsOf(l, 'cuda', 'f16');
    const c = packedOf(l, 'cuda');
    for (const M of [4, 16, 100, 300]) {
      const x = Tensor.from(randn(M * 1024, r), [M, 1024], { dtype: 'f16', device: 'cuda' });
      const outs: Uint16Array[] = [];
      for (let i = 0; i < 3; i++) {
        const y = Tensor.empty([M, 512], { dtype: 'f16', device: 'cuda' });
        lutMatmulPacked(y, x, c, t.lut, t.rows, t.cols, t.vals, 4);
        outs.push((await y.toArray()) as Uint16Array);
      }
      expect(outs[1]).toEqual(outs[0]);
      expect(outs[2]).toEqual(outs[0]);
    }
  });
  test(`paired rows: CUDA equals the CPU at every M, and the siluPairs epilogue (GEMV) equals the CPU's (seed ${seed})`, async () => {
    const r = rng(seed + 77);
    // gate|up-like (H = N/2) over several row groups per block, and 16-row heads paired at 8; K with a tail
    for (const [N, K, H, bits] of [[4096, 256 + 32, 2048, 4], [704, 1024, 352, 3], [96, 161, 8, 4]] as const) {
      const l = randomLinear(N, K, bits, true, r);
      const mc = uploadSqueezeLinear(l, 'cuda', 'f16', { pairHalf: H }), mh = uploadSqueezeLinear(l, 'cpu', 'f16', { pairHalf: H });
      const plain = uploadSqueezeLinear(l, 'cuda', 'f16');
      for (const M of [1, 2, 3, 5, 8, 16, 17, 33, 64, 65, 300]) {
        const what = `N=${N} K=${K} H=${H} ${bits}-bit M=${M}`;
        const x = randn(M * K, r);
        const xc = Tensor.from(x, [M, K], { dtype: 'f16', device: 'cuda' }), xh = Tensor.from(x, [M, K], { dtype: 'f16' });
        const yc = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: 'f16', device: 'cuda' });
        const yp = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: 'f16', device: 'cuda' });
        const yh = Tensor.empty([M, N], { dtype: 'f16' });
        mc.forward(yc, xc);
        plain.forward(yp, xc);
        mh.forward(yh, xh);
        const got = await yc.toFloat32(), want = await yh.toFloat32();
        const e = relErr(got, want), ep = relErr(got, await yp.toFloat32());
        expect([what, got.every(Number.isFinite), e < 2e-3 ? 'ok' : e, ep < 2e-3 ? 'ok' : ep]).toEqual([what, true, 'ok', 'ok']);
        if (mc.siluPairs) {
          const ac = Tensor.from(new Float32Array(M * H).fill(NaN), [M, H], { dtype: 'f16', device: 'cuda' });
          const ah = Tensor.empty([M, H], { dtype: 'f16' });
          if (M > 64) {
            expect(() => mc.siluPairs!(ac, xc)).toThrow(expect.objectContaining({ code: 'ERR_UNSUPPORTED' }));
          } else {
            mc.siluPairs(ac, xc);
            mh.siluPairs!(ah, xh);
            const ga = await ac.toFloat32(), wa = await ah.toFloat32();
            const ea = relErr(ga, wa);
            expect([what, 'silu', ga.every(Number.isFinite), ea < 2e-3 ? 'ok' : ea]).toEqual([what, 'silu', true, 'ok']);
            if (M <= 2 && K % 8 === 0) {
              // with the RMSNorm fused in front
              const g = Float32Array.from({ length: K }, () => 0.5 + r());
              const gc = Tensor.from(g, [K], { dtype: 'f16', device: 'cuda' }), gh = Tensor.from(g, [K], { dtype: 'f16' });
              const an = Tensor.from(new Float32Array(M * H).fill(NaN), [M, H], { dtype: 'f16', device: 'cuda' });
              mc.siluPairs(an, xc, { normWeight: gc, eps: 1e-5 });
              mh.siluPairs!(ah, xh, { normWeight: gh, eps: 1e-5 });
              const gn = await an.toFloat32(), en = relErr(gn, await ah.toFloat32());
              expect([what, 'norm silu', gn.every(Number.isFinite), en < 2e-3 ? 'ok' : en]).toEqual([what, 'norm silu', true, 'ok']);
              [gc, gh, an].forEach((t) => t.dispose());
            }
          }
          [ac, ah].forEach((t) => t.dispose());
        }
        [xc, xh, yc, yp, yh].forEach((t) => t.dispose());
      }
      [mc, mh, plain].forEach((m) => m.dispose());
    }
  });
  // The decoder's RMSNorm fused in front (every block normalises x into its shared memory: M <= 2) and the
  // residual add behind (y += z). Shapes: many row groups per block at K = 4096 + 32, K = 8192 + 32 (twice
  // the activations in shared memory), and K = 168 (a multiple of 8, not of 32); the code ring and the
  // register buffers; with and without outliers.
  test(`fused RMSNorm in front and residual epilogue: CUDA equals the CPU op and the unfused CUDA sequence (seed ${seed})`, async () => {
    const r = rng(seed + 171);
    // the code ring (default), register buffers, the 3-bit decode kernel's warps forced to 4 and to 8, and
    // the 4-bit kernels' outlier step after the main loop instead of in it (late)
    for (const ring of ['-1', '0', 'w4', 'w8', 'late']) {
      if (ring === '0') process.env.SQUEEZELM_LUT_RING = '0';
      if (ring === 'w4' || ring === 'w8') process.env.SQUEEZELM_LUT_DECODE_WARPS = ring.slice(1);
      if (ring === 'late') process.env.SQUEEZELM_LUT_OEARLY = '0';
      try {
        for (const dt of ['f16', 'bf16'] as const)
          for (const [N, K, bits, outl] of [[16 * 600 + 5, 4096 + 32, 4, true], [16 * 600 + 5, 4096 + 32, 3, true],
            [37, 8192 + 32, 4, false], [37, 8192 + 32, 3, true], [301, 168, 4, true], [301, 168, 3, false]] as const) {
            if (dt === 'bf16' && ring === '0' && K < 8192) continue;
            if (ring.startsWith('w') && bits === 4) continue;  // (3-bit only)
            if (ring === 'late' && (bits === 3 || !outl)) continue;  // (4-bit with outliers only)
            const tol = dt === 'bf16' ? 8e-3 : 2e-3;
            const l = randomLinear(N, K, bits, outl, r);
            const mc = uploadSqueezeLinear(l, 'cuda', dt), mh = uploadSqueezeLinear(l, 'cpu', dt);
            const g = Float32Array.from({ length: K }, () => 0.5 + r());
            const gc = Tensor.from(g, [K], { dtype: dt, device: 'cuda' }), gh = Tensor.from(g, [K], { dtype: dt });
            for (const M of [1, 2]) {
              const what = `${dt} ring=${ring} ${bits}-bit N=${N} K=${K} outliers=${outl} M=${M}`;
              // a residual stream of some scale and offset, so the norm matters
              const x = randn(M * K, r, 3).map((v, i) => v + (i % 7) - 3);
              const xc = Tensor.from(x, [M, K], { dtype: dt, device: 'cuda' }), xh = Tensor.from(x, [M, K], { dtype: dt });
              const yc = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: dt, device: 'cuda' });
              const yh = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: dt });
              mc.forward(yc, xc, { normWeight: gc, eps: 1e-5 });
              mh.forward(yh, xh, { normWeight: gh, eps: 1e-5 });
              // the unfused CUDA sequence: rmsNorm into h, then the plain GEMV
              const hc = Tensor.empty([M, K], { dtype: dt, device: 'cuda' });
              const yu = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: dt, device: 'cuda' });
              rmsNorm(hc, xc, gc, 1e-5);
              mc.forward(yu, hc);
              const got = await yc.toFloat32(), want = await yh.toFloat32(), unf = await yu.toFloat32();
              const e = relErr(got, want), eu = relErr(got, unf);
              expect([what, got.every(Number.isFinite), e < tol ? 'ok' : e, eu < tol ? 'ok' : eu]).toEqual([what, true, 'ok', 'ok']);
              // residual: y += x · Wᵀ on a random y (bit for bit the plain GEMV and add on CUDA)
              const y0 = randn(M * N, r, 2);
              const rc = Tensor.from(y0, [M, N], { dtype: dt, device: 'cuda' }), rh = Tensor.from(y0, [M, N], { dtype: dt });
              const ru = Tensor.from(y0, [M, N], { dtype: dt, device: 'cuda' });
              const hh = await hc.to('cpu');
              mc.forwardAdd(rc, hc);
              mh.forwardAdd(rh, hh);
              add(ru, ru, yu);  // yu: the plain GEMV of hc, from above
              const gr = await rc.toFloat32(), wr = await rh.toFloat32();
              const er = relErr(gr, wr);
              expect([what, 'residual', er < tol ? 'ok' : er]).toEqual([what, 'residual', 'ok']);
              expect(Buffer.from(await rc.toArray() as Uint16Array).equals(Buffer.from(await ru.toArray() as Uint16Array))).toBe(true);
              [xc, xh, yc, yh, hc, hh, yu, rc, rh, ru].forEach((t) => t.dispose());
            }
            // past the fused norm's reach: 3 rows, or K not a multiple of 8 -> ERR_UNSUPPORTED (nothing written)
            const x3 = Tensor.from(randn(3 * K, r), [3, K], { dtype: dt, device: 'cuda' });
            const y3 = Tensor.empty([3, N], { dtype: dt, device: 'cuda' });
            expect(() => mc.forward(y3, x3, { normWeight: gc })).toThrow(expect.objectContaining({ code: 'ERR_UNSUPPORTED' }));
            [x3, y3, gc, gh].forEach((t) => t.dispose());
            [mc, mh].forEach((m) => m.dispose());
          }
      } finally {
        delete process.env.SQUEEZELM_LUT_RING;
        delete process.env.SQUEEZELM_LUT_DECODE_WARPS;
        delete process.env.SQUEEZELM_LUT_OEARLY;
      }
    }
    // a norm weight that is not 16-byte aligned (a view 1 element into its storage) is read element by element
    for (const bits of [3, 4] as const) {
      const N = 16 * 600 + 5, K = 4096 + 32, M = 1;
      const l = randomLinear(N, K, bits, true, r);
      const mc = uploadSqueezeLinear(l, 'cuda', 'f16'), mh = uploadSqueezeLinear(l, 'cpu', 'f16');
      const g = Float32Array.from({ length: K + 1 }, () => 0.5 + r());
      const gbig = Tensor.from(g, [K + 1], { dtype: 'f16', device: 'cuda' });
      const gc = gbig.view(1, [K]), gh = Tensor.from(g.subarray(1), [K], { dtype: 'f16' });
      const x = randn(M * K, r, 3);
      const xc = Tensor.from(x, [M, K], { dtype: 'f16', device: 'cuda' }), xh = Tensor.from(x, [M, K], { dtype: 'f16' });
      const yc = Tensor.from(new Float32Array(M * N).fill(NaN), [M, N], { dtype: 'f16', device: 'cuda' });
      const yh = Tensor.empty([M, N], { dtype: 'f16' });
      mc.forward(yc, xc, { normWeight: gc, eps: 1e-5 });
      mh.forward(yh, xh, { normWeight: gh, eps: 1e-5 });
      const got = await yc.toFloat32(), e = relErr(got, await yh.toFloat32());
      expect([`unaligned norm weight ${bits}-bit`, got.every(Number.isFinite), e < 2e-3 ? 'ok' : e])
        .toEqual([`unaligned norm weight ${bits}-bit`, true, 'ok']);
      [gc, gbig, gh, xc, xh, yc, yh].forEach((t) => t.dispose());
      [mc, mh].forEach((m) => m.dispose());
    }
    // residual past M = 64, and the norm at K % 8 != 0 -> ERR_UNSUPPORTED
    const l = randomLinear(40, 161, 4, true, r);
    const mc = uploadSqueezeLinear(l, 'cuda', 'f16');
    const x = Tensor.from(randn(65 * 161, r), [65, 161], { dtype: 'f16', device: 'cuda' });
    const y = Tensor.empty([65, 40], { dtype: 'f16', device: 'cuda' });
    const g = Tensor.from(new Float32Array(161).fill(1), [161], { dtype: 'f16', device: 'cuda' });
    const x1 = Tensor.from(randn(161, r), [1, 161], { dtype: 'f16', device: 'cuda' });
    const y1 = Tensor.empty([1, 40], { dtype: 'f16', device: 'cuda' });
    expect(() => mc.forwardAdd(y, x)).toThrow(expect.objectContaining({ code: 'ERR_UNSUPPORTED' }));
    expect(() => mc.forward(y1, x1, { normWeight: g })).toThrow(expect.objectContaining({ code: 'ERR_UNSUPPORTED' }));
    [x, y, g, x1, y1, mc].forEach((t) => t.dispose());
  });
  test('interchange-layout lutMatmul and a loaded module agree with the packed op', async () => {
    const r = rng(6);
    const l = randomLinear(100, 300, 3, true, r);
    const t = tensorsOf(l, 'cuda', 'f16');
    const x = Tensor.from(randn(3 * 300, r), [3, 300], { dtype: 'f16', device: 'cuda' });
    const y1 = Tensor.empty([3, 100], { dtype: 'f16', device: 'cuda' }), y2 = Tensor.empty([3, 100], { dtype: 'f16', device: 'cuda' });
    lutMatmul(y1, x, t.q, t.lut, t.rows, t.cols, t.vals, 3);
    const mod = uploadSqueezeLinear(l, 'cuda');
    mod.forward(y2, x);
    expect(relErr(await y1.toFloat32(), await y2.toFloat32())).toBeLessThan(1e-3);
    mod.dispose();
  });
});

describe('quantizeModel', () => {
  test('tiny llama folder: every linear quantized, the rest kept, config marked', async () => {
    const src = path.join(__dirname, 'fixtures', 'tiny-llama-gqa');
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-q-'));
    const { quantizeModel } = await import('../ts/quant/squeezellm');
    const r = await quantizeModel(src, { bits: 4, outliers: 0.005, out, iters: 10 });
    expect(r.linears).toBe(4 * 7);
    const cfg = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
    expect(cfg.quantization_config.quant_method).toBe('squeezellm');
    expect(cfg.quantization_config.bits).toBe(4);
    const f = SafetensorsFile.open(path.join(out, 'model.safetensors'));
    expect(f.metadata.format).toBe('squeezellm');
    expect(f.has('model.layers.0.self_attn.q_proj.qweight')).toBe(true);
    expect(f.has('model.layers.0.self_attn.q_proj.weight')).toBe(false);
    expect(f.has('model.embed_tokens.weight')).toBe(true);
    expect(f.has('lm_head.weight')).toBe(true);
    // the quantized weight is close to the original
    const orig = SafetensorsFile.open(path.join(src, 'model.safetensors'));
    const w = orig.readFloat32('model.layers.1.mlp.down_proj.weight');
    const [N, K] = orig.entry('model.layers.1.mlp.down_proj.weight').shape;
    const lin = loadSqueezeLinear(f, 'model.layers.1.mlp.down_proj', 'cpu', 'f32', K);
    const eye = new Float32Array(K * K);
    for (let k = 0; k < K; k++) eye[k * K + k] = 1;
    const y = Tensor.empty([K, N]);
    lin.forward(y, Tensor.from(eye, [K, K]));
    const wt = await y.toFloat32(); // [K, N] = W^T
    const deq = new Float32Array(N * K);
    for (let n = 0; n < N; n++) for (let k = 0; k < K; k++) deq[n * K + k] = wt[k * N + n];
    expect(relErr(deq, w)).toBeLessThan(0.15);
    lin.dispose();
    f.close();
    orig.close();
    fs.rmSync(out, { recursive: true });
  });

  test('lmHead (--lm-head): the lm_head quantized too, loaded as a quantized linear; logits equal the dense model of its dequantized weights', async () => {
    const src = path.join(__dirname, 'fixtures', 'tiny-llama-gqa');
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-qh-'));
    const { quantizeModel, readSqueezeLinear } = await import('../ts/quant/squeezellm');
    const { loadModel } = await import('../ts/model/model');
    const out = path.join(tmp, 'q'), twin = path.join(tmp, 'twin');
    try {
      const r = await quantizeModel(src, { bits: 3, outliers: 0.005, out, iters: 10, lmHead: true });
      expect(r.linears).toBe(4 * 7 + 1);
      const cfg = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
      expect(cfg.quantization_config.lm_head).toBe(true);
      expect(cfg.tie_word_embeddings).toBe(false);
      const f = SafetensorsFile.open(path.join(out, 'model.safetensors'));
      let headW: Float32Array;
      try {
        expect([f.has('lm_head.qweight'), f.has('lm_head.weight'), f.has('model.embed_tokens.weight')]).toEqual([true, false, true]);
        // the twin: every tensor as written, the lm_head dequantized into lm_head.weight
        const head = readSqueezeLinear(f, 'lm_head', 256);
        expect([head.N, head.K, head.bits]).toEqual([512, 256, 3]);
        expect(head.cols!.length).toBeGreaterThan(0);
        headW = dequantize(head);
        const tensors: Record<string, { dtype: string; shape: number[]; data: ArrayBufferView }> = {};
        for (const n of f.names()) if (!n.startsWith('lm_head.')) tensors[n] = f.read(n);
        tensors['lm_head.weight'] = { dtype: 'F32', shape: [512, 256], data: headW };
        fs.mkdirSync(twin);
        writeSafetensors(path.join(twin, 'model.safetensors'), tensors, f.metadata);
        fs.copyFileSync(path.join(out, 'config.json'), path.join(twin, 'config.json'));
      } finally {
        f.close();
      }
      // close to the original lm_head
      const orig = SafetensorsFile.open(path.join(src, 'model.safetensors'));
      try {
        expect(relErr(headW, orig.readFloat32('lm_head.weight'))).toBeLessThan(0.3);
      } finally {
        orig.close();
      }
      const m = await loadModel(out, { device: 'cpu', maxContext: 64 }), ref = await loadModel(twin, { device: 'cpu', maxContext: 64 });
      try {
        expect(m.quantization!.modules).toBe(4 * 4 + 1);
        expect(ref.quantization!.modules).toBe(4 * 4);
        const ids = [5, 77, 301, 12, 9, 400, 3];
        const a = await m.logits(ids), b = await ref.logits(ids);
        expect(maxAbsErr(a, b)).toBeLessThan(1e-4);
        // the twin's head counts: the original fp16 head gives other logits
        const other = await quantizeModel(src, { bits: 3, outliers: 0.005, out: path.join(tmp, 'plain'), iters: 10 });
        expect(other.linears).toBe(28);
        const plain = await loadModel(path.join(tmp, 'plain'), { device: 'cpu', maxContext: 64 });
        try {
          expect(maxAbsErr(a, await plain.logits(ids))).toBeGreaterThan(1e-3);
        } finally {
          await plain.dispose();
        }
      } finally {
        await m.dispose();
        await ref.dispose();
      }
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });

  test('an interrupted run resumes from the linears it finished, with the same result', async () => {
    const src = path.join(__dirname, 'fixtures', 'tiny-llama-gqa');
    const { quantizeModel, PARTIAL_DIR } = await import('../ts/quant/squeezellm');
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-qr-'));
    const opts = { bits: 4, outliers: 0.005, iters: 10 } as const;
    const whole = path.join(tmp, 'whole'), out = path.join(tmp, 'out');
    await quantizeModel(src, { ...opts, out: whole });
    // interrupted after 5 of the 28 linears
    const stop = (n: number) => (done: number) => { if (done === n) throw new Error('interrupted'); };
    await expect(quantizeModel(src, { ...opts, out, onProgress: stop(5) })).rejects.toThrow('interrupted');
    expect(fs.existsSync(path.join(out, 'model.safetensors'))).toBe(false);
    const kept = fs.readdirSync(path.join(out, PARTIAL_DIR)).filter((f) => f.endsWith('.safetensors'));
    expect(kept).toHaveLength(5);
    // a half-written file of the next linear does not count
    fs.writeFileSync(path.join(out, PARTIAL_DIR, 'model.layers.0.mlp.up_proj.safetensors.tmp'), 'partial');
    const resumed: boolean[] = [];
    const restarts: string[] = [];
    const r = await quantizeModel(src, { ...opts, out, onProgress: (_d, _t, _n, fromEarlier) => resumed.push(fromEarlier), onRestart: (w) => restarts.push(w) });
    expect(r.linears).toBe(28);
    expect(restarts).toEqual([]);
    expect(resumed.filter((x) => x)).toHaveLength(5);
    expect(resumed.slice(0, 5).every((x) => x)).toBe(true);
    expect(fs.existsSync(path.join(out, PARTIAL_DIR))).toBe(false);
    expect(Buffer.compare(fs.readFileSync(path.join(out, 'model.safetensors')), fs.readFileSync(path.join(whole, 'model.safetensors')))).toBe(0);
    expect(fs.readFileSync(path.join(out, 'config.json'), 'utf8')).toBe(fs.readFileSync(path.join(whole, 'config.json'), 'utf8'));
    // other settings, or resume off: the earlier linears are discarded, not mixed in
    for (const [o, why] of [[{ bits: 3 }, /differ/], [{ resume: false }, /resume is off/]] as const) {
      await expect(quantizeModel(src, { ...opts, out, onProgress: stop(3) })).rejects.toThrow('interrupted');
      const flags: boolean[] = [];
      const reasons: string[] = [];
      await expect(quantizeModel(src, { ...opts, ...o, out, onProgress: (d, _t, _n, fromEarlier) => { flags.push(fromEarlier); stop(2)(d); },
        onRestart: (w) => reasons.push(w) })).rejects.toThrow('interrupted');
      expect(flags).toEqual([false, false]);
      expect(reasons).toHaveLength(1);
      expect(reasons[0]).toMatch(why);
      fs.rmSync(out, { recursive: true });
    }
    fs.rmSync(tmp, { recursive: true });
  });
});
