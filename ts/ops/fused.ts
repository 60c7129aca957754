/**
 * Fused decoder ops: several small steps of a layer in one launch.
 */
import { SqueezeError } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';
import { requireTensors } from './check';

/**
 * From packed rows qkv[T, (Hq + 2*kvHeads) * D] (q heads, then k heads, then v heads):
 * rotates q by positions (Hugging Face rotate-half, fp32 angles invFreq[i] * position) into
 * qOut[T, Hq, D], rotates k, and stores k and v in the paged caches at the slots kvAppend
 * uses (row j of sequence b sits at position seqLens[b] - n_b + j). The same result as
 * rope(q), rope(k), kvAppend(k, v) on separate q, k, v buffers, in one launch.
 */
export function ropeAppend(qOut: Tensor, kCache: Tensor, vCache: Tensor, qkv: Tensor, positions: Tensor, invFreq: Tensor,
  pageTable: Tensor, seqLens: Tensor, cuQ: Tensor): void {
  requireTensors('ropeAppend', [['qOut', qOut], ['kCache', kCache], ['vCache', vCache], ['qkv', qkv], ['positions', positions],
    ['invFreq', invFreq], ['pageTable', pageTable], ['seqLens', seqLens], ['cuQ', cuQ]]);
  native().ops.ropeAppend(qOut.native, kCache.native, vCache.native, qkv.native, positions.native, invFreq.native,
    pageTable.native, seqLens.native, cuQ.native);
}

/** Where linearRopeAppend's rows go and how they are normalised (see linearRopeAppend). */
export interface LinearRopeAppendOptions {
  bias?: Tensor;
  /** RMSNorm weight [K]: x is normalised (fp32, per row) and scaled by it before the product. */
  normWeight?: Tensor;
  /** RMSNorm epsilon (with normWeight). */
  eps?: number;
  positions: Tensor;
  invFreq: Tensor;
  pageTable: Tensor;
  seqLens: Tensor;
  cuQ: Tensor;
}

/**
 * The decode step's q|k|v projection and ropeAppend in one call: qkv = [rmsnorm(x) * normWeight]
 * · wᵀ (+ bias), w [(Hq + 2*kvHeads) * D, K], rounded to x's dtype as fusedLinear stores it, then
 * exactly what ropeAppend(qOut, kCache, vCache, qkv, ...) does, without qkv being stored. On
 * CUDA the rotation and the cache writes run in the GEMV's epilogue (one launch instead of two;
 * one or two rows: the fused decode pass), bit for bit fusedLinear followed by ropeAppend.
 */
export function linearRopeAppend(qOut: Tensor, kCache: Tensor, vCache: Tensor, x: Tensor, w: Tensor,
  o: LinearRopeAppendOptions): void {
  if (!o || typeof o !== 'object') throw new SqueezeError('ERR_ARG', 'linearRopeAppend: options must be an object');
  requireTensors('linearRopeAppend', [['qOut', qOut], ['kCache', kCache], ['vCache', vCache], ['x', x], ['w', w],
    ['positions', o.positions], ['invFreq', o.invFreq], ['pageTable', o.pageTable], ['seqLens', o.seqLens], ['cuQ', o.cuQ]],
  [['bias', o.bias], ['normWeight', o.normWeight]]);
  native().ops.linearRopeAppend(qOut.native, kCache.native, vCache.native, x.native, w.native, o.bias?.native,
    o.normWeight?.native, o.eps ?? 1e-6, o.positions.native, o.invFreq.native, o.pageTable.native, o.seqLens.native,
    o.cuQ.native);
}
