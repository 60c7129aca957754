/**
 * Attention over a paged KV cache (GQA, batched, causal).
 *
 * Cache per layer: kCache, vCache [pages, pageSize, kvHeads, headDim]. Sequence b owns the
 * pages pageTable[b][0..]: its token t lives in page pageTable[b][t / pageSize], slot
 * t % pageSize. Query/key rows of a batch are packed: rows cuQ[b]..cuQ[b+1] belong to
 * sequence b, and its row j sits at position seqLens[b] - n_b + j (seqLens count the
 * tokens after this step's append). Lengths and page tables are device tensors, so one
 * captured graph serves many steps; maxQ and maxSeqLen are host upper bounds that size the
 * launch.
 */
import { SqueezeError } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';
import { isTensor, requireTensors } from './check';

const FLOAT = ['f32', 'f16', 'bf16'];

function checkPaged(op: string, kCache: Tensor, vCache: Tensor, pageTable: Tensor, seqLens: Tensor, cuQ: Tensor): void {
  const named: Array<[string, Tensor]> = [['kCache', kCache], ['vCache', vCache], ['pageTable', pageTable], ['seqLens', seqLens], ['cuQ', cuQ]];
  requireTensors(op, named);
  if (kCache.shape.length !== 4)
    throw new SqueezeError('ERR_SHAPE', `${op}: kCache must be [pages, pageSize, kvHeads, headDim], got [${kCache.shape}]`);
  if (vCache.shape.join() !== kCache.shape.join())
    throw new SqueezeError('ERR_SHAPE', `${op}: vCache [${vCache.shape}] must match kCache [${kCache.shape}]`);
  if (!FLOAT.includes(kCache.dtype)) throw new SqueezeError('ERR_DTYPE', `${op}: kCache must be f32, f16 or bf16, got ${kCache.dtype}`);
  for (const [name, t] of named.slice(2))
    if (t.dtype !== 'i32') throw new SqueezeError('ERR_DTYPE', `${op}: ${name} must be i32, got ${t.dtype}`);
  if (seqLens.shape.length !== 1) throw new SqueezeError('ERR_SHAPE', `${op}: seqLens must be [B], got [${seqLens.shape}]`);
  const B = seqLens.shape[0];
  if (pageTable.shape.length !== 2 || pageTable.shape[0] !== B)
    throw new SqueezeError('ERR_SHAPE', `${op}: pageTable [${pageTable.shape}] must be [${B}, maxPages]`);
  if (cuQ.shape.length !== 1 || cuQ.shape[0] !== B + 1)
    throw new SqueezeError('ERR_SHAPE', `${op}: cuQ [${cuQ.shape}] must be [${B + 1}]`);
}

/**
 * Writes rows of k and v (each [N, kvHeads, headDim]) into the cache at their sequences'
 * positions. Rows whose position has no page (outside the page table or the pool) are
 * dropped. CUDA: the cache dtype equals k's (f16 or bf16).
 */
export function kvAppend(kCache: Tensor, vCache: Tensor, k: Tensor, v: Tensor, pageTable: Tensor, seqLens: Tensor, cuQ: Tensor): void {
  checkPaged('kvAppend', kCache, vCache, pageTable, seqLens, cuQ);
  if (!isTensor(k) || !isTensor(v)) throw new SqueezeError('ERR_ARG', 'kvAppend: k and v must be Tensors');
  const [, , Hkv, D] = kCache.shape;
  if (k.shape.length !== 3 || k.shape[1] !== Hkv || k.shape[2] !== D)
    throw new SqueezeError('ERR_SHAPE', `kvAppend: k [${k.shape}] must be [N, ${Hkv}, ${D}]`);
  if (v.shape.join() !== k.shape.join()) throw new SqueezeError('ERR_SHAPE', `kvAppend: v [${v.shape}] must match k [${k.shape}]`);
  native().ops.kvAppend(kCache.native, vCache.native, k.native, v.native, pageTable.native, seqLens.native, cuQ.native);
}

export interface AttentionBounds {
  /** Most query rows any sequence has in this call (1 for decode). */
  maxQ: number;
  /** Longest sequence (after the append) in this call; at most maxPages * pageSize. */
  maxSeqLen: number;
  /**
   * f32 scratch for the split-KV decode path, at least attentionWorkspaceSize(...) elements.
   * Optional, but required while capturing a CUDA graph.
   */
  workspace?: Tensor;
}

/**
 * out[N, Hq, D] = causal softmax(q kᵀ · scale) v over each row's sequence in the paged
 * cache. Query head h reads kv head h / (Hq / kvHeads). Rows with no visible key are zero.
 */
export function attention(
  out: Tensor, q: Tensor, kCache: Tensor, vCache: Tensor, pageTable: Tensor, seqLens: Tensor, cuQ: Tensor,
  scale: number, bounds: AttentionBounds,
): void {
  checkPaged('attention', kCache, vCache, pageTable, seqLens, cuQ);
  if (!isTensor(out) || !isTensor(q)) throw new SqueezeError('ERR_ARG', 'attention: out and q must be Tensors');
  const [, , Hkv, D] = kCache.shape;
  if (q.shape.length !== 3 || q.shape[2] !== D || q.shape[1] % Hkv !== 0)
    throw new SqueezeError('ERR_SHAPE', `attention: q [${q.shape}] must be [N, g * ${Hkv}, ${D}]`);
  if (out.shape.join() !== q.shape.join()) throw new SqueezeError('ERR_SHAPE', `attention: out [${out.shape}] must match q [${q.shape}]`);
  if (typeof scale !== 'number' || !Number.isFinite(scale)) throw new SqueezeError('ERR_ARG', 'attention: scale must be a finite number');
  const { maxQ, maxSeqLen, workspace } = bounds ?? ({} as AttentionBounds);
  if (!Number.isInteger(maxQ) || maxQ < 1) throw new SqueezeError('ERR_ARG', `attention: maxQ must be an integer >= 1, got ${maxQ}`);
  if (!Number.isInteger(maxSeqLen) || maxSeqLen < 0)
    throw new SqueezeError('ERR_ARG', `attention: maxSeqLen must be an integer >= 0, got ${maxSeqLen}`);
  native().ops.attention(out.native, q.native, kCache.native, vCache.native, pageTable.native, seqLens.native, cuQ.native,
    scale, maxQ, maxSeqLen, workspace?.native);
}

/** f32 elements of workspace `attention` needs on `device` for these bounds (0 on CPU). */
export function attentionWorkspaceSize(
  device: string, numSeqs: number, qHeads: number, kvHeads: number, headDim: number, maxQ: number, maxSeqLen: number,
): number {
  return native().ops.attentionWorkspaceSize(device, numSeqs, qHeads, kvHeads, headDim, maxQ, maxSeqLen) as number;
}
