/**
 * SqueezeLLM LUT GEMV/GEMM suite: 3/4-bit dense-and-sparse (0.45% outliers) and dense-only
 * against our fp16 matmul and cuBLAS in the same run. Inputs rotate over enough weight sets to
 * exceed 2x L2; bytes = packed codes + tables + outliers + x + y.
 */
import { Tensor } from '../ts/tensor';
import { matmul, cublasMatmul, cublasAvailable, fillRandomInt, lutMatmul } from '../ts/ops';
import { BenchContext, BenchResult, randomTensor, row, setsFor, timeCuda, Timing } from './harness';

const SHAPES: Array<[number, number]> = [[4096, 4096], [4096, 11008], [8192, 8192], [8192, 28672], [28672, 8192]];
const OUTLIER_SHARE = 0.0045;

interface LutSet { q: Tensor; lut: Tensor; rows?: Tensor; cols?: Tensor; vals?: Tensor; bytes: number }

async function makeSet(N: number, K: number, bits: number, sparse: boolean, device: string, seed: number): Promise<LutSet> {
  const q = Tensor.empty([Math.ceil(K / 32) * bits, N], { dtype: 'i32', device });
  fillRandomInt(q, seed);
  const lut = await randomTensor([N, 1 << bits], 'f16', device, 0.02);
  let bytes = q.byteLength + lut.byteLength;
  if (!sparse) return { q, lut, bytes };
  const per = Math.max(1, Math.round(OUTLIER_SHARE * K));
  const rows = new Int32Array(N + 1), cols = new Int32Array(N * per);
  for (let n = 0; n < N; n++) {
    rows[n + 1] = (n + 1) * per;
    for (let j = 0; j < per; j++) cols[n * per + j] = (j * Math.floor(K / per) + n * 7) % K;
  }
  const r = Tensor.from(rows, [N + 1], { device }), c = Tensor.from(cols, [N * per], { device });
  const v = await randomTensor([N * per], 'f16', device, 0.1);
  bytes += r.byteLength + c.byteLength + v.byteLength;
  return { q, lut, rows: r, cols: c, vals: v, bytes };
}

export async function benchLut(ctx: BenchContext): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const device = ctx.device;
  const out: BenchResult[] = [];
  const shapes = ctx.quick ? SHAPES.filter(([n, k]) => n === 8192 && k === 8192) : SHAPES;
  const cases: Array<[number, number, number]> = [];
  for (const [N, K] of shapes) cases.push([1, N, K]);
  for (const M of [2, 4, 8, 16]) cases.push([M, 8192, 8192]);
  for (const [M, N, K] of cases) {
    // dense fp16 baselines
    const dsets = setsFor(2 * N * K, ctx.l2Bytes);
    const ws: Tensor[] = [], xs: Tensor[] = [];
    for (let s = 0; s < dsets; s++) { ws.push(await randomTensor([N, K], 'f16', device, 0.02)); xs.push(await randomTensor([M, K], 'f16', device)); }
    const y = Tensor.empty([M, N], { dtype: 'f16', device });
    const iters = ctx.quick ? 8 : 40, repeats = ctx.quick ? 5 : 15;
    const dense = await timeCuda({ device, iters, repeats, fn: (i) => matmul(y, xs[i % dsets], ws[i % dsets]) });
    let cublas: Timing | null = null;
    if (cublasAvailable()) {
      try { cublas = await timeCuda({ device, iters, repeats, fn: (i) => cublasMatmul(y, xs[i % dsets], ws[i % dsets]) }); } catch { cublas = null; }
    }
    ws.forEach((t) => t.dispose());
    for (const bits of [3, 4])
      for (const sparse of [true, false]) {
        const probe = await makeSet(N, K, bits, sparse, device, 1);
        const sets = setsFor(probe.bytes, ctx.l2Bytes);
        const ls: LutSet[] = [probe];
        for (let s = 1; s < sets; s++) ls.push(await makeSet(N, K, bits, sparse, device, s + 1));
        const t = await timeCuda({
          device, iters, repeats,
          fn: (i) => { const l = ls[i % sets]; lutMatmul(y, xs[i % dsets], l.q, l.lut, l.rows, l.cols, l.vals, bits); },
        });
        const name = `${bits}-bit ${sparse ? 'D+S' : 'dense'} M=${M} ${N}x${K}`;
        const r = row(ctx, 'lut', name, t, { bytes: probe.bytes + 2 * (M * K + M * N), flops: 2 * M * N * K, baseline: 'fp16 matmul', base: dense,
          note: cublas ? `cuBLAS ${cublas.graph?.median.toFixed(2) ?? cublas.plain.median.toFixed(2)} us` : 'cuBLAS not available' });
        ctx.log(`lut ${name}: ${r.timeUs.toFixed(2)} us, ${(100 * (r.fracCopy ?? 0)).toFixed(0)}% of copy BW, vs fp16 ${r.speedup?.toFixed(2) ?? '-'}x`);
        out.push(r);
        ls.forEach((l) => [l.q, l.lut, l.rows, l.cols, l.vals].forEach((x) => x?.dispose()));
      }
    xs.forEach((t) => t.dispose());
    y.dispose();
  }
  return out;
}
