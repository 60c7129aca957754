/**
 * The decoder's attention over a KVQuant cache: per layer a quantized page pool (keys per
 * channel before RoPE against calibrated bounds, values per token, outliers exact, the first
 * `sink` tokens of each sequence in fp16), indexed by the page numbers of the engine's
 * KVCache, with the sink rows indexed by each sequence's cache slot.
 *
 * Decode rows (and any pass that continues a sequence): kvqRopeAppend rotates q and quantizes
 * the new keys/values into the cache, then kvqAttention attends over the quantized cache
 * (RoPE applied to the dequantized keys on the fly), so every key and value of the sequence
 * other than the sink goes through the quantizer. Both read lengths, page tables and slots
 * from device memory: one captured graph serves many steps.
 *
 * Prompts (every sequence of the pass starts at position 0 and one has several rows): the
 * prompt attends over its own fp16 keys and values of this pass (ropeAppend into a scratch
 * page pool of the workspace, then the fp16 attention op), as KVQuant does for prefill; the
 * same keys and values are quantized into the cache for the steps that follow.
 */
import { SqueezeError } from '../errors';
import { DType, Tensor } from '../tensor';
import * as ops from '../ops';
import type { AttentionStep, PassInputs, Workspace } from '../model/llama';
import type { ModelConfig } from '../model/config';
import type { KVCache, PageStore } from './kv-cache';
import {
  KvqCache, KvqLayerCalibration, kvBytesPerToken, kvqAttention, kvqAttentionWorkspaceSize, kvqRopeAppend,
} from '../ops/kvquant';
import { KvqCalibration, calibrationTensors, checkKvqCalibrationDims, checkLayerSlots, layerSlots, loadKvqCalibration } from '../quant/kvquant';

/** `loadModel(dir, { kvCache })`: a quantized KV cache. */
export interface KvCacheOptions {
  /** 2, 3 or 4; must equal the calibration's. */
  bits: number;
  /** A calibration file (squeezelm calibrate-kv) or a loaded calibration. */
  calibration: string | KvqCalibration;
}

/**
 * Resolves and checks a kvCache option against a model config: bits outside 2..4 are
 * ERR_ARG; bits that differ from the calibration's, or a calibration made for another
 * model (layers, kv heads or head dim differ), are ERR_FORMAT naming the calibration.
 */
export function resolveKvCalibration(cfg: ModelConfig, o: KvCacheOptions): KvqCalibration {
  if (!o || typeof o !== 'object') throw new SqueezeError('ERR_ARG', 'kvCache must be an object { bits, calibration }');
  const { bits } = o;
  if (bits !== 2 && bits !== 3 && bits !== 4) throw new SqueezeError('ERR_ARG', `kvCache.bits must be 2, 3 or 4 (got ${bits})`);
  const expect = { layers: cfg.numLayers, kvHeads: cfg.numKvHeads, headDim: cfg.headDim, bits };
  if (typeof o.calibration === 'string') return loadKvqCalibration(o.calibration, expect);
  const c = o.calibration;
  if (!c || typeof c !== 'object' || !Array.isArray(c.layers))
    throw new SqueezeError('ERR_ARG', 'kvCache.calibration must be a file path or a calibration object');
  const what = 'kvCache.calibration';
  checkKvqCalibrationDims(what, { bits: c.bits, layers: c.layers.length, kvHeads: c.kvHeads, headDim: c.headDim }, expect);
  const HD = c.kvHeads * c.headDim, n = 1 << bits;
  c.layers.forEach((l, i) => {
    if (l.keyLo.length !== HD || l.keyHi.length !== HD || l.keyCodebook.length !== n || l.valueCodebook.length !== n)
      throw new SqueezeError('ERR_FORMAT', `${what}: layer ${i} has tensors of the wrong size`);
  });
  if (c.slots) checkLayerSlots(c.slots, c.layers.length, c.headDim, `${what}.slots`, 'ERR_FORMAT');
  return c;
}

/** Cache bytes per token over all layers (codes, per-token scales, outliers; the per-sequence sink store excluded). */
export function quantizedBytesPerToken(cfg: ModelConfig, cal: KvqCalibration): number {
  let sum = 0;
  for (let l = 0; l < cfg.numLayers; l++)
    sum += kvBytesPerToken({ layers: 1, kvHeads: cfg.numKvHeads, headDim: cfg.headDim, bits: cal.bits, ...layerSlots(cal, l), keyPerToken: !!cal.keyPerToken });
  return sum;
}

interface PromptScratch {
  k: Tensor;
  v: Tensor;
  pageTable: Tensor;
  pages: number;
}

interface State {
  /** This pass is a prompt (see the file comment). */
  prompt: boolean;
  scratch?: PromptScratch;
  /** kvqAttention split scratch (decode workspaces on CUDA). */
  work?: Tensor;
  dispose(): void;
}

export class QuantizedAttention implements AttentionStep, PageStore {
  readonly calibration: KvqCalibration;
  readonly caches: KvqCache[] = [];
  readonly cal: KvqLayerCalibration[] = [];
  private readonly invFreq: Tensor;
  private readonly scale: number;
  /** invFreq for the keys in the cache: the model's (pre-RoPE keys) or zeros (post-RoPE keys). */
  private keyFreq: Tensor | undefined;

  constructor(private readonly cfg: ModelConfig, private readonly kv: KVCache, calibration: KvqCalibration,
    private readonly device: string, private readonly act: DType, sinkRows: number) {
    this.calibration = calibration;
    this.scale = 1 / Math.sqrt(cfg.headDim);
    this.invFreq = Tensor.from(cfg.invFreq, [cfg.invFreq.length], { dtype: 'f32', device });
    try {
      for (let l = 0; l < cfg.numLayers; l++) {
        this.caches.push(new KvqCache({
          pages: kv.numPages, pageSize: kv.pageSize, kvHeads: cfg.numKvHeads, headDim: cfg.headDim, bits: calibration.bits,
          ...layerSlots(calibration, l), sink: calibration.sink, maxSeqs: sinkRows, keyPerToken: !!calibration.keyPerToken, device,
        }));
        this.cal.push(calibrationTensors(calibration, l, device));
      }
      // Post-RoPE keys are stored rotated: attention rotates them by angle 0 (the identity).
      this.keyFreq = calibration.postRope ? Tensor.from(new Float32Array(cfg.headDim / 2), [cfg.headDim / 2], { device }) : this.invFreq;
      kv.addPageStore(this);
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  /** Copies page `from` of every layer (codes and metadata) to page `to` (a forked sequence's partial page). */
  copyPage(from: number, to: number): void {
    for (const c of this.caches)
      for (const t of [c.kCodes, c.vCodes, c.meta]) copyRow(t, from, to);
  }

  /** Copies the fp16 sink rows of slot `from` to slot `to` in every layer (a forked sequence's first tokens). */
  copySlot(from: number, to: number): void {
    for (const c of this.caches)
      for (const t of [c.sinkK, c.sinkV]) copyRow(t, from, to);
  }

  /** Bytes of every layer's quantized pool and sink store. */
  get bytes(): number {
    return this.caches.reduce((a, c) => a + c.byteLength, 0);
  }

  get bytesPerToken(): number {
    return quantizedBytesPerToken(this.cfg, this.calibration);
  }

  private state(ws: Workspace): State {
    let s = ws.attnState as State | undefined;
    if (!s) {
      const st: State = {
        prompt: false,
        dispose() {
          st.scratch?.k.dispose();
          st.scratch?.v.dispose();
          st.scratch?.pageTable.dispose();
          st.work?.dispose();
          st.scratch = undefined;
          st.work = undefined;
        },
      };
      ws.attnState = s = st;
    }
    return s;
  }

  write(ws: Workspace, p: PassInputs): void {
    const s = this.state(ws);
    const B = p.seqLens.length;
    let prompt = ws.T > B;
    for (let b = 0; b < B && prompt; b++) if (p.seqLens[b] !== p.cuQ[b + 1] - p.cuQ[b]) prompt = false;
    s.prompt = prompt;
    if (!prompt) return;
    const ps = this.kv.pageSize, P = this.kv.maxPagesPerSeq;
    const need = Math.ceil(ws.T / ps) + B;
    if (!s.scratch || s.scratch.pages < need) {
      s.dispose();
      const shape = [need, ps, this.cfg.numKvHeads, this.cfg.headDim];
      const k = Tensor.empty(shape, { dtype: this.act, device: this.device });
      const v = Tensor.empty(shape, { dtype: this.act, device: this.device });
      const pageTable = Tensor.empty([B, P], { dtype: 'i32', device: this.device });
      s.scratch = { k, v, pageTable, pages: need };
    }
    const pt = new Int32Array(B * P);
    let next = 0;
    for (let b = 0; b < B; b++) {
      const n = Math.ceil(p.seqLens[b] / ps);
      for (let i = 0; i < n; i++) pt[b * P + i] = next++;
    }
    s.scratch.pageTable.write(pt);
  }

  prepareDecode(ws: Workspace, B: number, maxSeqLen: number): void {
    if (this.device === 'cpu') return;
    const c = this.cfg;
    const n = kvqAttentionWorkspaceSize(this.device, B, c.numHeads, c.numKvHeads, c.headDim, maxSeqLen);
    const s = this.state(ws);
    if (n > 0 && (!s.work || s.work.numel < n)) {
      s.work?.dispose();
      s.work = Tensor.empty([n], { dtype: 'f32', device: this.device });
    }
  }

  layer(ws: Workspace, l: number, maxQ: number, maxSeqLen: number): void {
    const s = this.state(ws);
    const cache = this.caches[l], cal = this.cal[l];
    const rotateKeys = !!this.calibration.postRope;
    if (s.prompt && s.scratch) {
      const sc = s.scratch;
      ops.ropeAppend(ws.q3, sc.k, sc.v, ws.qkv, ws.positions, this.invFreq, sc.pageTable, ws.seqLens, ws.cuQ);
      ops.attention(ws.att, ws.q3, sc.k, sc.v, sc.pageTable, ws.seqLens, ws.cuQ, this.scale, { maxQ, maxSeqLen });
      kvqRopeAppend(null, cache, cal, ws.qkv, ws.positions, this.invFreq, ws.pageTable, ws.seqLens, ws.cuQ, { rotateKeys, sinkRows: ws.slots });
      return;
    }
    kvqRopeAppend(ws.q3, cache, cal, ws.qkv, ws.positions, this.invFreq, ws.pageTable, ws.seqLens, ws.cuQ, { rotateKeys, sinkRows: ws.slots });
    kvqAttention(ws.att, ws.q3, cache, cal, ws.pageTable, ws.seqLens, ws.cuQ, this.keyFreq!, this.scale, maxQ, maxSeqLen,
      { sinkRows: ws.slots, workspace: s.work });
  }

  dispose(): void {
    this.caches.forEach((c) => c.dispose());
    this.caches.length = 0;
    for (const c of this.cal) for (const t of [c.keyLo, c.keyHi, c.keyCodebook, c.valueCodebook]) t.dispose();
    this.cal.length = 0;
    if (this.keyFreq !== this.invFreq) this.keyFreq?.dispose();
    this.keyFreq = undefined;
    this.invFreq.dispose();
  }
}

/** Copies row `from` of t's leading dimension to row `to`. */
function copyRow(t: Tensor, from: number, to: number): void {
  const n = t.numel / t.shape[0];
  ops.copyRange(t, to * n, t, from * n, n);
}
