/**
 * KVQuant quantized paged KV cache (one layer): packed 2/3/4-bit keys (per channel,
 * pre-RoPE, calibrated bounds) and values (per token min/max), a fixed number of exact
 * fp16 outlier slots per token-head vector, and the first `sink` tokens of each sequence
 * in fp16. Layout: csrc/kernels/kvquant/kvquant_layout.h.
 */
import { SqueezeError } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';

export interface KvqLayerCalibration {
  /** f32 [kvHeads*D] per-channel key bounds. */
  keyLo: Tensor;
  keyHi: Tensor;
  /** f32 [2^bits], sorted, in [-1, 1]. */
  keyCodebook: Tensor;
  valueCodebook: Tensor;
}

export interface KvqCacheOptions {
  pages: number;
  pageSize: number;
  kvHeads: number;
  headDim: number;
  bits: number;
  /** Outlier slots per token-head vector for keys / values. */
  keyOutliers: number;
  valueOutliers: number;
  /** fp16 sink tokens per sequence, and the rows of the sink store (one per live sequence). */
  sink: number;
  maxSeqs: number;
  /**
   * Ablation: keys quantized per token (own fp16 min/max, like values) instead of per channel
   * against calibrated bounds. CPU only.
   */
  keyPerToken?: boolean;
  device?: string;
}

/** Cache mode bits (csrc/kernels/kvquant/kvquant_layout.h). */
export const KVQ_MODE_KEY_PER_TOKEN = 1;

export function kvqCodeBytes(headDim: number, bits: number): number {
  return Math.ceil(Math.ceil((headDim * bits) / 8) / 16) * 16;
}
export function kvqMetaBytes(keyOutliers: number, valueOutliers: number, keyPerToken = false): number {
  return Math.ceil((4 + 3 * (keyOutliers + valueOutliers) + (keyPerToken ? 4 : 0)) / 4) * 4;
}
/** Bytes one token takes in the cache over `layers` layers (codes, scales, outliers; sink store excluded). */
export function kvBytesPerToken(o: { layers: number; kvHeads: number; headDim: number; bits: number; keyOutliers: number; valueOutliers: number; keyPerToken?: boolean }): number {
  return o.layers * o.kvHeads * (2 * kvqCodeBytes(o.headDim, o.bits) + kvqMetaBytes(o.keyOutliers, o.valueOutliers, o.keyPerToken));
}
/** Outlier slots for a share of the channels (e.g. 0.01 of 128 -> 2). */
export function outlierSlots(share: number, headDim: number): number {
  return share > 0 ? Math.min(16, Math.ceil(share * headDim)) : 0;
}

function checkBits(bits: number, what: string): void {
  if (bits !== 2 && bits !== 3 && bits !== 4) throw new SqueezeError('ERR_ARG', `${what}: bits must be 2, 3 or 4 (got ${bits})`);
}

/** One layer's quantized cache. */
export class KvqCache {
  readonly kCodes: Tensor;
  readonly vCodes: Tensor;
  readonly meta: Tensor;
  readonly sinkK: Tensor;
  readonly sinkV: Tensor;
  constructor(readonly opts: Readonly<KvqCacheOptions>) {
    const o = opts;
    checkBits(o.bits, 'KvqCache');
    if (o.headDim % 2 !== 0 || o.headDim > 256) throw new SqueezeError('ERR_ARG', `KvqCache: headDim ${o.headDim} must be even and <= 256`);
    const device = o.device ?? 'cpu';
    const cb = kvqCodeBytes(o.headDim, o.bits);
    this.kCodes = Tensor.empty([o.pages, o.pageSize, o.kvHeads, cb], { dtype: 'u8', device });
    this.vCodes = Tensor.empty([o.pages, o.pageSize, o.kvHeads, cb], { dtype: 'u8', device });
    this.meta = Tensor.empty([o.pages, o.pageSize, o.kvHeads, kvqMetaBytes(o.keyOutliers, o.valueOutliers, o.keyPerToken)], { dtype: 'u8', device });
    this.sinkK = Tensor.empty([Math.max(o.maxSeqs, 1), o.sink, o.kvHeads, o.headDim], { dtype: 'f16', device });
    this.sinkV = Tensor.empty([Math.max(o.maxSeqs, 1), o.sink, o.kvHeads, o.headDim], { dtype: 'f16', device });
  }
  get mode(): number {
    return this.opts.keyPerToken ? KVQ_MODE_KEY_PER_TOKEN : 0;
  }
  /** The 13 native arguments describing this layer's cache and calibration. */
  args(cal: KvqLayerCalibration): unknown[] {
    const o = this.opts;
    return [this.kCodes.native, this.vCodes.native, this.meta.native, this.sinkK.native, this.sinkV.native,
      cal.keyLo.native, cal.keyHi.native, cal.keyCodebook.native, cal.valueCodebook.native, o.bits, o.keyOutliers, o.valueOutliers,
      this.mode];
  }
  /** Bytes of the whole layer cache (pages, metadata and the fp16 sink store). */
  get byteLength(): number {
    return [this.kCodes, this.vCodes, this.meta, this.sinkK, this.sinkV].reduce((a, t) => a + t.byteLength, 0);
  }
  get bytesPerToken(): number {
    return kvBytesPerToken({ layers: 1, ...this.opts });
  }
  dispose(): void {
    for (const t of [this.kCodes, this.vCodes, this.meta, this.sinkK, this.sinkV]) t.dispose();
  }
}

/**
 * Quantizes k/v [N, kvHeads, D] rows and appends them (rows cuQ[b]..cuQ[b+1] land at seqLens[b] - n_b + j).
 * sinkRows (i32 [B]): the sink store row of each sequence (default: row b).
 */
export function kvqAppend(cache: KvqCache, cal: KvqLayerCalibration, k: Tensor, v: Tensor, pageTable: Tensor, seqLens: Tensor, cuQ: Tensor,
  sinkRows?: Tensor): void {
  native().ops.kvqAppend(...cache.args(cal), k.native, v.native, pageTable.native, seqLens.native, cuQ.native, sinkRows?.native);
}

/**
 * From packed projection rows qkv [N, (Hq + 2 kvHeads) D] (q heads, k heads, v heads): rotates
 * the q heads into qOut [N, Hq, D] (skipped when qOut is null; the numerics of ropeAppend) and
 * quantizes the keys and values into the cache at the rows' positions. Keys are stored before
 * RoPE, or rotated at `positions` first when rotateKeys (the post-RoPE ablation; attend then
 * with a zero invFreq).
 */
export function kvqRopeAppend(qOut: Tensor | null, cache: KvqCache, cal: KvqLayerCalibration, qkv: Tensor, positions: Tensor, invFreq: Tensor,
  pageTable: Tensor, seqLens: Tensor, cuQ: Tensor, o: { rotateKeys?: boolean; sinkRows?: Tensor } = {}): void {
  native().ops.kvqRopeAppend(qOut ? qOut.native : null, ...cache.args(cal), qkv.native, positions.native, invFreq.native, pageTable.native,
    seqLens.native, cuQ.native, !!o.rotateKeys, o.sinkRows?.native);
}

export interface KvqAttentionOptions {
  /** i32 [B]: the sink store row of each sequence (default: row b). */
  sinkRows?: Tensor;
  /** f32 scratch of kvqAttentionWorkspaceSize(...) elements (CUDA; required while capturing a graph). */
  workspace?: Tensor;
  /**
   * CUDA kernel: 0 (default) the fastest kernel that covers the shape: the rotation-plane
   * tensor-core kernel (head_dim 64/96/128, up to 8 query heads per kv head), else the earlier
   * tensor-core kernel (up to 16 query heads per kv head, 8 at head_dim 256), else the flash
   * kernel; 1 the CUDA-core flash-decoding kernel (fp32 throughout, slower); 2 the earlier
   * tensor-core kernel where it covers the shape (the A/B baseline of the default).
   */
  variant?: 0 | 1 | 2;
}

/** Causal attention of RoPE'd q [N, Hq, D] over the quantized cache (keys rotated on the fly with invFreq f32[D/2]). */
export function kvqAttention(out: Tensor, q: Tensor, cache: KvqCache, cal: KvqLayerCalibration, pageTable: Tensor, seqLens: Tensor,
  cuQ: Tensor, invFreq: Tensor, scale: number, maxQ: number, maxSeqLen: number, o: KvqAttentionOptions = {}): void {
  native().ops.kvqAttention(out.native, q.native, ...cache.args(cal), pageTable.native, seqLens.native, cuQ.native, invFreq.native,
    scale, maxQ, maxSeqLen, o.sinkRows?.native, o.workspace?.native, o.variant ?? 0);
}

/** f32 elements of the scratch kvqAttention needs on `device` for these bounds (0 on CPU). */
export function kvqAttentionWorkspaceSize(device: string, rows: number, qHeads: number, kvHeads: number, headDim: number, maxSeqLen: number): number {
  return native().ops.kvqAttentionWorkspaceSize(device, rows, qHeads, kvHeads, headDim, maxSeqLen) as number;
}

/**
 * Unpacks positions [0, L) of page-table row `seq` into kOut/vOut [L, kvHeads, D] (keys as stored,
 * pre-RoPE; sink tokens from row `sinkRow` of the fp16 store, default `seq`).
 */
export function kvqDequantize(kOut: Tensor, vOut: Tensor, cache: KvqCache, cal: KvqLayerCalibration, pageTable: Tensor, seq: number,
  sinkRow?: number): void {
  native().ops.kvqDequantize(kOut.native, vOut.native, ...cache.args(cal), pageTable.native, seq, sinkRow);
}
