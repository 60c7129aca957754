import { native } from '../native';
import { Tensor } from '../tensor';

/**
 * Squeezed Attention's decode step: attention of q [B, Hq, D] (one query row per sequence, rotated)
 * over the paged cache, where the first prefixLens[b] tokens of sequence b (a fixed context
 * clustered offline, ts/quant/squeezed.ts) are attended only in the top clusters of its context
 * (contextOf[b]; -1: none) whose centroids score highest against the query (per query head; ties
 * to the lower cluster), and every later token is attended. The contexts live in three flat
 * arrays described by the i32 table `contexts` [N, 6] = (centroids offset, clusterStart offset,
 * clusterTokens offset, clusters C, tokens P, clusters attended); csrc/kernels/sparse_attn/
 * squeezed_layout.h has the layout and csrc/cpu/squeezed.h the rules on out-of-range device data.
 * maxClusters bounds every context's C (a context with more is treated as none).
 */
export function squeezedAttention(
  out: Tensor, q: Tensor, kCache: Tensor, vCache: Tensor, pageTable: Tensor, seqLens: Tensor, scale: number,
  prefixLens: Tensor, contextOf: Tensor, contexts: Tensor, centroids: Tensor, clusterStart: Tensor, clusterTokens: Tensor, maxClusters: number,
): void {
  native().ops.squeezedAttention(out.native, q.native, kCache.native, vCache.native, pageTable.native, seqLens.native, scale,
    prefixLens.native, contextOf.native, contexts.native, centroids.native, clusterStart.native, clusterTokens.native, maxClusters);
}
