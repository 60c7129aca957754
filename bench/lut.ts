/**
 * SqueezeLLM LUT GEMV/GEMM suite (lutMatmulPacked): 3/4-bit dense-and-sparse (0.45% outliers)
 * and dense-only, against our fp16 matmul and cuBLAS in the same run.
 * Cases: M = 1 at five LLaMA shapes and the two K = 4096 fused projections of LLaMA-2-7B decode;
 * M = 16 at those two projections; M = 2/4/8/16/64 and prefill Ms at 8192x8192 and at the decode
 * projections (prompt length 512), where the note also gives the tiled LUT GEMM's time (the path
 * the dense copy of the weight replaces past M = 64, csrc/kernels/lut_gemm/dense_path.cuh). Rows
 * past M = 64 are timed with plain launches, every column of them alike: the dense copy is a
 * temporary, which a graph cannot capture (a capture takes the tiled GEMM), and the runtime runs
 * prefill uncaptured.
 * Inputs rotate over enough weight sets to exceed 2x L2; bytes = packed codes + tables +
 * outliers (rows, cols, vals) + x + y. Notes give cuBLAS, the cost of the outliers over
 * dense-only, for batch M the time over the M = 1 time of the same weights, and at M = 1 the time
 * of the same launches each naming the next one's weight set (`prefetchNext`, as the decode step
 * names its next projection; the row's own time names none).
 * SQUEEZELM_BENCH_LUT_MAX_M=64 runs the decode rows only (no prefill Ms); SQUEEZELM_LUT_SWEEP=0 leaves
 * out the refill on/off rows.
 */
import { Tensor } from '../ts/tensor';
import { matmul, cublasMatmul, cublasAvailable, fillRandomInt, lutMatmulPacked, lutPackedShape } from '../ts/ops';
import { BenchContext, BenchResult, bound, randomTensor, row, setsFor, timeCuda, Timing } from './harness';

const SHAPES: Array<[number, number]> = [[4096, 4096], [4096, 11008], [8192, 8192], [8192, 28672], [28672, 8192]];
// LLaMA-2-7B decode's fused projections at K = 4096 (q|k|v, gate|up): many row groups per block, each
// of only 4 code units per warp.
const DECODE_SHAPES: Array<[number, number]> = [[12288, 4096], [22016, 4096]];
const BATCH = [2, 4, 8, 16, 64];
const PREFILL = [96, 128, 256, 512, 2048];
// a 512-token prompt through the decode projections (and down, 4096x11008)
const PROMPT = 512;
const PROMPT_SHAPES: Array<[number, number]> = [...DECODE_SHAPES, [4096, 11008]];
const OUTLIER_SHARE = 0.0045;

export interface LutSet { q: Tensor; lut: Tensor; rows?: Tensor; cols?: Tensor; vals?: Tensor; bytes: number }

/** A weight set of the suite (also the profiler's target, scripts/ncu-target.js). */
export async function makeSet(N: number, K: number, bits: number, sparse: boolean, device: string, seed: number): Promise<LutSet> {
  const q = Tensor.empty(lutPackedShape(N, K, bits), { dtype: 'i32', device });
  fillRandomInt(q, seed);
  const lut = await randomTensor([N, 1 << bits], 'f16', device, 0.02);
  let bytes = q.byteLength + lut.byteLength;
  if (!sparse) return { q, lut, bytes };
  const per = Math.max(1, Math.round(OUTLIER_SHARE * K));
  const rows = new Int32Array(N + 1), cols = new Int32Array(N * per);
  for (let n = 0; n < N; n++) {
    rows[n + 1] = (n + 1) * per;
    for (let j = 0; j < per; j++) cols[n * per + j] = (j * Math.floor(K / per) + n * 7) % K;
    cols.subarray(n * per, (n + 1) * per).sort();  // increasing within a row, as checkOutlierCsr wants
  }
  const r = Tensor.from(rows, [N + 1], { device }), c = Tensor.from(cols, [N * per], { device });
  const v = await randomTensor([N * per], 'f16', device, 0.1);
  bytes += r.byteLength + c.byteLength + v.byteLength;
  return { q, lut, rows: r, cols: c, vals: v, bytes };
}

const us = (t: Timing) => bound(t).s.median;

export async function benchLut(ctx: BenchContext): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const device = ctx.device;
  const out: BenchResult[] = [];
  const shapes = ctx.quick ? SHAPES.filter(([n, k]) => n === 8192 && k === 8192) : SHAPES;
  const cases: Array<[number, number, number]> = [];
  for (const [N, K] of shapes) cases.push([1, N, K]);
  if (!ctx.quick) for (const [N, K] of DECODE_SHAPES) cases.push([1, N, K]);
  // the same projections for a batch of 16 decoding sequences
  if (!ctx.quick) for (const [N, K] of DECODE_SHAPES) cases.push([16, N, K]);
  for (const M of ctx.quick ? [4, 16] : BATCH) cases.push([M, 8192, 8192]);
  if (!ctx.quick) for (const M of PREFILL) cases.push([M, 8192, 8192]);
  if (!ctx.quick) for (const [N, K] of PROMPT_SHAPES) cases.push([PROMPT, N, K]);
  const single = new Map<string, number>();  // M = 1 time at 8192x8192 per variant
  // SQUEEZELM_BENCH_LUT_MAX_M: only the cases up to that many rows of x (a shorter run of the decode rows)
  const maxM = Number(process.env.SQUEEZELM_BENCH_LUT_MAX_M) || Infinity;  // (unset or 0: every case)
  for (const [M, N, K] of cases) {
    if (M > maxM) continue;
    const big = M > 64;
    // dense fp16 baselines
    const dsets = big ? 1 : setsFor(2 * N * K, ctx.l2Bytes);
    const ws: Tensor[] = [], xs: Tensor[] = [];
    for (let s = 0; s < dsets; s++) { ws.push(await randomTensor([N, K], 'f16', device, 0.02)); xs.push(await randomTensor([M, K], 'f16', device)); }
    const y = Tensor.empty([M, N], { dtype: 'f16', device });
    const iters = big ? 4 : ctx.quick ? 8 : 40, repeats = big ? 5 : ctx.quick ? 5 : 15, noGraph = big;
    const dense = await timeCuda({ device, iters, repeats, noGraph, fn: (i) => matmul(y, xs[i % dsets], ws[i % dsets]) });
    let cublas: Timing | null = null;
    if (cublasAvailable()) {
      try { cublas = await timeCuda({ device, iters, repeats, noGraph, fn: (i) => cublasMatmul(y, xs[i % dsets], ws[i % dsets]) }); } catch { cublas = null; }
    }
    ws.forEach((t) => t.dispose());
    for (const bits of [4, 3])
      for (const sparse of [false, true]) {
        const probe = await makeSet(N, K, bits, sparse, device, 1);
        const sets = big ? 1 : setsFor(probe.bytes, ctx.l2Bytes);
        const ls: LutSet[] = [probe];
        for (let s = 1; s < sets; s++) ls.push(await makeSet(N, K, bits, sparse, device, s + 1));
        const t = await timeCuda({
          device, iters, repeats, noGraph,
          fn: (i) => { const l = ls[i % sets]; lutMatmulPacked(y, xs[i % dsets], l.q, l.lut, l.rows, l.cols, l.vals, bits); },
        });
        const variant = `${bits}-bit ${sparse ? 'D+S' : 'dense'}`;
        const name = `${variant} M=${M} ${N}x${K}`;
        const notes: string[] = [];
        if (cublas) notes.push(`cuBLAS ${us(cublas).toFixed(2)} us (${(us(cublas) / us(t)).toFixed(2)}x)`);
        else notes.push('cuBLAS not available');
        if (big) {
          // the tiled LUT GEMM on the same inputs (the dense-copy path off)
          process.env.SQUEEZELM_LUT_DENSE_MIN_M = '0';
          try {
            const tt = await timeCuda({
              device, iters, repeats, noGraph,
              fn: (i) => { const l = ls[i % sets]; lutMatmulPacked(y, xs[i % dsets], l.q, l.lut, l.rows, l.cols, l.vals, bits); },
            });
            notes.push(`tiled LUT GEMM ${us(tt).toFixed(2)} us (${(us(tt) / us(t)).toFixed(2)}x this call's time)`);
          } finally {
            delete process.env.SQUEEZELM_LUT_DENSE_MIN_M;
          }
        }
        if (M === 1) {
          // The same launches, each naming the next one's weight set (prefetchNext: its first codes into
          // L2 at the end of this launch), as the decode step names its next projection.
          const tn = await timeCuda({
            device, iters, repeats, noGraph,
            fn: (i) => {
              const l = ls[i % sets];
              lutMatmulPacked(y, xs[i % dsets], l.q, l.lut, l.rows, l.cols, l.vals, bits, { prefetchNext: ls[(i + 1) % sets].q });
            },
          });
          notes.push(`next set named (prefetchNext) ${us(tn).toFixed(2)} us (${(us(dense) / us(tn)).toFixed(2)}x)`);
        }
        if (!sparse) single.set(`${name}:dense`, us(t));
        else {
          const d = single.get(`${variant.replace('D+S', 'dense')} M=${M} ${N}x${K}:dense`);
          if (d) notes.push(`outliers +${(100 * (us(t) / d - 1)).toFixed(1)}% over dense-only`);
        }
        if (M === 1 && N === 8192 && K === 8192) single.set(variant, us(t));
        else if (N === 8192 && K === 8192 && single.has(variant)) notes.push(`${(us(t) / single.get(variant)!).toFixed(2)}x the M=1 time`);
        const r = row(ctx, 'lut', name, t, {
          bytes: probe.bytes + 2 * (M * K + M * N), flops: 2 * M * N * K, baseline: 'fp16 matmul', base: dense, note: notes.join('; '),
        });
        ctx.log(`lut ${name}: ${r.timeUs.toFixed(2)} us, ${(100 * (r.fracCopy ?? 0)).toFixed(0)}% of copy BW, vs fp16 ${r.speedup?.toFixed(2) ?? '-'}x; ${r.note}`);
        out.push(r);
        // The cross-group code refill forced on and off (SQUEEZELM_LUT_XGROUP; the default picks one
        // by bits and M, see csrc/kernels/lut_gemm/lut_gemm.cu), same process, D+S rows at M <= 8.
        const decodeShape = M === 1 && DECODE_SHAPES.some(([n, k]) => n === N && k === K);
        const sweep = M <= 8 ? ['1', '0'] : [];
        if (sparse && ((N === 8192 && K === 8192) || decodeShape) && !ctx.quick && process.env.SQUEEZELM_LUT_SWEEP !== '0') {
          // The default's output on set 0, to check the other setting against.
          const y0 = Tensor.empty([M, N], { dtype: 'f16', device });
          lutMatmulPacked(y0, xs[0], ls[0].q, ls[0].lut, ls[0].rows, ls[0].cols, ls[0].vals, bits);
          const want = await y0.toFloat32();
          y0.dispose();
          for (const v of sweep) {
            process.env.SQUEEZELM_LUT_XGROUP = v;
            try {
              const y1 = Tensor.empty([M, N], { dtype: 'f16', device });
              lutMatmulPacked(y1, xs[0], ls[0].q, ls[0].lut, ls[0].rows, ls[0].cols, ls[0].vals, bits);
              const got = await y1.toFloat32();
              y1.dispose();
              let num = 0, den = 0;
              for (let i = 0; i < want.length; i++) { num += (got[i] - want[i]) ** 2; den += want[i] ** 2; }
              const diff = Math.sqrt(num / Math.max(den, 1e-30));
              const tv = await timeCuda({
                device, iters, repeats,
                fn: (i) => { const l = ls[i % sets]; lutMatmulPacked(y, xs[i % dsets], l.q, l.lut, l.rows, l.cols, l.vals, bits); },
              });
              const label = `${name} refill ${v === '1' ? 'on' : 'off'}`;
              const rv = row(ctx, 'lut', label, tv, {
                bytes: probe.bytes + 2 * (M * K + M * N), baseline: 'fp16 matmul', base: dense,
                note: `rel diff vs default ${Number.isFinite(diff) ? diff.toExponential(1) : 'NaN'}${diff < 1e-3 ? '' : ' MISMATCH'}`,
              });
              ctx.log(`lut ${label}: ${rv.timeUs.toFixed(2)} us, ${(100 * (rv.fracCopy ?? 0)).toFixed(0)}% of copy BW`);
              out.push(rv);
            } finally {
              delete process.env.SQUEEZELM_LUT_XGROUP;
            }
          }
        }
        ls.forEach((l) => [l.q, l.lut, l.rows, l.cols, l.vals].forEach((x) => x?.dispose()));
      }
    xs.forEach((t) => t.dispose());
    y.dispose();
  }
  return out;
}
