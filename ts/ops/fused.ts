/**
 * Fused decoder ops: several small steps of a layer in one launch.
 */
import { SqueezeError } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';

function isTensor(t: unknown): t is Tensor {
  return !!t && typeof t === 'object' && 'native' in (t as object);
}

/**
 * From packed rows qkv[T, (Hq + 2*kvHeads) * D] (q heads, then k heads, then v heads):
 * rotates q by positions (Hugging Face rotate-half, fp32 angles invFreq[i] * position) into
 * qOut[T, Hq, D], rotates k, and stores k and v in the paged caches at the slots kvAppend
 * uses (row j of sequence b sits at position seqLens[b] - n_b + j). The same result as
 * rope(q), rope(k), kvAppend(k, v) on separate q, k, v buffers, in one launch.
 */
export function ropeAppend(qOut: Tensor, kCache: Tensor, vCache: Tensor, qkv: Tensor, positions: Tensor, invFreq: Tensor,
  pageTable: Tensor, seqLens: Tensor, cuQ: Tensor): void {
  const named: Array<[string, Tensor]> = [['qOut', qOut], ['kCache', kCache], ['vCache', vCache], ['qkv', qkv], ['positions', positions],
    ['invFreq', invFreq], ['pageTable', pageTable], ['seqLens', seqLens], ['cuQ', cuQ]];
  for (const [name, t] of named) if (!isTensor(t)) throw new SqueezeError('ERR_ARG', `ropeAppend: ${name} must be a Tensor`);
  native().ops.ropeAppend(qOut.native, kCache.native, vCache.native, qkv.native, positions.native, invFreq.native,
    pageTable.native, seqLens.native, cuQ.native);
}
