/**
 * Dense GEMV/GEMM suite: our matmul against cuBLAS in the same process.
 * GEMV: batch 1, 4, 16 over LLaMA-7B/70B projection shapes (N x K = out x in), f16 and bf16;
 * bytes = weights + activations + outputs. GEMM: 2048 x 4096 x 4096 (prefill), TFLOP/s.
 * The `api` suite times the public TypeScript path (a small CPU matmul) with tinybench.
 */
import { Bench } from 'tinybench';
import { Tensor, DType } from '../ts/tensor';
import { matmul, cublasMatmul, cublasAvailable } from '../ts/ops';
import { BenchContext, BenchResult, randomTensor, row, setsFor, timeCuda, Timing } from './harness';

const GEMV_SHAPES: Array<[number, number]> = [
  [4096, 4096],
  [4096, 11008],
  [11008, 4096],
  [8192, 8192],
  [8192, 28672],
  [28672, 8192],
];

async function timePair(
  ctx: BenchContext,
  M: number,
  N: number,
  K: number,
  dtype: DType,
): Promise<{ ours: Timing; base: Timing | null; baseErr?: string }> {
  const device = ctx.device!;
  const bytesPerSet = 2 * (N * K + M * K);
  const sets = setsFor(bytesPerSet, ctx.l2Bytes);
  const xs: Tensor[] = [], ws: Tensor[] = [];
  for (let s = 0; s < sets; s++) {
    xs.push(await randomTensor([M, K], dtype, device));
    ws.push(await randomTensor([N, K], dtype, device, 0.02));
  }
  const y = Tensor.empty([M, N], { dtype, device });
  const iters = ctx.quick ? 8 : Math.max(2 * sets, 20);
  const repeats = ctx.quick ? 5 : 15;
  try {
    const ours = await timeCuda({ device, iters, repeats, fn: (i) => matmul(y, xs[i % sets], ws[i % sets]) });
    let base: Timing | null = null;
    let baseErr: string | undefined;
    if (cublasAvailable()) {
      try {
        base = await timeCuda({ device, iters, repeats, fn: (i) => cublasMatmul(y, xs[i % sets], ws[i % sets]) });
      } catch (e) {
        baseErr = (e as Error).message;
      }
    } else baseErr = 'cuBLAS not available';
    return { ours, base, baseErr };
  } finally {
    for (const t of [...xs, ...ws, y]) t.dispose();
  }
}

export async function benchGemv(ctx: BenchContext): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const out: BenchResult[] = [];
  // SQUEEZELM_BENCH_DTYPES=f16 limits a full run to one dtype (a shorter run).
  const only = process.env.SQUEEZELM_BENCH_DTYPES?.split(',').filter(Boolean) as DType[] | undefined;
  const dtypes: DType[] = only?.length ? only : ctx.quick ? ['f16'] : ['f16', 'bf16'];
  const shapes = ctx.quick ? GEMV_SHAPES.filter(([n, k]) => n === 8192 && k === 8192) : GEMV_SHAPES;
  for (const dtype of dtypes)
    for (const M of [1, 4, 16])
      for (const [N, K] of shapes) {
        const { ours, base, baseErr } = await timePair(ctx, M, N, K, dtype);
        const r = row(ctx, 'gemv', `${dtype} M=${M} ${N}x${K}`, ours, {
          bytes: 2 * (N * K + M * K + M * N),
          flops: 2 * M * N * K,
          baseline: 'cuBLAS',
          base,
          note: baseErr,
        });
        ctx.log(`gemv ${r.name}: ${r.timeUs.toFixed(2)} us, ${(100 * (r.fracCopy ?? 0)).toFixed(0)}% of copy BW, speedup vs cuBLAS ${r.speedup?.toFixed(2) ?? '-'}`);
        out.push(r);
      }
  for (const dtype of dtypes) {
    const [M, N, K] = [2048, 4096, 4096];
    const { ours, base, baseErr } = await timePair(ctx, M, N, K, dtype);
    const r = row(ctx, 'gemm', `${dtype} ${M}x${N}x${K}`, ours, {
      bytes: 2 * (N * K + M * K + M * N),
      flops: 2 * M * N * K,
      baseline: 'cuBLAS',
      base,
      note: baseErr,
    });
    ctx.log(`gemm ${r.name}: ${r.tflops?.toFixed(1)} TFLOP/s, speedup vs cuBLAS ${r.speedup?.toFixed(2) ?? '-'}`);
    out.push(r);
  }
  return out;
}

/**
 * Launch-shape sweep of the GEMV (f16): each knob setting the launcher reads from the
 * environment, at batch 1, 4 and 16 over the suite's shapes, so the defaults can be chosen
 * from one run on a new GPU. Rows are named `<knobs> M=<m> NxK`.
 */
export async function benchGemvTune(ctx: BenchContext): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const out: BenchResult[] = [];
  const fma = (r: string, u: string) => ({ M: [1], env: { SQUEEZELM_GEMV_TC_MIN_M: '3', SQUEEZELM_GEMV_R: r, SQUEEZELM_GEMV_U: u } });
  const configs: Array<{ M: number[]; env: Record<string, string> }> = [
    { M: [1, 4, 16], env: {} },
    fma('1', '4'), fma('1', '8'), fma('2', '2'), fma('2', '4'), fma('2', '8'), fma('4', '2'), fma('4', '4'),
    ...['1', '2'].flatMap((nt) => ['2', '4'].map((u) => ({ M: [4, 16], env: { SQUEEZELM_GEMV_NT: nt, SQUEEZELM_GEMV_TC_U: u } }))),
    { M: [4, 16], env: { SQUEEZELM_GEMV_NT: '4', SQUEEZELM_GEMV_TC_U: '2' } },
    // fewer blocks per SM than fit (persistent grid)
    ...['2', '3'].map((b) => ({ M: [4, 16], env: { SQUEEZELM_GEMV_TC_BPS: b } })),
    // the TMA GEMV on and off, its tile height, ring depth and blocks per SM (sm_90 devices)
    { M: [1, 4, 16], env: { SQUEEZELM_GEMV_TMA: '0' } },
    ...([['128', '4', '1'], ['128', '6', '1'], ['128', '4', '2'], ['64', '8', '1']] as const).map(([r, st, bps]) => ({
      M: [1, 4, 16],
      env: {
        SQUEEZELM_GEMV_TMA: '1', SQUEEZELM_GEMV_TMA_R: r, SQUEEZELM_GEMV_TMA_S: st,
        ...(bps !== '1' ? { SQUEEZELM_GEMV_TMA_BPS: bps } : {}),
      },
    })),
    // one block per tile over the whole K (no split tiles), deeper rings
    ...([['128', '4'], ['128', '8'], ['128', '12'], ['64', '8'], ['64', '16']] as const).map(([r, st]) => ({
      M: [4, 16],
      env: { SQUEEZELM_GEMV_TMA: '1', SQUEEZELM_GEMV_TMA_R: r, SQUEEZELM_GEMV_TMA_S: st, SQUEEZELM_GEMV_TMA_WHOLE: '1' },
    })),
  ];
  const knobsOf = (env: Record<string, string>) =>
    Object.entries(env).map(([k, v]) => `${k.replace('SQUEEZELM_GEMV_', '')}=${v}`).join(' ') || 'default';
  // SQUEEZELM_TUNE_FILTER=default,TMA keeps the settings whose knobs contain one of the words.
  const filter = (process.env.SQUEEZELM_TUNE_FILTER ?? '').split(',').filter(Boolean);
  const chosen = filter.length ? configs.filter((c) => filter.some((f) => knobsOf(c.env).includes(f))) : configs;
  // SQUEEZELM_TUNE_M=4,16 limits the sweep to some batch sizes.
  const tuneM = (process.env.SQUEEZELM_TUNE_M ?? '1,4,16').split(',').map(Number).filter((m) => m >= 1 && m <= 16);
  for (const [N, K] of GEMV_SHAPES) {
    const dsets = setsFor(2 * N * K, ctx.l2Bytes);
    const ws: Tensor[] = [];
    for (let s = 0; s < dsets; s++) ws.push(await randomTensor([N, K], 'f16', ctx.device, 0.02));
    for (const M of tuneM) {
      const xs: Tensor[] = [];
      for (let s = 0; s < dsets; s++) xs.push(await randomTensor([M, K], 'f16', ctx.device));
      const y = Tensor.empty([M, N], { dtype: 'f16', device: ctx.device });
      if (cublasAvailable()) {
        const t = await timeCuda({ device: ctx.device, iters: Math.max(2 * dsets, 20), repeats: 7, fn: (i) => cublasMatmul(y, xs[i % dsets], ws[i % dsets]) });
        const r = row(ctx, 'gemv-tune', `cuBLAS M=${M} ${N}x${K}`, t, { bytes: 2 * (N * K + M * K + M * N) });
        ctx.log(`gemv-tune ${r.name}: ${r.timeUs.toFixed(2)} us, ${(100 * (r.fracCopy ?? 0)).toFixed(0)}%`);
        out.push(r);
      }
      for (const c of chosen.filter((c) => c.M.includes(M))) {
        Object.assign(process.env, c.env);
        try {
          const t = await timeCuda({ device: ctx.device, iters: Math.max(2 * dsets, 20), repeats: 7, fn: (i) => matmul(y, xs[i % dsets], ws[i % dsets]) });
          const knobs = knobsOf(c.env);
          const r = row(ctx, 'gemv-tune', `${knobs} M=${M} ${N}x${K}`, t, { bytes: 2 * (N * K + M * K + M * N) });
          ctx.log(`gemv-tune ${r.name}: ${r.timeUs.toFixed(2)} us, ${(100 * (r.fracCopy ?? 0)).toFixed(0)}%`);
          out.push(r);
        } finally {
          for (const k of Object.keys(c.env)) delete process.env[k];
        }
      }
      xs.forEach((t) => t.dispose());
      y.dispose();
    }
    ws.forEach((t) => t.dispose());
  }
  return out;
}

/** The public API path on the CPU: wrapper checks + native dispatch + a small matmul. */
export async function benchApi(ctx: BenchContext): Promise<BenchResult[]> {
  const out: BenchResult[] = [];
  const cases: Array<[number, number, number, DType]> = [
    [1, 256, 256, 'f16'],
    [64, 256, 256, 'f16'],
    [256, 1024, 256, 'f32'],
  ];
  const bench = new Bench({ time: ctx.quick ? 100 : 500 });
  const made: Tensor[] = [];
  for (const [M, N, K, wd] of cases) {
    const x = await randomTensor([M, K], 'f32', 'cpu');
    const w = await randomTensor([N, K], wd, 'cpu');
    const y = Tensor.empty([M, N], { dtype: 'f32' });
    made.push(x, w, y);
    bench.add(`cpu matmul M=${M} ${N}x${K} w ${wd}`, async () => {
      matmul(y, x, w);
      await y.toArray();  // waits for the CPU queue: the call's full latency
    });
  }
  await bench.run();
  bench.tasks.forEach((task, i) => {
    const res = task.result as unknown as { latency?: { p50: number; min: number; max: number; p75: number } };
    if (!res?.latency) return;
    const [M, N, K] = cases[i];
    const us = res.latency.p50 * 1000;
    const r: BenchResult = {
      suite: 'api',
      name: task.name,
      timing: 'cpu',
      timeUs: us,
      p10Us: res.latency.min * 1000,
      p90Us: res.latency.p75 * 1000,
      flops: 2 * M * N * K,
      tflops: (2 * M * N * K) / (us * 1e-6) / 1e12,
      note: 'includes reading y back; p10/p90 columns: min/p75',
    };
    ctx.log(`api ${r.name}: ${us.toFixed(1)} us (${((r.tflops ?? 0) * 1000).toFixed(1)} GFLOP/s)`);
    out.push(r);
  });
  for (const t of made) t.dispose();
  return out;
}
