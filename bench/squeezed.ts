/**
 * Squeezed Attention's decode op against our dense split-KV decode attention in the same run:
 * batch 1 and 8, 32q/8kv x 128 (LLaMA-3-8B's attention), a fixed context of 8K / 32K tokens
 * clustered into one cluster per 16 tokens (random keys, a synthetic cluster index), 64 tokens after
 * it, a quarter and an eighth of the clusters attended. Bytes = the keys and values the op reads
 * (the selected context tokens and the rest) + the centroids; pools rotate past twice the L2.
 */
import { Tensor } from '../ts/tensor';
import { attention, attentionWorkspaceSize, fillRandom, squeezedAttention } from '../ts/ops';
import { BenchContext, BenchResult, row, setsFor, timeCuda } from './harness';

const PAGE = 16;

export async function benchSqueezed(ctx: BenchContext): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const device = ctx.device, out: BenchResult[] = [];
  const Hq = 32, H = 8, D = 128, tail = 64;
  for (const P of ctx.quick ? [32768] : [8192, 32768])
    for (const B of ctx.quick ? [1] : [1, 8]) {
      const L = P + tail, maxPages = Math.ceil(L / PAGE), pages = B * maxPages, C = P / 16;
      const sets = setsFor(pages * PAGE * H * D * 4, ctx.l2Bytes, 4);
      const ks: Tensor[] = [], vs: Tensor[] = [];
      for (let i = 0; i < sets; i++) {
        const k = Tensor.empty([pages, PAGE, H, D], { dtype: 'f16', device }), v = Tensor.empty([pages, PAGE, H, D], { dtype: 'f16', device });
        fillRandom(k, 10 + i);
        fillRandom(v, 20 + i);
        ks.push(k);
        vs.push(v);
      }
      const pt = Tensor.from(Int32Array.from({ length: pages }, (_, i) => i), [B, maxPages], { device });
      const lens = Tensor.from(new Int32Array(B).fill(L), [B], { device });
      const cu = Tensor.from(Int32Array.from({ length: B + 1 }, (_, i) => i), [B + 1], { device });
      const pre = Tensor.from(new Int32Array(B).fill(P), [B], { device });
      const q = Tensor.empty([B, Hq, D], { dtype: 'f16', device }), o = Tensor.empty([B, Hq, D], { dtype: 'f16', device });
      fillRandom(q, 3);
      const cen = Tensor.empty([H * C * D], { dtype: 'f32', device });
      fillRandom(cen, 4);
      // cluster c holds tokens 16c .. 16c + 15 (a synthetic index: the op's cost does not depend on the grouping)
      const cs = Tensor.from(Int32Array.from({ length: H * (C + 1) }, (_, i) => 16 * (i % (C + 1))), [H * (C + 1)], { device });
      const ct = Tensor.from(Int32Array.from({ length: H * P }, (_, i) => i % P), [H * P], { device });
      const cof = Tensor.from(new Int32Array(B), [B], { device });
      const wn = attentionWorkspaceSize(device, B, Hq, H, D, 1, L);
      const aw = wn > 0 ? Tensor.empty([wn], { dtype: 'f32', device }) : undefined;
      try {
        const iters = ctx.quick ? 8 : 20, repeats = ctx.quick ? 5 : 10;
        const base = await timeCuda({ device, iters, repeats, fn: (i) => attention(o, q, ks[i % sets], vs[i % sets], pt, lens, cu, 1 / Math.sqrt(D), { maxQ: 1, maxSeqLen: L, workspace: aw }) });
        out.push(row(ctx, 'squeezed', `dense B=${B} 32q/8kv x128 ctx ${L}`, base, { bytes: B * L * H * D * 2 * 2 }));
        // keep 0: what the selection costs on its own (the centroid scores, the sort, the tail tokens)
        for (const keep of [0.25, 0.125, 0]) {
          const topC = Math.ceil(keep * C);
          const table = Tensor.from(Int32Array.from([0, 0, 0, C, P, topC]), [1, 6], { device });
          const t = await timeCuda({ device, iters, repeats, fn: (i) => squeezedAttention(o, q, ks[i % sets], vs[i % sets], pt, lens, 1 / Math.sqrt(D), pre, cof, table, cen, cs, ct, C) });
          table.dispose();
          out.push(row(ctx, 'squeezed', `keep ${keep} B=${B} 32q/8kv x128 ctx ${P} + ${tail}`, t, {
            bytes: B * Hq * ((topC * 16 + tail) * D * 2 * 2 + C * D * 4),
            baseline: 'dense decode attention', base,
            note: `${C} clusters of 16, ${topC} per query head`,
          }));
        }
      } finally {
        [...ks, ...vs, pt, lens, cu, pre, cof, q, o, cen, cs, ct].forEach((x) => x.dispose());
        aw?.dispose();
      }
    }
  return out;
}
