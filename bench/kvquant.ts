/**
 * KVQuant decode attention (2/3/4-bit packed cache, RoPE on the fly) against our fp16
 * paged `attention` op in the same run: batch 1 at 8K/32K/128K for 32x128 and 32q/8kv x128,
 * batch 8 at 4K. Caches hold random non-zero codes and valid metadata; working sets smaller
 * than twice the L2 are replicated and rotated between launches.
 */
import { native } from '../ts/native';
import { Tensor } from '../ts/tensor';
import { fillRandom, fillRandomInt } from '../ts/ops/elementwise';
import { KvqCache, KvqLayerCalibration, kvBytesPerToken, kvqAttention, kvqAttentionWorkspaceSize } from '../ts/ops/kvquant';
import { normalFloatCodebook } from '../ts/quant/kvquant';
import { BenchContext, BenchResult, row, setsFor, timeCuda } from './harness';
import { syntheticMeta } from './scale';

const PAGE = 16;
// The default kernel and, in the same process, the earlier tensor-core kernel (variant 2);
// SQUEEZELM_BENCH_KVQ_DEFAULT_ONLY=1 times the default alone (a shorter run).
const VARIANTS: ReadonlyArray<0 | 2> = process.env.SQUEEZELM_BENCH_KVQ_DEFAULT_ONLY === '1' ? [0] : [0, 2];

/**
 * Cache set `i` of the benchmark: pages of PAGE tokens with random codes, valid metadata (syntheticMeta)
 * and 4 random fp16 sink tokens. Also the profiler's target (scripts/ncu-target.js).
 */
export function syntheticKvqCache(
  o: { pages: number; kvHeads: number; headDim: number; bits: number; keyOutliers: number; valueOutliers: number; maxSeqs: number; device: string },
  i = 0,
): KvqCache {
  const c = new KvqCache({ ...o, pageSize: PAGE, sink: 4 });
  fillRandomInt(c.kCodes, 4 + 10 * i);
  fillRandomInt(c.vCodes, 5 + 10 * i);
  c.meta.write(syntheticMeta(o.pages * PAGE * o.kvHeads, o.headDim, o.keyOutliers, o.valueOutliers, 6 + i));
  fillRandom(c.sinkK, 7 + 10 * i);
  fillRandom(c.sinkV, 8 + 10 * i);
  return c;
}

/** The benchmark's calibration: key bounds [-2, 2] for every channel, NormalFloat codebooks. */
export function syntheticKvqCalibration(kvHeads: number, headDim: number, bits: number, device: string): KvqLayerCalibration {
  const n = kvHeads * headDim, cb = normalFloatCodebook(bits);
  return {
    keyLo: Tensor.from(new Float32Array(n).fill(-2), [n], { device }), keyHi: Tensor.from(new Float32Array(n).fill(2), [n], { device }),
    keyCodebook: Tensor.from(cb, [cb.length], { device }), valueCodebook: Tensor.from(cb, [cb.length], { device }),
  };
}

export async function benchKvquant(ctx: BenchContext): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const device = ctx.device, D = 128, results: BenchResult[] = [];
  const shapes: Array<[number, number, number, number]> = [];  // [B, Hq, H, ctx]
  for (const L of ctx.quick ? [32768] : [8192, 32768, 131072]) { shapes.push([1, 32, 32, L]); shapes.push([1, 32, 8, L]); }
  shapes.push([8, 32, 8, 4096]);
  const inv = new Float32Array(D / 2).map((_, i) => 1 / Math.pow(500000, (2 * i) / D));
  const invT = Tensor.from(inv, [D / 2], { device });
  const hasFp16 = typeof native().ops.attention === 'function';
  for (const [B, Hq, H, L] of shapes) {
    const maxPages = Math.ceil(L / PAGE), pages = B * maxPages;
    const pt = Tensor.from(Int32Array.from({ length: pages }, (_, i) => i), [B, maxPages], { device });
    const lens = Tensor.from(new Int32Array(B).fill(L), [B], { device });
    const cu = Tensor.from(Int32Array.from({ length: B + 1 }, (_, i) => i), [B + 1], { device });
    const q = Tensor.empty([B, Hq, D], { dtype: 'f16', device });
    fillRandom(q, 1);
    const out = Tensor.empty([B, Hq, D], { dtype: 'f16', device });
    let base = null;
    if (hasFp16) {
      // working sets rotate so that together they exceed the L2 (setsFor)
      const fsets = setsFor(pages * PAGE * H * D * 4, ctx.l2Bytes);
      const ks: Tensor[] = [], vs: Tensor[] = [];
      for (let i = 0; i < fsets; i++) {
        const k = Tensor.empty([pages, PAGE, H, D], { dtype: 'f16', device }), v = Tensor.empty([pages, PAGE, H, D], { dtype: 'f16', device });
        fillRandom(k, 2 + 2 * i);
        fillRandom(v, 3 + 2 * i);
        ks.push(k);
        vs.push(v);
      }
      const wn = native().ops.attentionWorkspaceSize(device, B, Hq, H, D, 1, L) as number;
      const aw = wn > 0 ? Tensor.empty([wn], { dtype: 'f32', device }) : undefined;
      base = await timeCuda({ device, fn: (i) => native().ops.attention(out.native, q.native, ks[i % fsets].native, vs[i % fsets].native, pt.native, lens.native, cu.native, 1 / Math.sqrt(D), 1, L, aw?.native) });
      ks.forEach((t) => t.dispose());
      vs.forEach((t) => t.dispose());
      aw?.dispose();
      // the baseline's own row: its share of the copy bandwidth is a point of its own (>= 85% at >= 32K)
      results.push(row(ctx, 'kvquant', `fp16 baseline B${B} ${Hq}q/${H}kv x${D} ctx ${L}`, base, {
        bytes: 2 * B * L * H * D * 2 + q.byteLength * 2, note: 'our fp16 split-KV decode (pages in order)',
      }));
    }
    for (const bits of [4, 3, 2]) {
      const nk = 2, nv = 2;
      const caches: KvqCache[] = [];
      const sets = setsFor(pages * PAGE * kvBytesPerToken({ layers: 1, kvHeads: H, headDim: D, bits, keyOutliers: nk, valueOutliers: nv }), ctx.l2Bytes);
      for (let i = 0; i < sets; i++) caches.push(syntheticKvqCache({ pages, kvHeads: H, headDim: D, bits, keyOutliers: nk, valueOutliers: nv, maxSeqs: B, device }, i));
      const cache = caches[0];
      const cal = syntheticKvqCalibration(H, D, bits, device);
      const work = Tensor.empty([Math.max(1, kvqAttentionWorkspaceSize(device, B, Hq, H, D, L))], { dtype: 'f32', device });
      const bytes = B * L * cache.bytesPerToken + q.byteLength * 2;
      // the default (the rotation-plane kernel, variant 0) and the earlier tensor-core kernel (variant 2)
      for (const variant of VARIANTS) {
        const t = await timeCuda({ device, fn: (i) => kvqAttention(out, q, caches[i % sets], cal, pt, lens, cu, invT, 1 / Math.sqrt(D), 1, L, { workspace: work, variant }) });
        results.push(row(ctx, 'kvquant', `${bits}-bit${variant ? ' (earlier tensor-core kernel)' : ''} B${B} ${Hq}q/${H}kv x${D} ctx ${L}`, t, {
          bytes, baseline: hasFp16 ? 'fp16 attention' : undefined, base, note: `${cache.bytesPerToken} B/token/layer (fp16 ${H * D * 4})`,
        }));
        ctx.log(`kvquant ${bits}-bit v${variant} B${B} ${Hq}/${H} L${L}: ${results[results.length - 1].timeUs.toFixed(1)} us`);
      }
      work.dispose();
      caches.forEach((c) => c.dispose());
    }
    pt.dispose(); lens.dispose(); cu.dispose(); q.dispose(); out.dispose();
  }
  return results;
}
