// kmeansRows on CUDA against the CPU reference, and quantizeLinear on either device.
import { Tensor, DType } from '../ts/tensor';
import { kmeansRows } from '../ts/ops/lut';
import { quantizeLinear, dequantize } from '../ts/quant/squeezellm';
import { describeGpu, rng, randn, freshSeed } from './gpu';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

/** Rows drawn from E well-separated clusters (random centers per row), small noise. */
function clustered(N: number, K: number, E: number, r: () => number): Float32Array {
  const w = new Float32Array(N * K);
  for (let n = 0; n < N; n++) {
    const scale = 0.01 + r();
    const base = (r() - 0.5) * scale * 4;
    for (let k = 0; k < K; k++) {
      const c = Math.floor(r() * E);
      w[n * K + k] = base + scale * (c + (r() - 0.5) * 0.05);
    }
  }
  return w;
}

async function run(device: string, w: Float32Array, sens: Float32Array, N: number, K: number, E: number,
  wdt: DType, sdt: DType, iters: number): Promise<[Float32Array, Uint8Array]> {
  const lut = Tensor.from(new Float32Array(N * E).fill(NaN), [N, E], { device });
  const codes = Tensor.from(new Uint8Array(N * K).fill(0xab), [N, K], { dtype: 'u8', device });
  const tw = Tensor.from(w, [N, K], { dtype: wdt, device });
  const ts = Tensor.from(sens, sens.length === K ? [K] : [N, K], { dtype: sdt, device });
  kmeansRows(lut, codes, tw, ts, iters);
  const out: [Float32Array, Uint8Array] = [(await lut.toArray()) as Float32Array, (await codes.toArray()) as Uint8Array];
  [lut, codes, tw, ts].forEach((t) => t.dispose());
  return out;
}

function maxRel(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < b.length; i++) {
    if (!Number.isFinite(a[i])) return Infinity;
    m = Math.max(m, Math.abs(a[i] - b[i]) / Math.max(Math.abs(b[i]), 1e-6));
  }
  return m;
}

describeGpu('kmeansRows CUDA vs CPU', () => {
  const seed = freshSeed();
  const cases: Array<[number, number, number, DType, DType, 'row' | 'shared' | 'zeros']> = [
    [257, 161, 16, 'f32', 'f32', 'row'],
    [300, 1000, 8, 'f16', 'f32', 'shared'],
    [64, 4133, 16, 'bf16', 'f16', 'row'],
    [33, 777, 16, 'f32', 'f32', 'zeros'],
    [7, 20000, 8, 'f32', 'f16', 'shared'],
    [520, 8200, 16, 'f16', 'f32', 'shared'], // more than one chunk of rows
  ];
  for (const [N, K, E, wdt, sdt, kind] of cases)
    test(`N=${N} K=${K} E=${E} w=${wdt} sens=${sdt} ${kind} (seed ${seed})`, async () => {
      const r = rng(seed + N + K);
      const w = clustered(N, K, E, r);
      let sens: Float32Array;
      if (kind === 'shared') sens = new Float32Array(K).map(() => 0.5 + r());
      else {
        sens = new Float32Array(N * K).map(() => 0.5 + r());
        if (kind === 'zeros') {
          for (let i = 0; i < sens.length; i++) if (r() < 0.05) sens[i] = 0; // outliers
          sens.fill(0, 0, K); // row 0: all zero -> uniform
        }
      }
      // values exactly representable in the weight dtype so both devices see the same row
      const wq = (await Tensor.from(w, [N, K], { dtype: wdt }).toFloat32()) as Float32Array;
      const sq = (await Tensor.from(sens, [sens.length], { dtype: sdt }).toFloat32()) as Float32Array;
      for (const iters of [0, 3, 30]) {
        const [lg, cg] = await run('cuda', wq, sq, N, K, E, wdt, sdt, iters);
        const [lh, ch] = await run('cpu', wq, sq, N, K, E, wdt, sdt, iters);
        expect(maxRel(lg, lh)).toBeLessThan(1e-4);
        let diff = 0;
        for (let i = 0; i < ch.length; i++) diff += cg[i] !== ch[i] ? 1 : 0;
        expect(diff).toBe(0);
      }
    });
  test('deterministic across runs', async () => {
    const r = rng(3);
    const N = 128, K = 3000, E = 16;
    const w = randn(N * K, r), s = new Float32Array(N * K).map(() => r());
    const [l1, c1] = await run('cuda', w, s, N, K, E, 'f32', 'f32', 30);
    const [l2, c2] = await run('cuda', w, s, N, K, E, 'f32', 'f32', 30);
    expect(Buffer.from(l2.buffer).equals(Buffer.from(l1.buffer))).toBe(true);
    expect(Buffer.from(c2.buffer).equals(Buffer.from(c1.buffer))).toBe(true);
  });
  test('quantizeLinear on cuda matches cpu (dense and sparse)', async () => {
    const r = rng(seed ^ 0x55);
    const N = 96, K = 320;
    const w = clustered(N, K, 16, r);
    const sens = new Float32Array(K).map(() => 0.5 + r());
    const o = { bits: 4, outliers: 0.005, sensitive: 0.001, sens, iters: 30 } as const;
    const g = await quantizeLinear(w, N, K, { ...o, device: 'cuda' });
    const h = await quantizeLinear(w, N, K, { ...o, device: 'cpu' });
    expect(maxRel(g.lut, h.lut)).toBeLessThan(1e-4);
    expect(g.qweight).toEqual(h.qweight);
    expect(g.cols).toEqual(h.cols);
    expect(maxRel(dequantize(g), dequantize(h))).toBeLessThan(1e-3);
  });
});
