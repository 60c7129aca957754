/**
 * The LLaMA-family decoder as a sequence of ops over caller-owned buffers. A Workspace holds
 * every buffer one forward pass needs for T query rows of B sequences, so a decode step
 * allocates nothing and can be captured as a CUDA graph: the host writes ids, positions,
 * lengths and page tables into it, then runs (or replays) the pass.
 */
import { SqueezeError } from '../errors';
import { DType, Tensor } from '../tensor';
import * as ops from '../ops';
import { ModelConfig } from './config';
import { ModelWeights } from './weights';
import { KVCache } from '../runtime/kv-cache';
import { linearForward, SqueezeLinearModule } from '../quant/squeezellm';
import type { LutNormOptions } from '../ops/lut';
import type { LoraPool } from '../runtime/lora-pool';
import { LORA_SITES, LoraSite } from './lora';

/** The decoder's linears, as observed by a calibration hook ('head': the lm_head, layer = numLayers). */
export type LinearSite = 'qkv' | 'o' | 'gu' | 'down' | 'head';
let linearObserver: ((layer: number, site: LinearSite, x: Tensor) => void) | null = null;

/**
 * Installs (or with null removes) a hook called with the input of every linear before it runs:
 * used to gather calibration statistics (mean squared input per channel). Off in normal runs.
 */
export function setLinearObserver(f: ((layer: number, site: LinearSite, x: Tensor) => void) | null): void {
  linearObserver = f;
}

let projectionObserver: ((layer: number, qkv: Tensor, positions: Tensor) => void) | null = null;
/**
 * Installs (or with null removes) a hook called with each layer's packed q|k|v projection rows
 * (before RoPE) and their positions: used to calibrate the KV cache quantizer.
 */
export function setProjectionObserver(f: ((layer: number, qkv: Tensor, positions: Tensor) => void) | null): void {
  projectionObserver = f;
}

/** The residual stream between two layers of forward(): x, and the last MLP output not yet added to it. */
export interface ResidualState {
  x: Tensor;
  mlp: Tensor;
}

/**
 * Which layers forward() runs (calibration that measures one layer at a time: the layers before
 * the measured one give the same output every time, so it starts from their saved output).
 * `from` > 0 starts at that layer from `restore` (the state forward() had before it, in a workspace
 * of the same rows) instead of the embedding; `to` < numLayers stops before that layer, hands the
 * state to `save` and makes no logits.
 */
export interface LayerWindow {
  from: number;
  to: number;
  restore?: ResidualState;
  save?: (state: ResidualState) => void;
}
let layerWindow: LayerWindow | null = null;
/** Installs (or with null removes) the layer window of the next forward() passes. Off in normal runs. */
export function setLayerWindow(w: LayerWindow | null): void {
  layerWindow = w;
}

/**
 * Attention with another KV cache than the fp16 pages (e.g. the quantized cache of
 * runtime/kvq-attention.ts): owns the per-layer cache step from the qkv rows to ws.att.
 */
export interface AttentionStep {
  /** Host inputs of the pass about to run in `ws` (after Decoder.write). */
  write(ws: Workspace, p: PassInputs): void;
  /** Scratch a decode workspace of B rows needs up front (so the step can be captured). */
  prepareDecode(ws: Workspace, B: number, maxSeqLen: number): void;
  /** RoPE, cache append and attention of layer l: reads ws.qkv (and ws.positions ...), leaves ws.att. */
  layer(ws: Workspace, l: number, maxQ: number, maxSeqLen: number): void;
  dispose(): void;
}

export class Workspace {
  /** Query rows and sequences this workspace is sized for. */
  readonly T: number;
  readonly B: number;
  /** Rows of `logits`: T (every position) or B (the last row of each sequence). */
  readonly logitRows: number;
  // Inputs the host writes.
  readonly ids: Tensor;
  readonly positions: Tensor;
  readonly seqLens: Tensor;
  readonly cuQ: Tensor;
  readonly pageTable: Tensor;
  readonly lastIdx: Tensor;
  /** Each sequence's slot in the cache (sink rows of a quantized cache). */
  readonly slots: Tensor;
  /** Each row's LoRA adapter slot in the adapter pool (-1: none). */
  readonly loraSlots: Tensor;
  /** Each sequence's squeezed-context length (0: none; Squeezed Attention in decode passes). */
  readonly prefixLens: Tensor;
  /** Each sequence's squeezed context (its row in the decoder's context table; -1: none). */
  readonly contextOf: Tensor;
  /** Whether the pass written last has a sequence on a squeezed context. */
  squeezed = false;
  /**
   * The LoRA sites the pass written last runs deltas at (bit i: LORA_SITES[i]): those where an
   * adapter of one of its rows has weights. A batch on the base model runs none (and keeps the
   * fused decode GEMVs) though a pool is present; adapters on q and v only run the q|k|v site.
   */
  loraSites = 0;
  // Activations.
  readonly x: Tensor;
  readonly h: Tensor;
  /** Packed q | k | v rows of the fused projection: [T, (Hq + 2 Hkv) D]. */
  readonly qkv: Tensor;
  /** Rotated queries, contiguous for attention: [T, Hq, D]. */
  readonly q3: Tensor;
  readonly att: Tensor;
  readonly att2: Tensor;
  readonly o: Tensor;
  readonly gu: Tensor;
  readonly act: Tensor;
  readonly mlp: Tensor;
  readonly last: Tensor;
  readonly logits: Tensor;
  // Sampling.
  readonly temperature: Tensor;
  readonly topK: Tensor;
  readonly topP: Tensor;
  readonly rng: Tensor;
  readonly tokens: Tensor;
  /** Split-KV scratch of the attention op (CUDA decode; sized for maxSeqLen). */
  attnWork?: Tensor;
  /** Per-workspace state of an AttentionStep (scratch tensors), disposed with the workspace. */
  attnState?: { dispose(): void };
  /** loraApply's workspace (decode workspaces on CUDA with an adapter pool; elsewhere the op's own scratch). */
  loraWork?: Tensor;
  private all: Tensor[] = [];

  constructor(cfg: ModelConfig, device: string, act: DType, maxPages: number, T: number, B: number, allLogits: boolean) {
    this.T = T;
    this.B = B;
    this.logitRows = allLogits ? T : B;
    const H = cfg.hiddenSize, D = cfg.headDim, Hq = cfg.numHeads, Hkv = cfg.numKvHeads, I = cfg.intermediateSize;
    const mk = (shape: number[], dtype: DType = act): Tensor => {
      const t = Tensor.empty(shape, { dtype, device });
      this.all.push(t);
      return t;
    };
    try {
      this.ids = mk([T], 'i32');
      this.positions = mk([T], 'i32');
      this.seqLens = mk([B], 'i32');
      this.cuQ = mk([B + 1], 'i32');
      this.pageTable = mk([B, maxPages], 'i32');
      this.lastIdx = mk([B], 'i32');
      this.slots = mk([B], 'i32');
      this.loraSlots = mk([T], 'i32');
      this.prefixLens = mk([B], 'i32');
      this.contextOf = mk([B], 'i32');
      this.x = mk([T, H]);
      this.h = mk([T, H]);
      this.qkv = mk([T, (Hq + 2 * Hkv) * D]);
      this.q3 = mk([T, Hq, D]);
      this.att = mk([T, Hq, D]);
      this.att2 = this.att.view(0, [T, Hq * D]);
      this.o = mk([T, H]);
      this.gu = mk([T, 2 * I]);
      this.act = mk([T, I]);
      this.mlp = mk([T, H]);
      this.last = allLogits ? this.h : mk([B, H]);
      this.logits = mk([this.logitRows, cfg.vocabSize]);
      this.temperature = mk([B], 'f32');
      this.topK = mk([B], 'i32');
      this.topP = mk([B], 'f32');
      this.rng = mk([B, 2], 'u32');
      this.tokens = mk([B], 'i32');
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  get bytes(): number {
    return this.all.reduce((a, t) => a + t.byteLength, 0);
  }

  dispose(): void {
    this.all.forEach((t) => t.dispose());
    this.all = [];
    this.attnWork?.dispose();
    this.attnWork = undefined;
    this.attnState?.dispose();
    this.attnState = undefined;
    this.loraWork?.dispose();
    this.loraWork = undefined;
  }
}

/** Host-side inputs of one pass: B sequences with n_b new tokens each. */
export interface PassInputs {
  ids: Int32Array;
  positions: Int32Array;
  seqLens: Int32Array;
  cuQ: Int32Array;
  pageTable: Int32Array;
  lastIdx: Int32Array;
  /** Each sequence's cache slot (-1 without slots). */
  slots: Int32Array;
  /** Each row's adapter slot (-1: none). */
  loraSlots: Int32Array;
  /** Each sequence's squeezed-context length (0: none). */
  prefixLens: Int32Array;
  /** Each sequence's squeezed context (-1: none). */
  contextOf: Int32Array;
}

/**
 * A squeezed context (Squeezed Attention): the cluster index of its keys per layer (device tensors,
 * centroids [Hkv, C, D] f32, clusterStart [Hkv, C + 1], clusterTokens [Hkv, P]), and how many
 * clusters a decode query attends to. Sequences bound to it (bindSqueezed) decode over its clusters.
 * Decoder.addSqueezed moves the index into the decoder's flat arrays: `layers` is empty from then
 * on (the index is held once, not twice).
 */
export interface SqueezedContext {
  length: number;
  clusters: number;
  topClusters: number;
  layers: Array<{ centroids: Tensor; clusterStart: Tensor; clusterTokens: Tensor }>;
}

/** The decoder's squeezed contexts as the op reads them: one table and, per layer, three flat arrays. */
interface SqueezedSet {
  contexts: SqueezedContext[];
  /** The table on the host: per context, its offsets into the flat arrays, clusters, length, kept clusters. */
  offsets: Int32Array;
  table: Tensor;
  layers: Array<{ centroids: Tensor; clusterStart: Tensor; clusterTokens: Tensor }>;
  maxClusters: number;
}

export class Decoder {
  readonly cfg: ModelConfig;
  readonly w: ModelWeights;
  readonly cache: KVCache;
  readonly device: string;
  readonly act: DType;
  readonly invFreq: Tensor;
  readonly scale: number;
  /** Whether decode passes (<= 2 rows on CUDA) use the fused GEMVs (see canFuse); SQUEEZELM_FUSE=0 starts it off. */
  fuse = process.env.SQUEEZELM_FUSE !== '0';
  /** With fuse: RoPE and the fp16 cache append run in the q|k|v projection's epilogue (linearRopeAppend). */
  fuseRopeAppend = true;
  /**
   * With fuse: a quantized gate|up projection stored paired (linearPairHalf) runs siluMul in its
   * epilogue (SqueezeLinearModule.siluPairs); SQUEEZELM_LUT_SILU=0 starts it off.
   */
  fuseLutSilu = process.env.SQUEEZELM_LUT_SILU !== '0';
  /**
   * With fuse: a quantized projection that reads a block's RMSNorm computes that norm itself (the
   * q|k|v and gate|up projections, lutMatmulPacked's normWeight), and one that ends a block adds its
   * output to the residual stream in its epilogue (o and down, forwardAdd): two norm kernels fewer
   * per layer. A LLaMA-2-7B-shaped step on an H100 (04f62f4), norm fused / apart: 4-bit 2424 / 2558 us,
   * 3-bit 2131 / 2162 us (docs/log/squeezellm-kernels.md; every block of the GEMV normalises x again,
   * which cost the 3-bit step more than it saved before the 3-bit lookups took one byte permute).
   * SQUEEZELM_LUT_NORM=0 starts it off.
   */
  fuseLutNorm = process.env.SQUEEZELM_LUT_NORM !== '0';
  /**
   * With fuse and fuseRopeAppend: a quantized q|k|v projection stored paired (linearPairHalf) does RoPE
   * and the fp16 cache append in its epilogue (SqueezeLinearModule.ropeAppend); SQUEEZELM_LUT_ROPE=0
   * starts it off.
   */
  fuseLutRope = process.env.SQUEEZELM_LUT_ROPE !== '0';
  /**
   * With fuse: a quantized o, gate|up or down projection names the quantized projection that runs
   * after it (gate|up, down, the next layer's q|k|v or a quantized lm_head), whose first codes its
   * GEMV then requests into L2 at its end (ChainOptions.prefetchNext; the 4-bit GEMVs act on it);
   * SQUEEZELM_LUT_PREFETCH=0 starts it off.
   */
  prefetchLut = process.env.SQUEEZELM_LUT_PREFETCH !== '0';
  /** Attention over another cache than the fp16 pages (absent: ropeAppend + attention). */
  readonly attn?: AttentionStep;
  /** LoRA adapters (absent: none can be used); each sequence's adapter slot is bound with bindAdapter. */
  lora?: LoraPool;
  private readonly seqAdapter = new Map<number, number>();
  /** The squeezed contexts decode passes use, if any. */
  private squeeze?: SqueezedSet;
  private readonly seqSqueezed = new Map<number, { ctx: SqueezedContext; length: number }>();

  constructor(cfg: ModelConfig, w: ModelWeights, cache: KVCache, device: string, act: DType, attn?: AttentionStep) {
    this.cfg = cfg;
    this.w = w;
    this.cache = cache;
    this.device = device;
    this.act = act;
    this.attn = attn;
    this.invFreq = Tensor.from(cfg.invFreq, [cfg.invFreq.length], { dtype: 'f32', device });
    this.scale = 1 / Math.sqrt(cfg.headDim);
  }

  /** Rows of sequence `seq` use the adapter in pool slot `slot` (until unbindAdapter). */
  bindAdapter(seq: number, slot: number): void {
    this.seqAdapter.set(seq, slot);
  }

  unbindAdapter(seq: number): void {
    this.seqAdapter.delete(seq);
  }

  /** The LoRA sites a pass over `seqs` runs deltas at (Workspace.loraSites; 0: none). */
  loraSites(seqs: number[]): number {
    return this.loraSitesOf(seqs.map((s) => this.seqAdapter.get(s) ?? -1));
  }

  private loraSitesOf(slots: ArrayLike<number>): number {
    let m = 0;
    if (this.lora) for (let i = 0; i < slots.length; i++) if (slots[i] >= 0) m |= this.lora.siteMask(slots[i]);
    return m;
  }

  /**
   * Decode passes of sequence `seq` attend sparsely to its first `length` tokens, which it shares with
   * squeezed context `ctx` (at most the context's length; its own tokens from there on are attended
   * densely). A context removed meanwhile leaves the sequence attending densely.
   */
  bindSqueezed(seq: number, ctx: SqueezedContext, length: number): void {
    this.seqSqueezed.set(seq, { ctx, length });
  }

  /** Squeezed contexts in use now. */
  get squeezedContexts(): number {
    return this.squeeze?.contexts.length ?? 0;
  }

  /**
   * Adds (or with remove, takes out) a squeezed context: the table and flat arrays are rebuilt, each
   * context's index copied from where it is now (the flat arrays being replaced, or an added context's
   * own tensors, which are freed once copied: `ctx.layers` is then empty).
   */
  addSqueezed(ctx: SqueezedContext): void {
    this.rebuildSqueezed([...(this.squeeze?.contexts ?? []), ctx]);
  }

  removeSqueezed(ctx: SqueezedContext): void {
    this.rebuildSqueezed((this.squeeze?.contexts ?? []).filter((c) => c !== ctx));
  }

  private rebuildSqueezed(contexts: SqueezedContext[]): void {
    const old = this.squeeze;
    for (const c of contexts)
      if (!old?.contexts.includes(c) && c.layers.length !== this.cfg.numLayers)
        throw new SqueezeError('ERR_STATE', 'addSqueezed: the context holds no index (it was added once and removed since)');
    let next: SqueezedSet | undefined;
    if (contexts.length) {
      const device = this.device, Hkv = this.cfg.numKvHeads, D = this.cfg.headDim;
      const table = new Int32Array(6 * contexts.length);
      // elements of centroids, clusterStart and clusterTokens one layer of a context takes
      const sizes = (c: SqueezedContext) => [Hkv * c.clusters * D, Hkv * (c.clusters + 1), Hkv * c.length];
      let cen = 0, start = 0, tok = 0;
      contexts.forEach((c, n) => {
        table.set([cen, start, tok, c.clusters, c.length, c.topClusters], 6 * n);
        const [a, b, t] = sizes(c);
        cen += a;
        start += b;
        tok += t;
      });
      const made: Tensor[] = [];
      try {
        const layers = this.cfg.numLayers ? Array.from({ length: this.cfg.numLayers }, (_, l) => {
          const flat = (name: 'centroids' | 'clusterStart' | 'clusterTokens', n: number) => {
            const t = Tensor.empty([n], { dtype: name === 'centroids' ? 'f32' : 'i32', device });
            made.push(t);
            const field = name === 'centroids' ? 0 : name === 'clusterStart' ? 1 : 2;
            contexts.forEach((c, ci) => {
              const at = table[6 * ci + field];
              const was = old ? old.contexts.indexOf(c) : -1;
              if (was >= 0) {
                // still in the old flat arrays: from its offset there, as long as its own part
                const from = old!.offsets[6 * was + field], len = sizes(c)[field];
                if (len > 0) ops.copyRange(t, at, old!.layers[l][name], from, len);
              } else {
                const src = c.layers[l][name];
                ops.copyRange(t, at, src, 0, src.numel);
              }
            });
            return t;
          };
          return { centroids: flat('centroids', cen), clusterStart: flat('clusterStart', start), clusterTokens: flat('clusterTokens', tok) };
        }) : [];
        const t = Tensor.from(table, [contexts.length, 6], { device });
        made.push(t);
        next = { contexts, offsets: table, table: t, layers, maxClusters: Math.max(...contexts.map((c) => c.clusters)) };
      } catch (e) {
        made.forEach((t) => t.dispose());
        throw e;
      }
    }
    this.squeeze = next;
    // (dispose frees once the work queued on them is done)
    if (old) [old.table, ...old.layers.flatMap((x) => [x.centroids, x.clusterStart, x.clusterTokens])].forEach((t) => t.dispose());
    // An added context's own index now lives in the flat arrays only.
    for (const c of contexts) {
      if (old?.contexts.includes(c) || !c.layers.length) continue;
      c.layers.forEach((x) => [x.centroids, x.clusterStart, x.clusterTokens].forEach((t) => t.dispose()));
      c.layers = [];
    }
  }

  /** Drops a sequence's adapter and squeezed-context bindings and returns its pages to the cache. */
  freeSequence(seq: number): void {
    this.unbindAdapter(seq);
    this.seqSqueezed.delete(seq);
    this.cache.free(seq);
  }

  workspace(T: number, B: number, allLogits: boolean): Workspace {
    return new Workspace(this.cfg, this.device, this.act, this.cache.maxPagesPerSeq, T, B, allLogits);
  }

  /**
   * A decode workspace (one row per sequence) whose attention scratch is allocated up
   * front, so the step can be captured as a graph.
   */
  decodeWorkspace(B: number, maxSeqLen: number): Workspace {
    const ws = this.workspace(B, B, false);
    if (this.attn) {
      try {
        this.attn.prepareDecode(ws, B, maxSeqLen);
      } catch (e) {
        ws.dispose();
        throw e;
      }
    } else if (this.device !== 'cpu') {
      const c = this.cfg;
      const n = ops.attentionWorkspaceSize(this.device, B, c.numHeads, c.numKvHeads, c.headDim, 1, maxSeqLen);
      if (n > 0) {
        try {
          ws.attnWork = Tensor.empty([n], { dtype: 'f32', device: this.device });
        } catch (e) {
          ws.dispose();
          throw e;
        }
      }
    }
    if (this.lora && this.device !== 'cpu') {
      try {
        ws.loraWork = Tensor.empty([Math.max(1, ops.loraWorkspaceSize(this.device, B, this.lora.rankRows))], { dtype: 'f32', device: this.device });
      } catch (e) {
        ws.dispose();
        throw e;
      }
    }
    return ws;
  }

  /**
   * Host inputs for sequences `seqs` (already grown in the cache to their new lengths),
   * each adding `tokens[b]` at the end.
   */
  inputs(seqs: number[], tokens: ArrayLike<number>[], T = tokens.reduce((a, t) => a + t.length, 0)): PassInputs {
    const B = seqs.length, P = this.cache.maxPagesPerSeq;
    const ids = new Int32Array(T), positions = new Int32Array(T);
    const seqLens = new Int32Array(B), cuQ = new Int32Array(B + 1), lastIdx = new Int32Array(B);
    const pageTable = new Int32Array(B * P), slots = new Int32Array(B), loraSlots = new Int32Array(T).fill(-1), prefixLens = new Int32Array(B);
    const contextOf = new Int32Array(B).fill(-1);
    let row = 0;
    for (let b = 0; b < B; b++) {
      const len = this.cache.length(seqs[b]);
      const n = tokens[b].length;
      const adapter = this.seqAdapter.get(seqs[b]) ?? -1;
      for (let j = 0; j < n; j++) {
        ids[row + j] = tokens[b][j];
        positions[row + j] = len - n + j;
        loraSlots[row + j] = adapter;
      }
      row += n;
      seqLens[b] = len;
      const sb = this.squeeze && this.seqSqueezed.get(seqs[b]);
      const ci = sb ? this.squeeze!.contexts.indexOf(sb.ctx) : -1;
      if (sb && ci >= 0) {
        contextOf[b] = ci;
        prefixLens[b] = Math.min(sb.ctx.length, sb.length);
      }
      cuQ[b + 1] = row;
      lastIdx[b] = row - 1;
      this.cache.writePageTable(seqs[b], pageTable, b * P);
      slots[b] = this.cache.slot(seqs[b]);
    }
    return { ids, positions, seqLens, cuQ, pageTable, lastIdx, slots, loraSlots, prefixLens, contextOf };
  }

  /** Writes host inputs into a workspace (stream-ordered). */
  write(ws: Workspace, p: PassInputs): void {
    ws.ids.write(p.ids);
    ws.positions.write(p.positions);
    ws.seqLens.write(p.seqLens);
    ws.cuQ.write(p.cuQ);
    ws.pageTable.write(p.pageTable);
    if (ws.logitRows !== ws.T) ws.lastIdx.write(p.lastIdx);
    ws.squeezed = !!this.squeeze && p.prefixLens.some((x) => x > 0);
    if (ws.squeezed) {
      ws.prefixLens.write(p.prefixLens);
      ws.contextOf.write(p.contextOf);
    }
    ws.loraSites = this.loraSitesOf(p.loraSlots);
    if (this.lora) ws.loraSlots.write(p.loraSlots);
    if (this.attn) {
      ws.slots.write(p.slots);  // read only by another cache's attention (sink rows per sequence)
      this.attn.write(ws, p);
    }
  }

  /**
   * One pass over the workspace's rows: appends their keys and values to the cache and
   * leaves logits in ws.logits (every row, or each sequence's last row).
   * maxQ / maxSeqLen: host upper bounds on rows per sequence and sequence length.
   */
  forward(ws: Workspace, maxQ: number, maxSeqLen: number): void {
    if (this.canFuse(ws)) {
      this.forwardFused(ws, maxQ, maxSeqLen);
      return;
    }
    const { cfg, w } = this;
    const eps = cfg.rmsNormEps;
    const win = layerWindow, from = win?.from ?? 0, to = win?.to ?? cfg.numLayers;
    if (from > 0) {
      if (!win?.restore) throw new SqueezeError('ERR_INTERNAL', 'forward: a layer window from layer > 0 needs the state to restore');
      ops.copy(ws.x, win.restore.x);
      ops.copy(ws.mlp, win.restore.mlp);
    } else {
      ops.embedding(ws.x, ws.ids, w.embed);
    }
    // (no site bit is set without an adapter pool: loraSitesOf)
    const sites = ws.loraSites;
    const delta = (l: number, site: LoraSite, y: Tensor, x: Tensor) => {
      if (sites & (1 << LORA_SITES.indexOf(site))) this.lora!.apply(l, site, y, x, ws.loraSlots, ws.loraWork);
    };
    for (let l = from; l < to; l++) {
      const L = w.layers[l];
      if (l === 0) ops.rmsNorm(ws.h, ws.x, L.ln1, eps);
      else ops.addRmsNorm(ws.x, ws.mlp, ws.h, L.ln1, eps);
      linearObserver?.(l, 'qkv', ws.h);
      linearForward(ws.qkv, ws.h, L.wqkv, L.bqkv);
      delta(l, 'qkv', ws.qkv, ws.h);
      projectionObserver?.(l, ws.qkv, ws.positions);
      this.attentionLayer(ws, l, maxQ, maxSeqLen);
      linearObserver?.(l, 'o', ws.att2);
      linearForward(ws.o, ws.att2, L.wo, L.bo);
      delta(l, 'o', ws.o, ws.att2);
      ops.addRmsNorm(ws.x, ws.o, ws.h, L.ln2, eps);
      linearObserver?.(l, 'gu', ws.h);
      linearForward(ws.gu, ws.h, L.wgu, L.bgu);
      delta(l, 'gu', ws.gu, ws.h);
      ops.siluMul(ws.act, ws.gu);
      linearObserver?.(l, 'down', ws.act);
      linearForward(ws.mlp, ws.act, L.wdown, L.bdown);
      delta(l, 'down', ws.mlp, ws.act);
    }
    if (to < cfg.numLayers) {
      win?.save?.({ x: ws.x, mlp: ws.mlp });
      return;
    }
    ops.addRmsNorm(ws.x, ws.mlp, ws.h, w.norm, eps);
    this.logitsFrom(ws, maxQ);
  }

  /**
   * Whether a pass over `ws` takes the fused decode path: on (`fuse`), CUDA, at most 2 rows (the
   * fused GEMV is the FMA kernel; from 3 rows the tensor-core GEMV of the plain path is faster),
   * no calibration hook, no row on a LoRA adapter (the deltas run after the plain projections; a
   * batch on the base model keeps the fused path though a pool is present). On the H200 the
   * LLaMA-7B batch-1 step measured 4.16 ms fused against
   * 4.29 ms plain with ordinary launches, and 4.09 ms both with CUDA graphs (bench decode).
   */
  canFuse(ws: Workspace): boolean {
    return this.fuse && this.device !== 'cpu' && ws.T <= 2 && !ws.loraSites &&
      !linearObserver && !projectionObserver && !layerWindow;
  }

  /**
   * The decode pass with fused GEMVs: the RMSNorm of each block's input runs inside the
   * projection that reads it, the residual adds inside the projections that end a block, and
   * SiLU-and-mul inside the gate|up projection, RoPE and the cache append inside the q|k|v
   * projection (fp16 cache). Per layer 4 GEMVs + attention, against 10 kernels in forward()'s
   * plain sequence. A quantized linear keeps the plain ops around it, but for a gate|up stored
   * paired, whose epilogue does siluMul, and a q|k|v stored paired, whose epilogue does RoPE and
   * the cache append. With fuseLutNorm a quantized projection also takes the norm in front (q|k|v,
   * gate|up) or the residual add behind (o, down): a quantized layer is then 4 GEMVs + attention.
   */
  private forwardFused(ws: Workspace, maxQ: number, maxSeqLen: number): void {
    const { cfg, w } = this;
    const eps = cfg.rmsNormEps;
    // The CUDA GEMV takes the norm for up to 2 rows (canFuse) with K a multiple of 8.
    const lutNorm = this.fuseLutNorm && cfg.hiddenSize % 8 === 0;
    // The quantized linear a launch names as the one after it (prefetchLut), or null.
    const after = (m: Tensor | SqueezeLinearModule | undefined): SqueezeLinearModule | null =>
      this.prefetchLut && m !== undefined && !(m instanceof Tensor) ? m : null;
    // A quantized projection that ends a block leaves its output here instead of adding it to the
    // residual stream x at once: the next RMSNorm then adds it in the same launch (addRmsNorm),
    // one kernel fewer per block. A fused fp16 projection reads x, so it flushes first.
    let pending: Tensor | null = null;
    const flush = (): void => {
      if (pending) ops.add(ws.x, ws.x, pending);
      pending = null;
    };
    const normInto = (weight: Tensor): void => {
      if (pending) ops.addRmsNorm(ws.x, pending, ws.h, weight, eps);
      else ops.rmsNorm(ws.h, ws.x, weight, eps);
      pending = null;
    };
    // The input of a quantized projection that reads a block's RMSNorm: x, with the norm in the
    // projection's options (lutNorm), or ws.h after the norm kernel.
    const normedInput = (weight: Tensor): [Tensor, LutNormOptions | undefined] => {
      if (!lutNorm) {
        normInto(weight);
        return [ws.h, undefined];
      }
      flush();
      return [ws.x, { normWeight: weight, eps }];
    };
    ops.embedding(ws.x, ws.ids, w.embed);
    for (let l = 0; l < cfg.numLayers; l++) {
      const L = w.layers[l];
      if (L.wqkv instanceof Tensor && !this.attn && this.fuseRopeAppend) {
        // q|k|v projection with RoPE and the fp16 cache append in its epilogue, then attention
        flush();
        const kc = this.cache.k[l], vc = this.cache.v[l];
        ops.linearRopeAppend(ws.q3, kc, vc, ws.x, L.wqkv, {
          bias: L.bqkv, normWeight: L.ln1, eps, positions: ws.positions, invFreq: this.invFreq,
          pageTable: ws.pageTable, seqLens: ws.seqLens, cuQ: ws.cuQ,
        });
        this.pagedAttention(ws, l, maxQ, maxSeqLen);
      } else if (!(L.wqkv instanceof Tensor) && L.wqkv.ropeAppend && !this.attn && this.fuseRopeAppend && this.fuseLutRope && !L.bqkv) {
        // quantized q|k|v stored paired: RoPE and the fp16 cache append in its epilogue
        const [xin, norm] = normedInput(L.ln1);
        L.wqkv.ropeAppend(ws.q3, this.cache.k[l], this.cache.v[l], xin, {
          positions: ws.positions, invFreq: this.invFreq, pageTable: ws.pageTable, seqLens: ws.seqLens, cuQ: ws.cuQ, ...norm,
        });
        this.pagedAttention(ws, l, maxQ, maxSeqLen);
      } else {
        if (L.wqkv instanceof Tensor) {
          flush();
          ops.fusedLinear(ws.qkv, ws.x, L.wqkv, { bias: L.bqkv, normWeight: L.ln1, eps });
        } else if (!L.bqkv) {
          const [xin, norm] = normedInput(L.ln1);
          L.wqkv.forward(ws.qkv, xin, norm);
        } else {
          normInto(L.ln1);
          linearForward(ws.qkv, ws.h, L.wqkv, L.bqkv);
        }
        this.attentionLayer(ws, l, maxQ, maxSeqLen);
      }
      if (L.wo instanceof Tensor) {
        flush();
        ops.fusedLinear(ws.x, ws.att2, L.wo, { bias: L.bo, epilogue: 'residual' });
      } else if (lutNorm && !L.bo) {
        flush();
        L.wo.forwardAdd(ws.x, ws.att2, { prefetchNext: after(L.wgu) });
      } else {
        linearForward(ws.o, ws.att2, L.wo, L.bo);
        pending = ws.o;
      }
      if (L.wgu instanceof Tensor) {
        flush();
        ops.fusedLinear(ws.act, ws.x, L.wgu, { bias: L.bgu, normWeight: L.ln2, eps, epilogue: 'siluPairs' });
      } else if (this.fuseLutSilu && L.wgu.siluPairs && !L.bgu) {
        const [xin, norm] = normedInput(L.ln2);
        L.wgu.siluPairs(ws.act, xin, { ...norm, prefetchNext: after(L.wdown) });
      } else {
        normInto(L.ln2);
        linearForward(ws.gu, ws.h, L.wgu, L.bgu);
        ops.siluMul(ws.act, ws.gu);
      }
      if (L.wdown instanceof Tensor) {
        flush();
        ops.fusedLinear(ws.x, ws.act, L.wdown, { bias: L.bdown, epilogue: 'residual' });
      } else if (lutNorm && !L.bdown) {
        flush();
        L.wdown.forwardAdd(ws.x, ws.act, { prefetchNext: after(l + 1 < cfg.numLayers ? w.layers[l + 1].wqkv : w.lmHead) });
      } else {
        linearForward(ws.mlp, ws.act, L.wdown, L.bdown);
        pending = ws.mlp;
      }
    }
    normInto(w.norm);
    this.logitsFrom(ws, maxQ);
  }

  /**
   * Layer l's attention from ws.qkv into ws.att: the AttentionStep of another cache, or RoPE on q
   * and k with k and v appended to the fp16 pages (one launch), then paged attention.
   */
  private attentionLayer(ws: Workspace, l: number, maxQ: number, maxSeqLen: number): void {
    if (this.attn) {
      this.attn.layer(ws, l, maxQ, maxSeqLen);
      return;
    }
    ops.ropeAppend(ws.q3, this.cache.k[l], this.cache.v[l], ws.qkv, ws.positions, this.invFreq, ws.pageTable, ws.seqLens, ws.cuQ);
    this.pagedAttention(ws, l, maxQ, maxSeqLen);
  }

  /**
   * Attention of ws.q3 (rotated) over layer l's fp16 pages into ws.att. A decode pass with a
   * sequence on the squeezed context takes Squeezed Attention (the others in it attend densely).
   */
  private pagedAttention(ws: Workspace, l: number, maxQ: number, maxSeqLen: number): void {
    const sq = this.squeeze;
    if (sq && ws.squeezed && maxQ === 1 && ws.T === ws.B) {
      const c = sq.layers[l];
      ops.squeezedAttention(ws.att, ws.q3, this.cache.k[l], this.cache.v[l], ws.pageTable, ws.seqLens, this.scale, ws.prefixLens,
        ws.contextOf, sq.table, c.centroids, c.clusterStart, c.clusterTokens, sq.maxClusters);
      return;
    }
    ops.attention(ws.att, ws.q3, this.cache.k[l], this.cache.v[l], ws.pageTable, ws.seqLens, ws.cuQ, this.scale,
      { maxQ, maxSeqLen, workspace: ws.attnWork });
  }

  /** Logits of every row (allLogits workspaces) or of each sequence's last row, from ws.h. */
  private logitsFrom(ws: Workspace, maxQ: number): void {
    const w = this.w;
    let x = ws.h;
    if (!(ws.logitRows === ws.T || (ws.T === ws.B && maxQ === 1))) {
      ops.gatherRows(ws.last, ws.h, ws.lastIdx);
      x = ws.last;
    }
    linearObserver?.(this.cfg.numLayers, 'head', x);
    linearForward(ws.logits, x, w.lmHead);  // dense, or SqueezeLLM-quantized (quantize --lm-head)
  }

  /** Samples one token per sequence from ws.logits (B rows) into ws.tokens. */
  sample(ws: Workspace): void {
    ops.sample(ws.tokens, ws.logits, ws.temperature, ws.topK, ws.topP, ws.rng);
  }

  dispose(): void {
    this.invFreq.dispose();
    this.attn?.dispose();
    this.lora?.dispose();
    this.rebuildSqueezed([]);
  }
}
