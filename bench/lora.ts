/**
 * Batched LoRA (loraApply) at LLaMA-2-7B's four projection sites, f16, against our fp16
 * projection of the same rows (matmul) in the same run: what an adapter adds to a decode step.
 * Batches of 1, 8 and 32 rows: every row on one rank-16 adapter, or the rows spread over four
 * adapters of ranks 8 / 16 / 32 / 64 (the heterogeneous batch S-LoRA is about). Bytes = the
 * distinct adapters' A and Bt rows read + x + y read and written; pools rotate past twice the L2.
 */
import { Tensor } from '../ts/tensor';
import { loraApply, matmul } from '../ts/ops';
import { BenchContext, BenchResult, randomTensor, row, setsFor, timeCuda } from './harness';

const SITES: Array<[string, number, number]> = [  // name, K (in), N (out)
  ['q|k|v', 4096, 12288],
  ['o', 4096, 4096],
  ['gate|up', 4096, 22016],
  ['down', 11008, 4096],
];

export async function benchLora(ctx: BenchContext): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const device = ctx.device, out: BenchResult[] = [];
  const S = 4, maxRank = 64, R = S * maxRank;
  const ranks = [8, 16, 32, 64];
  const desc = Tensor.from(Int32Array.from(ranks.flatMap((r, s) => [s * maxRank, r])), [S, 2], { device });
  const descOne = Tensor.from(Int32Array.from([0, 16, 64, 0, 128, 0, 192, 0]), [S, 2], { device });
  const scale = Tensor.from(new Float32Array(S).fill(1), [S], { dtype: 'f32', device });
  try {
    for (const [site, K, N] of ctx.quick ? SITES.slice(0, 1) : SITES) {
      const sets = setsFor(2 * R * (K + N), ctx.l2Bytes);
      const as: Tensor[] = [], bts: Tensor[] = [];
      for (let i = 0; i < sets; i++) {
        as.push(await randomTensor([R, K], 'f16', device, 0.02));
        bts.push(await randomTensor([R, N], 'f16', device, 0.02));
      }
      const wsets = setsFor(2 * N * K, ctx.l2Bytes);
      const ws: Tensor[] = [];
      for (let i = 0; i < wsets; i++) ws.push(await randomTensor([N, K], 'f16', device, 0.02));
      try {
        for (const B of ctx.quick ? [8] : [1, 8, 32]) {
          const x = await randomTensor([B, K], 'f16', device), y = await randomTensor([B, N], 'f16', device);
          const iters = ctx.quick ? 8 : Math.max(2 * Math.max(sets, wsets), 20), repeats = ctx.quick ? 5 : 15;
          try {
            const base = await timeCuda({ device, iters, repeats, fn: (i) => matmul(y, x, ws[i % wsets]) });
            for (const mixed of [false, true]) {
              const slotOf = (b: number) => (mixed ? b % S : 0);
              const slots = Tensor.from(Int32Array.from({ length: B }, (_, b) => slotOf(b)), [B], { device });
              const used = new Set(Array.from({ length: B }, (_, b) => slotOf(b)));
              const rankRows = [...used].reduce((s, u) => s + (mixed ? ranks[u] : 16), 0);
              const d = mixed ? desc : descOne;
              try {
                const t = await timeCuda({ device, iters, repeats, fn: (i) => loraApply(y, x, slots, as[i % sets], bts[i % sets], d, scale) });
                const label = mixed ? `ranks ${[...used].map((u) => ranks[u]).join('/')}` : 'one rank-16 adapter';
                out.push(row(ctx, 'lora', `${site} ${K}->${N} B=${B} ${label}`, t, {
                  bytes: 2 * (rankRows * (K + N) + B * K + 2 * B * N),
                  flops: 2 * B * (K + N) * (mixed ? [...Array(B).keys()].reduce((s, b) => s + ranks[slotOf(b)], 0) / B : 16),
                  baseline: 'fp16 projection',
                  base,
                  note: 'speedup = projection time / LoRA time (10x: the adapter adds 10%)',
                }));
              } finally {
                slots.dispose();
              }
            }
          } finally {
            x.dispose();
            y.dispose();
          }
        }
      } finally {
        [...as, ...bts, ...ws].forEach((t) => t.dispose());
      }
    }
  } finally {
    desc.dispose();
    descOne.dispose();
    scale.dispose();
  }
  return out;
}
