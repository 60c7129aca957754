import { native } from '../native';
import { Tensor } from '../tensor';

/**
 * Squeezed Attention's decode step: attention of q [B, Hq, D] (one query row per sequence, rotated)
 * over the paged cache, where the first prefixLens[b] tokens of sequence b (a fixed context
 * clustered offline, ts/quant/squeezed.ts) are attended only in the `topC` clusters whose centroid
 * scores highest against the query (per query head; ties to the lower cluster), and every later
 * token is attended. centroids f32 [Hkv, C, D]; cluster c of kv head g owns the positions
 * clusterTokens[g][clusterStart[g][c] .. clusterStart[g][c + 1]). prefixLens[b] = 0 is plain decode
 * attention. See csrc/cpu/squeezed.h for the exact rules on out-of-range device data.
 */
export function squeezedAttention(
  out: Tensor, q: Tensor, kCache: Tensor, vCache: Tensor, pageTable: Tensor, seqLens: Tensor, scale: number,
  prefixLens: Tensor, centroids: Tensor, clusterStart: Tensor, clusterTokens: Tensor, topC: number,
): void {
  native().ops.squeezedAttention(out.native, q.native, kCache.native, vCache.native, pageTable.native, seqLens.native, scale,
    prefixLens.native, centroids.native, clusterStart.native, clusterTokens.native, topC);
}
