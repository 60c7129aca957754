import { Tensor } from '../ts/tensor';
import { native } from '../ts/native';
import { isSqueezeError } from '../ts/errors';
import { KvqCache, kvqAttention, kvqDequantize, kvBytesPerToken } from '../ts/ops/kvquant';
import { randn, relErr, rng } from './gpu';
import { buildCache, invFreqFor, oracleAttention, oracleRoundTrip } from './kvquant_helpers';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

async function dequantAll(s: ReturnType<typeof buildCache>, b: number): Promise<{ k: Float32Array; v: Float32Array }> {
  const L = s.lens[b];
  const ko = Tensor.empty([L, s.H, s.D], { dtype: 'f32' }), vo = Tensor.empty([L, s.H, s.D], { dtype: 'f32' });
  ko.write(new Float32Array(L * s.H * s.D).fill(NaN));
  vo.write(new Float32Array(L * s.H * s.D).fill(NaN));
  kvqDequantize(ko, vo, s.cache, s.cal, s.pageTable, b);
  return { k: (await ko.toFloat32()), v: (await vo.toFloat32()) };
}

describe('kvquant (CPU)', () => {
  // slot counts: the default's, and what calibrate-kv's per-layer allocation gives (none, keys or values only)
  for (const bits of [2, 3, 4]) for (const [nk, nv] of [[2, 1], [0, 0], [8, 0], [0, 3]]) {
    test(`round trip: codebook values, exact outliers and sink (bits ${bits}, slots ${nk} + ${nv})`, async () => {
      const sink = 3;
      const s = buildCache({ bits, H: 2, D: 80, lens: [37, 5, 19], nk, nv, sink, pageSize: 8, seed: 100 + bits });
      for (let b = 0; b < s.lens.length; b++) {
        const { k, v } = await dequantAll(s, b);
        const HD = s.H * s.D;
        for (let t = 0; t < s.lens[b]; t++)
          for (let h = 0; h < s.H; h++) {
            const kin = s.keys[b].subarray(t * HD + h * s.D, t * HD + (h + 1) * s.D);
            const vin = s.values[b].subarray(t * HD + h * s.D, t * HD + (h + 1) * s.D);
            const kg = k.subarray(t * HD + h * s.D, t * HD + (h + 1) * s.D), vg = v.subarray(t * HD + h * s.D, t * HD + (h + 1) * s.D);
            const want = t < sink ? { k: kin, v: vin } : oracleRoundTrip(s, kin, vin, h, nk, nv);
            expect(Array.from(kg)).toEqual(Array.from(want.k));
            expect(Array.from(vg)).toEqual(Array.from(want.v));
          }
      }
    });
  }

  const cases: Array<[number, number, number, number[], number, [number, number]?]> = [
    // [Hq, H, D, lens, bits, [key slots, value slots] (default 2 + 2)]
    [2, 2, 64, [21], 4],
    [6, 2, 80, [9, 33, 1], 3],
    [8, 2, 128, [40, 17], 2],
    [8, 1, 64, [26, 3, 12], 4],
    [4, 2, 64, [30, 9], 2, [0, 0]],
    [4, 1, 96, [25], 3, [8, 0]],
    [6, 3, 64, [18, 2], 2, [0, 3]],
    // 2- and 4-bit codes read straight from their bytes at head dims 80 and 96 (the CPU's fast paths)
    [3, 1, 80, [37], 2],
    [4, 2, 96, [20, 5], 4],
    [2, 1, 80, [29], 4, [1, 1]],
  ];
  for (const [Hq, H, D, lens, bits, [nk, nv] = [2, 2]] of cases) {
    test(`kvqAttention = attention over kvqDequantize (Hq ${Hq}, H ${H}, D ${D}, lens ${lens}, ${bits}-bit, slots ${nk} + ${nv})`, async () => {
      const s = buildCache({ bits, H, D, lens, nk, nv, sink: 2, pageSize: 16, seed: Hq * 1000 + D + bits });
      const B = lens.length, r = rng(7 + D);
      const q = randn(B * Hq * D, r), inv = invFreqFor(D), scale = 1 / Math.sqrt(D);
      for (const dtype of ['f32', 'f16'] as const) {
        const qt = Tensor.from(q, [B, Hq, D], { dtype });
        const out = Tensor.empty([B, Hq, D], { dtype });
        out.write(dtype === 'f32' ? new Float32Array(B * Hq * D).fill(NaN) : new Uint16Array(B * Hq * D).fill(0x7e00));
        kvqAttention(out, qt, s.cache, s.cal, s.pageTable, s.seqLens, s.cuQ, Tensor.from(inv, [D / 2]), scale, 1, Math.max(...lens));
        const got = await out.toFloat32();
        const qh = await qt.toFloat32();
        for (let b = 0; b < B; b++) {
          const { k, v } = await dequantAll(s, b);
          const want = oracleAttention(qh.subarray(b * Hq * D, (b + 1) * Hq * D), k, v, lens[b], H, Hq, D, inv, scale);
          expect(relErr(got.subarray(b * Hq * D, (b + 1) * Hq * D), want)).toBeLessThan(2e-3);
        }
      }
    });
  }

  // The CPU op keeps its cos/sin table between calls (every layer and step asks for the same one,
  // one position longer): calls that alternate RoPE frequencies and lengths each get their own.
  test('the cos/sin table kept between calls follows the frequencies and lengths asked for', async () => {
    const H = 1, Hq = 2, D = 64;
    for (const [L, theta] of [[30, 10000], [100, 500000], [300, 10000], [40, 10000], [70, 500000], [520, 10000]]) {
      const s = buildCache({ bits: 4, H, D, lens: [L], nk: 1, nv: 1, sink: 1, pageSize: 16, seed: L + theta });
      const r = rng(L), q = randn(Hq * D, r), inv = invFreqFor(D, theta), scale = 0.125;
      const out = Tensor.empty([1, Hq, D]);
      out.write(new Float32Array(Hq * D).fill(NaN));
      kvqAttention(out, Tensor.from(q, [1, Hq, D]), s.cache, s.cal, s.pageTable, s.seqLens, s.cuQ, Tensor.from(inv, [D / 2]), scale, 1, L);
      const { k, v } = await dequantAll(s, 0);
      expect(relErr(await out.toFloat32(), oracleAttention(q, k, v, L, H, Hq, D, inv, scale))).toBeLessThan(2e-3);
    }
  });

  test('several query rows per sequence are causal', async () => {
    const H = 1, Hq = 3, D = 64, lens = [20, 11];
    const s = buildCache({ bits: 3, H, D, lens, nk: 1, nv: 1, sink: 1, pageSize: 4, seed: 5 });
    const nq = [4, 2], N = 6, r = rng(9);
    const q = randn(N * Hq * D, r), inv = invFreqFor(D), scale = 0.125;
    const out = Tensor.empty([N, Hq, D]);
    kvqAttention(out, Tensor.from(q, [N, Hq, D]), s.cache, s.cal, s.pageTable, s.seqLens, Tensor.from(Int32Array.from([0, 4, 6]), [3]),
      Tensor.from(inv, [D / 2]), scale, 4, 20);
    const got = await out.toFloat32();
    let row = 0;
    for (let b = 0; b < 2; b++) {
      const { k, v } = await dequantAll(s, b);
      for (let j = 0; j < nq[b]; j++, row++) {
        const L = lens[b] - nq[b] + j + 1;
        const want = oracleAttention(q.subarray(row * Hq * D, (row + 1) * Hq * D), k, v, L, H, Hq, D, inv, scale);
        expect(relErr(got.subarray(row * Hq * D, (row + 1) * Hq * D), want)).toBeLessThan(2e-3);
      }
    }
  });

  test('bits outside 2..4 and mismatched shapes are coded errors', () => {
    expect(() => new KvqCache({ pages: 1, pageSize: 4, kvHeads: 1, headDim: 64, bits: 5, keyOutliers: 1, valueOutliers: 1, sink: 0, maxSeqs: 1 }))
      .toThrow(expect.objectContaining({ code: 'ERR_ARG' }));
    const s = buildCache({ bits: 4, H: 1, D: 64, lens: [3], nk: 1, nv: 1, sink: 0, pageSize: 4, seed: 1 });
    const args = s.cache.args(s.cal);
    const k = Tensor.empty([1, 1, 64], { dtype: 'f16' });
    for (const bad of [1, 5]) {
      const a = [...args];
      a[9] = bad;
      let err: unknown;
      try { native().ops.kvqAppend(...a, k.native, k.native, s.pageTable.native, s.seqLens.native, s.cuQ.native); } catch (e) { err = e; }
      expect(isSqueezeError(err, 'ERR_ARG')).toBe(true);
    }
    const wrongK = Tensor.empty([1, 2, 64], { dtype: 'f16' });
    let err: unknown;
    try { native().ops.kvqAppend(...args, wrongK.native, wrongK.native, s.pageTable.native, s.seqLens.native, s.cuQ.native); } catch (e) { err = e; }
    expect(isSqueezeError(err, 'ERR_SHAPE')).toBe(true);
  });

  test('bytes per token', () => {
    // 2-bit, D=128, 2 + 2 outlier slots: 32 + 32 code bytes + 16 metadata bytes per head
    expect(kvBytesPerToken({ layers: 32, kvHeads: 8, headDim: 128, bits: 2, keyOutliers: 2, valueOutliers: 2 })).toBe(32 * 8 * 80);
    expect(kvBytesPerToken({ layers: 1, kvHeads: 1, headDim: 128, bits: 3, keyOutliers: 2, valueOutliers: 2 })).toBe(112);
  });
});
