/**
 * The public face of a loaded decoder: loadModel(dir) / createRandomModel(config), logits
 * over a prompt, streaming generation (one request or many, continuously batched),
 * dispose.
 */
import * as os from 'os';
import { SqueezeError } from '../errors';
import { DType, Tensor } from '../tensor';
import type { SqueezeLinearModule } from '../quant/squeezellm';
import { devices, resolveDevice, synchronize } from '../device';
import { ModelConfig, loadConfig, parseConfig, parameterCount } from './config';
import { Checkpoint } from './safetensors';
import { Tokenizer } from './tokenizer';
import {
  LoadProgress, ModelWeights, RandomQuantizeOptions, disposeWeights, loadWeights, randomQuantizedWeights, randomWeights,
} from './weights';
import { Decoder } from './llama';
import { KVCache } from '../runtime/kv-cache';
import { KvCacheOptions, QuantizedAttention, quantizedBytesPerToken, resolveKvCalibration } from '../runtime/kvq-attention';
import type { KvqCalibration } from '../quant/kvquant';
import { GenerateRequest, GenerateResult, GenerationStream, PrefixEntry, Scheduler, collect } from '../runtime/scheduler';
import { tokenNllRows } from '../runtime/ppl';
import { LoraPool, LoraPoolOptions } from '../runtime/lora-pool';
import { readLoraAdapter } from './lora';
import { clusterKeys, clusterKeysOnDevice } from '../quant/squeezed';
import { gatherRows } from '../ops/elementwise';
import type { SqueezedContext } from './llama';

export interface LoadOptions {
  device?: 'auto' | 'cpu' | 'cuda' | string;
  /** Activation dtype on CUDA: f16 (default) or bf16 (default for bf16 checkpoints). */
  dtype?: 'f16' | 'bf16';
  onProgress?: (p: LoadProgress) => void;
  /** Sequences decoded together at most (default 8). */
  maxBatch?: number;
  /** Longest sequence (default: the model's max_position_embeddings, at most 4096). */
  maxContext?: number;
  /** KV pages in the pool (default: maxBatch full-length sequences, within half the free GPU memory). */
  kvPages?: number;
  /** Tokens per KV page (default 16). */
  pageSize?: number;
  /** CUDA graphs for decode steps (default on; SQUEEZELM_NO_GRAPHS=1 turns them off). */
  graphs?: boolean;
  /**
   * A KVQuant cache: `{ bits: 2 | 3 | 4, calibration: file | KvqCalibration }` (squeezelm
   * calibrate-kv makes the file). Absent: the fp16 (activation dtype) cache.
   */
  kvCache?: KvCacheOptions;
  /**
   * LoRA adapters (PEFT folders, model.loadAdapter): `{ maxAdapters, maxRank }` sizes the device
   * pool (adapters resident at once, default 4; rows per adapter, layer and site, default 64).
   * Absent: no adapters can be used. Batches with no sequence on an adapter run no LoRA deltas
   * and keep the fused decode kernels either way.
   */
  lora?: LoraPoolOptions;
}

/** A prompt prefix kept in the KV cache (model.cachePrefix); dispose() lets its pages go. */
export interface CachedPrefix {
  /** Its tokens. */
  readonly length: number;
  /** The adapter its keys and values were computed with (undefined: the base model). */
  readonly adapter?: string;
  /** With `squeeze`: clusters per kv head, and how many of them a decode query attends to. */
  readonly clusters?: number;
  readonly topClusters?: number;
  readonly disposed: boolean;
  dispose(): void;
}

/** Squeezed Attention over a cached prefix (cachePrefix's `squeeze`). */
export interface SqueezeOptions {
  /** Clusters per layer and kv head (default: one per 16 prefix tokens). */
  clusters?: number;
  /** Share of the clusters a decode query attends to (default 0.25). */
  keep?: number;
  /** Lloyd iterations of the k-means (default 20). */
  iterations?: number;
  /**
   * Where the k-means measures distances: 'host' (a JavaScript loop, k-means++ seeds), 'device'
   * (one matmul per iteration on the model's device, random seeds), 'auto' (default: the device
   * once prefix x clusters x head_dim passes 2e7, where the host loop would take seconds per head).
   */
  kmeans?: 'host' | 'device' | 'auto';
}

/** What loadAdapter read. */
export interface AdapterInfo {
  name: string;
  source: string;
  /** Rank and scale of each targeted module (q_proj, ...). */
  ranks: Record<string, number>;
  scales: Record<string, number>;
  /** Host bytes it takes (fp32); on the device it takes a pool slot while resident. */
  bytes: number;
}

export class Model {
  readonly config: ModelConfig;
  readonly tokenizer: Tokenizer | undefined;
  readonly device: string;
  /** Activation dtype. */
  readonly dtype: DType;
  /** The dtype the weight matrices hold on the device. */
  readonly weightDtype: DType;
  readonly parameters: number;
  /** @internal */
  readonly decoder: Decoder;
  private readonly weights: ModelWeights;
  private readonly cache: KVCache;
  private readonly kvq: QuantizedAttention | undefined;
  private readonly scheduler: Scheduler;
  private disposed = false;
  private inflight = new Set<Promise<unknown>>();
  /** The live cached prefixes (removed when disposed; the rest are disposed with the model). */
  private readonly prefixEntries = new Map<CachedPrefix, PrefixEntry>();
  /** @internal use loadModel / createRandomModel */
  constructor(cfg: ModelConfig, tok: Tokenizer | undefined, device: string, act: DType, w: ModelWeights, o: LoadOptions,
    kvCal?: KvqCalibration) {
    this.config = cfg;
    this.tokenizer = tok;
    this.device = device;
    this.dtype = act;
    this.weights = w;
    this.weightDtype = w.dtype;
    this.parameters = parameterCount(cfg, w.tied);
    const maxBatch = o.maxBatch ?? 8;
    if (!Number.isInteger(maxBatch) || maxBatch < 1) throw new SqueezeError('ERR_ARG', `maxBatch must be a positive integer, got ${maxBatch}`);
    const maxContext = contextOf(cfg, o);
    if (o.lora && typeof o.lora !== 'object') throw new SqueezeError('ERR_ARG', 'lora must be an object ({ maxAdapters?, maxRank? })');
    const pageSize = o.pageSize ?? 16;
    const pagesPerSeq = Math.ceil(maxContext / pageSize);
    let pages = o.kvPages ?? pagesPerSeq * maxBatch;
    if (o.kvPages === undefined && device !== 'cpu') {
      const free = devices().find((d) => d.id === device)?.freeMemory;
      const perPage = pageSize * (kvCal ? quantizedBytesPerToken(cfg, kvCal) : 2 * cfg.numLayers * cfg.numKvHeads * cfg.headDim * 2);
      if (free) pages = Math.max(pagesPerSeq, Math.min(pages, Math.floor((free * 0.5) / perPage)));
    }
    // A quantized cache keeps its own page pools; sequences hold a slot (their fp16 sink row):
    // the scheduler's maxBatch plus as many for logitsBatch calls alongside it.
    const slots = kvCal && kvCal.sink > 0 ? 2 * maxBatch : undefined;
    this.cache = new KVCache({
      device, dtype: act, numLayers: cfg.numLayers, numKvHeads: cfg.numKvHeads, headDim: cfg.headDim,
      pageSize, maxContext, numPages: pages, storage: !kvCal, slots,
    });
    let attn: QuantizedAttention | undefined;
    try {
      if (kvCal) attn = new QuantizedAttention(cfg, this.cache, kvCal, device, act, slots ?? 1);
      this.decoder = new Decoder(cfg, w, this.cache, device, act, attn);
    } catch (e) {
      attn?.dispose();
      this.cache.dispose();
      throw e;
    }
    this.kvq = attn;
    if (o.lora) {
      try {
        this.decoder.lora = new LoraPool(cfg, device, act, o.lora);
      } catch (e) {
        this.decoder.dispose();
        this.cache.dispose();
        throw e;
      }
    }
    const graphs = device !== 'cpu' && (o.graphs ?? process.env.SQUEEZELM_NO_GRAPHS !== '1');
    this.scheduler = new Scheduler(this.decoder, tok, { maxBatch, graphs, eosTokenIds: cfg.eosTokenIds });
  }

  /**
   * Whether decode steps replay CUDA graphs now (never on the CPU, and not while a squeezed context
   * is cached: its steps run eagerly). Setting it sets the preference, which holds again once the
   * last squeezed context is gone.
   */
  get graphs(): boolean {
    return this.scheduler.o.graphs && this.decoder.squeezedContexts === 0;
  }

  set graphs(on: boolean) {
    this.scheduler.o.graphs = on && this.device !== 'cpu';
  }

  get maxContext(): number {
    return this.cache.maxContext;
  }

  /** KV pages free now (all of them when nothing runs). */
  get freeKvPages(): number {
    return this.cache.freePages;
  }

  get kvPages(): number {
    return this.cache.numPages;
  }

  /**
   * The KV cache: bits per element (2/3/4 quantized; else the activation dtype's: 16, or 32
   * on the CPU), bytes per token over all layers, and the calibration of a quantized cache.
   */
  get kvCache(): { bits: number; quantized: boolean; bytesPerToken: number; calibration?: KvqCalibration } {
    if (this.kvq) return { bits: this.kvq.calibration.bits, quantized: true, bytesPerToken: this.kvq.bytesPerToken, calibration: this.kvq.calibration };
    const c = this.config, es = this.dtype === 'f32' ? 4 : 2;
    return { bits: 8 * es, quantized: false, bytesPerToken: 2 * c.numLayers * c.numKvHeads * c.headDim * es };
  }

  /**
   * The SqueezeLLM-quantized linears, if any: their bit widths, how many modules (q|k|v and gate|up
   * fused, as loaded; the lm_head where it is quantized, `lmHead`) and the bytes they hold on the
   * device (codes, tables, outliers).
   */
  get quantization(): { method: 'squeezellm'; bits: number[]; modules: number; bytes: number; lmHead: boolean } | undefined {
    const w = this.weights;
    const mods = [...w.layers.flatMap((l) => [l.wqkv, l.wo, l.wgu, l.wdown]), w.lmHead].filter((x) => !(x instanceof Tensor)) as SqueezeLinearModule[];
    if (!mods.length) return undefined;
    return { method: 'squeezellm', bits: [...new Set(mods.map((m) => m.bits))].sort(), modules: mods.length,
      bytes: mods.reduce((a, m) => a + m.bytes, 0), lmHead: !(w.lmHead instanceof Tensor) };
  }

  /** Decode statistics: steps run and how many replayed a CUDA graph. */
  get stats(): { steps: number; graphReplays: number; prefills: number; prefixHits: number; prefixTokens: number; captureError?: string } {
    return { ...this.scheduler.stats };
  }

  private check(): void {
    if (this.disposed) throw new SqueezeError('ERR_DISPOSED', 'model is disposed');
  }

  private checkIds(ids: ArrayLike<number>, what: string): Int32Array {
    if (!ids || typeof ids.length !== 'number') throw new SqueezeError('ERR_ARG', `${what}: ids must be an array of token ids`);
    if (ids.length === 0) throw new SqueezeError('ERR_ARG', `${what}: ids is empty`);
    const V = this.config.vocabSize;
    for (let i = 0; i < ids.length; i++) {
      const v = ids[i];
      if (!Number.isInteger(v) || v < 0 || v >= V)
        throw new SqueezeError('ERR_ARG', `${what}: ids[${i}] = ${v} is outside the vocabulary [0, ${V})`);
    }
    if (ids.length > this.cache.maxContext)
      throw new SqueezeError('ERR_CONTEXT_LENGTH', `${what}: ${ids.length} tokens are longer than the context (${this.cache.maxContext})`);
    return Int32Array.from(ids);
  }

  private track<T>(p: Promise<T>): Promise<T> {
    this.inflight.add(p);
    return p.finally(() => this.inflight.delete(p));
  }

  /**
   * Reads a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) and registers it
   * under `name` (default: the folder's name) for generate({ adapter }) and logits(ids, { adapter }).
   * Needs a model loaded with `lora`; checked against this model's shapes (ERR_FORMAT naming the
   * tensor where it does not fit), options we do not implement are ERR_UNSUPPORTED.
   */
  async loadAdapter(dir: string, opts: { name?: string } = {}): Promise<AdapterInfo> {
    this.check();
    const pool = this.decoder.lora;
    if (!pool) throw new SqueezeError('ERR_ARG', 'loadAdapter: this model was loaded without LoRA support (loadModel(dir, { lora: {} }))');
    if (typeof dir !== 'string') throw new SqueezeError('ERR_ARG', 'loadAdapter: dir must be a folder path');
    if (opts.name !== undefined && (typeof opts.name !== 'string' || !opts.name)) throw new SqueezeError('ERR_ARG', 'loadAdapter: name must be a non-empty string');
    if (opts.name !== undefined && pool.has(opts.name)) throw new SqueezeError('ERR_ARG', `loadAdapter: an adapter named '${opts.name}' is already loaded`);
    const ad = await readLoraAdapter(dir, this.config, opts.name);
    pool.register(ad);
    return { name: ad.name, source: ad.source, ranks: { ...ad.ranks }, scales: { ...ad.scales }, bytes: ad.bytes };
  }

  /** Forgets an adapter (ERR_STATE while a request uses it). */
  unloadAdapter(name: string): void {
    this.check();
    const pool = this.decoder.lora;
    if (!pool) throw new SqueezeError('ERR_ARG', 'unloadAdapter: this model was loaded without LoRA support');
    // A cached prefix's keys and values were computed with this adapter: another adapter loaded
    // later under the same name must not inherit them.
    const held = [...this.prefixEntries.values()].filter((e) => e.adapter === name).length;
    if (held) throw new SqueezeError('ERR_STATE', `unloadAdapter: ${held} cached prefix(es) were computed with '${name}'; dispose them first`);
    pool.unregister(name);
  }

  /**
   * Keeps the keys and values of a prompt prefix (text or token ids) in the KV cache: every later
   * request whose prompt starts with these tokens (and uses the same adapter) starts from them
   * instead of computing them again; its own tokens go into pages of its own, the prefix's full
   * pages are shared. One prefill now; the pages stay taken until dispose(). With a KVQuant cache
   * the prefix's quantized pages and fp16 sink rows are shared the same way (the prefix holds a
   * sequence slot; the rest of a prompt is then prefilled over the quantized prefix, as decode
   * reads it); `squeeze` needs the fp16 cache (ERR_UNSUPPORTED).
   */
  async cachePrefix(prompt: string | ArrayLike<number>, opts: { adapter?: string; squeeze?: SqueezeOptions } = {}): Promise<CachedPrefix> {
    this.check();
    if (this.kvq && opts.squeeze !== undefined)
      throw new SqueezeError('ERR_UNSUPPORTED', 'cachePrefix: Squeezed Attention reads fp16 keys; a quantized KV cache cannot be squeezed');
    let ids: Int32Array;
    if (typeof prompt === 'string') {
      if (!this.tokenizer) throw new SqueezeError('ERR_ARG', 'cachePrefix: this model has no tokenizer; pass ids');
      ids = this.tokenizer.encode(prompt);
    } else ids = this.checkIds(prompt, 'cachePrefix');
    if (ids.length === 0) throw new SqueezeError('ERR_ARG', 'cachePrefix: the prefix is empty');
    if (ids.length >= this.cache.maxContext)
      throw new SqueezeError('ERR_CONTEXT_LENGTH', `cachePrefix: ${ids.length} tokens leave no room in the context (${this.cache.maxContext})`);
    const adapter = opts.adapter;
    if (adapter !== undefined && !this.decoder.lora?.has(adapter)) throw new SqueezeError('ERR_ARG', `cachePrefix: no adapter named '${String(adapter)}' is loaded`);
    const sq = opts.squeeze;
    let clusters = 0, keep = 0.25, iterations = 20;
    if (sq !== undefined) {
      if (typeof sq !== 'object' || sq === null) throw new SqueezeError('ERR_ARG', 'cachePrefix: squeeze must be an object ({ clusters?, keep?, iterations? })');
      clusters = sq.clusters ?? Math.max(1, Math.round(ids.length / 16));
      if (!Number.isInteger(clusters) || clusters < 1) throw new SqueezeError('ERR_ARG', `cachePrefix: squeeze.clusters must be a positive integer, got ${sq.clusters}`);
      clusters = Math.min(clusters, ids.length);
      keep = sq.keep ?? keep;
      if (typeof keep !== 'number' || !(keep > 0 && keep <= 1)) throw new SqueezeError('ERR_ARG', `cachePrefix: squeeze.keep must be in (0, 1], got ${sq.keep}`);
      iterations = sq.iterations ?? iterations;
      if (!Number.isInteger(iterations) || iterations < 1) throw new SqueezeError('ERR_ARG', `cachePrefix: squeeze.iterations must be a positive integer, got ${sq.iterations}`);
      if (sq.kmeans !== undefined && !['host', 'device', 'auto'].includes(sq.kmeans))
        throw new SqueezeError('ERR_ARG', `cachePrefix: squeeze.kmeans must be 'host', 'device' or 'auto', got ${String(sq.kmeans)}`);
    }
    const seq = this.cache.createSequence();
    let slot: number | undefined;
    try {
      this.cache.grow(seq, ids.length);
      if (adapter !== undefined) {
        slot = this.decoder.lora!.acquire(adapter);
        if (slot === undefined) throw new SqueezeError('ERR_STATE', `cachePrefix: every adapter slot is in use; '${adapter}' cannot be made resident now`);
        this.decoder.bindAdapter(seq, slot);
      }
      await this.track(this.prefillInto(seq, ids));
    } catch (e) {
      this.decoder.freeSequence(seq);
      if (slot !== undefined) this.decoder.lora!.release(slot);
      throw e;
    }
    this.decoder.unbindAdapter(seq);
    if (slot !== undefined) this.decoder.lora!.release(slot);
    let squeezed: SqueezedContext | undefined;
    if (sq !== undefined) {
      try {
        const onDevice = sq.kmeans === 'device' || ((sq.kmeans ?? 'auto') === 'auto' && ids.length * clusters * this.config.headDim > 2e7);
        squeezed = await this.squeezeContext(seq, ids.length, clusters, Math.max(1, Math.ceil(keep * clusters)), iterations, onDevice);
      } catch (e) {
        this.cache.free(seq);
        throw e;
      }
      try {
        this.decoder.addSqueezed(squeezed);
      } catch (e) {
        this.cache.free(seq);
        disposeSqueezed(squeezed);
        throw e;
      }
    }
    const entry: PrefixEntry = { seq, ids, adapter, squeezed };
    this.scheduler.addPrefix(entry);
    let disposed = false;
    const cache = this.cache, scheduler = this.scheduler, decoder = this.decoder, entries = this.prefixEntries;
    const handle: CachedPrefix = {
      length: ids.length,
      adapter,
      clusters: squeezed ? clusters : undefined,
      topClusters: squeezed?.topClusters,
      get disposed() {
        return disposed;
      },
      dispose() {
        if (disposed) return;
        disposed = true;
        entries.delete(handle);
        scheduler.removePrefix(entry);
        cache.free(seq);  // requests forked from it keep the pages they share until they end
        if (squeezed) {
          // requests still running on it attend densely from their next step on (their pages are theirs)
          decoder.removeSqueezed(squeezed);
          disposeSqueezed(squeezed);  // (freed once the work queued on it is done)
        }
      },
    };
    this.prefixEntries.set(handle, entry);
    return handle;
  }

  /**
   * @internal Mean next-token NLL of each window's tokens after a cached prefix (every window starts
   * with the prefix's ids): positions P + 1 .. L - 1 predicted, token by token as generation
   * sees the cache (with Squeezed Attention where the prefix was squeezed). Measures what a
   * squeezed context costs in quality against the same prefix cached densely.
   */
  async prefixNll(prefix: CachedPrefix, windows: Int32Array[]): Promise<number[]> {
    this.check();
    const entry = this.prefixEntries.get(prefix);
    if (!entry || prefix.disposed) throw new SqueezeError('ERR_ARG', 'prefixNll: not a live prefix of this model');
    const P = entry.ids.length, L = windows[0]?.length ?? 0, B = windows.length, V = this.config.vocabSize;
    if (!B || L < P + 2 || windows.some((w) => w.length !== L || entry.ids.some((x, i) => w[i] !== x)))
      throw new SqueezeError('ERR_ARG', 'prefixNll: windows must share one length > prefix + 1 and start with the prefix');
    windows.forEach((w, i) => this.checkIds(w, `prefixNll[${i}]`));
    return this.track(this.runDecodeNll(windows, L, undefined, undefined, entry));
  }

  /** The cluster index of a prefix sequence's keys, layer by layer, on the model's device. */
  private async squeezeContext(seq: number, P: number, clusters: number, topClusters: number, iterations: number, onDevice: boolean): Promise<SqueezedContext> {
    const cfg = this.config, ps = this.cache.pageSize, Hkv = cfg.numKvHeads, D = cfg.headDim;
    const table = new Int32Array(this.cache.maxPagesPerSeq);
    this.cache.writePageTable(seq, table, 0);
    const np = Math.ceil(P / ps), rowLen = ps * Hkv * D;
    const idx = Tensor.from(table.subarray(0, np), [np], { device: this.device });
    const rows = Tensor.empty([np, rowLen], { dtype: this.dtype, device: this.device });
    const layers: SqueezedContext['layers'] = [];
    try {
      for (let l = 0; l < cfg.numLayers; l++) {
        const pool = this.cache.k[l].view(0, [this.cache.numPages, rowLen]);
        gatherRows(rows, pool, idx);
        pool.dispose();
        let ci;
        if (onDevice) {
          const keys = rows.view(0, [P * Hkv, D]);
          try {
            ci = await clusterKeysOnDevice(keys, P, Hkv, clusters, iterations);
          } finally {
            keys.dispose();
          }
        } else ci = clusterKeys((await rows.toFloat32()).subarray(0, P * Hkv * D), P, Hkv, D, clusters, iterations);
        layers.push({
          centroids: Tensor.from(ci.centroids, [Hkv, ci.clusters, D], { dtype: 'f32', device: this.device }),
          clusterStart: Tensor.from(ci.clusterStart, [Hkv, ci.clusters + 1], { device: this.device }),
          clusterTokens: Tensor.from(ci.clusterTokens, [Hkv, P], { device: this.device }),
        });
        await new Promise<void>((r) => setImmediate(r));
      }
    } catch (e) {
      layers.forEach((x) => [x.centroids, x.clusterStart, x.clusterTokens].forEach((t) => t.dispose()));
      throw e;
    } finally {
      idx.dispose();
      rows.dispose();
    }
    return { length: P, clusters: layers.length ? (layers[0].centroids.shape[1]) : clusters, topClusters, layers };
  }

  /** One prefill of `ids` into sequence `seq` (grown to them), nothing read back. */
  private async prefillInto(seq: number, ids: Int32Array): Promise<void> {
    const ws = this.decoder.workspace(ids.length, 1, false);
    try {
      this.decoder.write(ws, this.decoder.inputs([seq], [ids], ids.length));
      this.decoder.forward(ws, ids.length, ids.length);
      await synchronize(this.device);
    } finally {
      ws.dispose();
    }
  }

  /** Names of the loaded adapters. */
  get adapters(): string[] {
    return this.decoder.lora?.names() ?? [];
  }

  /** Logits of every position, [ids.length, vocab] row-major (one prefill, nothing kept). */
  async logits(ids: ArrayLike<number>, opts: { adapter?: string } = {}): Promise<Float32Array> {
    return (await this.logitsBatch([ids], { adapters: opts.adapter === undefined ? undefined : [opts.adapter] }))[0];
  }

  /** Logits of several independent sequences in one prefill (`adapters[i]`: sequence i's adapter, undefined for none). */
  logitsBatch(batch: ArrayLike<number>[], opts: { adapters?: Array<string | undefined> } = {}): Promise<Float32Array[]> {
    try {
      const seqs = this.checkBatch(batch, 'logitsBatch', 'logits');
      const adapters = opts.adapters ?? [];
      if (!Array.isArray(adapters) || adapters.length > seqs.length) throw new SqueezeError('ERR_ARG', 'logitsBatch: adapters must be an array, one entry per sequence at most');
      for (const a of adapters) {
        if (a === undefined) continue;
        if (typeof a !== 'string') throw new SqueezeError('ERR_ARG', 'logits: adapter must be a string');
        if (!this.decoder.lora) throw new SqueezeError('ERR_ARG', 'logits: this model was loaded without LoRA support (loadModel(dir, { lora: {} }))');
        if (!this.decoder.lora.has(a)) throw new SqueezeError('ERR_ARG', `logits: no adapter named '${a}' is loaded`);
      }
      return this.track(this.runLogits(seqs, true, adapters));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * @internal One prefill of several sequences whose logits nobody reads (calibration: a pass under
   * a layer window that stops early, setLayerWindow in model/llama.ts).
   */
  async prefillOnly(batch: ArrayLike<number>[]): Promise<void> {
    await this.track(this.runLogits(this.checkBatch(batch, 'prefillOnly', 'prefillOnly'), false));
  }

  private checkBatch(batch: ArrayLike<number>[], what: string, item: string): Int32Array[] {
    this.check();
    if (!Array.isArray(batch) || batch.length === 0) throw new SqueezeError('ERR_ARG', `${what}: pass a non-empty array of id arrays`);
    return batch.map((ids, i) => this.checkIds(ids, `${item}[${i}]`));
  }

  private async runLogits(seqs: Int32Array[], read = true, adapters: Array<string | undefined> = []): Promise<Float32Array[]> {
    const ids: number[] = [];
    const held: number[] = [];
    const T = seqs.reduce((a, s) => a + s.length, 0);
    try {
      for (let i = 0; i < seqs.length; i++) {
        const id = this.cache.createSequence();
        ids.push(id);
        this.cache.grow(id, seqs[i].length);
        const name = adapters[i];
        if (name !== undefined) {
          const slot = this.decoder.lora!.acquire(name);
          if (slot === undefined) throw new SqueezeError('ERR_STATE', `logits: every adapter slot is in use; '${name}' cannot be made resident now`);
          held.push(slot);
          this.decoder.bindAdapter(id, slot);
        }
      }
      const ws = this.decoder.workspace(T, seqs.length, read);  // logits of every row only where they are read
      try {
        this.decoder.write(ws, this.decoder.inputs(ids, seqs, T));
        const maxQ = Math.max(...seqs.map((s) => s.length));
        this.decoder.forward(ws, maxQ, maxQ);
        if (!read) {
          await synchronize(this.device);  // the pass's outputs went to the layer window's save hook
          return [];
        }
        const all = await ws.logits.toFloat32();
        const V = this.config.vocabSize;
        const out: Float32Array[] = [];
        let row = 0;
        for (const s of seqs) {
          out.push(all.slice(row * V, (row + s.length) * V));
          row += s.length;
        }
        return out;
      } finally {
        ws.dispose();
      }
    } finally {
      ids.forEach((id) => this.decoder.freeSequence(id));
      held.forEach((s) => this.decoder.lora!.release(s));
    }
  }

  /**
   * @internal Mean next-token NLL of each window (all of one length), fed token by token:
   * teacher-forced decode steps of all windows batched, so every key and value the model
   * attends to (other than a quantized cache's fp16 sink) comes from the cache as decoding
   * sees it. Runs outside the scheduler; its sequences take pages like any other.
   */
  decodeNll(windows: Int32Array[], onStep?: (done: number, total: number) => void, adapter?: string): Promise<number[]> {
    this.check();
    if (adapter !== undefined && !this.decoder.lora?.has(adapter))
      return Promise.reject(new SqueezeError('ERR_ARG', `decodeNll: no adapter named '${String(adapter)}' is loaded`));
    if (!windows.length) throw new SqueezeError('ERR_ARG', 'decodeNll: no windows');
    const L = windows[0].length;
    if (L < 2 || windows.some((w) => w.length !== L)) throw new SqueezeError('ERR_ARG', 'decodeNll: windows must share one length >= 2');
    windows.forEach((w, i) => this.checkIds(w, `decodeNll[${i}]`));
    return this.track(this.runDecodeNll(windows, L, onStep, adapter));
  }

  /**
   * Windows fed token by token: from position 0, or, with `prefix`, from forks of a cached prefix
   * (bound to its squeezed context, if any) from its length on.
   */
  private async runDecodeNll(windows: Int32Array[], L: number, onStep?: (done: number, total: number) => void, adapter?: string,
    prefix?: PrefixEntry): Promise<number[]> {
    const B = windows.length, V = this.config.vocabSize, P = prefix?.ids.length ?? 0;
    const ids: number[] = [];
    const sums = new Float64Array(B);
    let ws: ReturnType<Decoder['decodeWorkspace']> | undefined;
    let slot: number | undefined;
    try {
      if (adapter !== undefined) {
        slot = this.decoder.lora!.acquire(adapter);
        if (slot === undefined) throw new SqueezeError('ERR_STATE', `decodeNll: every adapter slot is in use; '${adapter}' cannot be made resident now`);
      }
      for (let b = 0; b < B; b++) {
        ids.push(prefix ? this.cache.fork(prefix.seq, P) : this.cache.createSequence());
        if (slot !== undefined) this.decoder.bindAdapter(ids[b], slot);
        if (prefix?.squeezed) this.decoder.bindSqueezed(ids[b], prefix.squeezed, P);
      }
      ws = this.decoder.decodeWorkspace(B, L);
      for (let t = P; t < L - 1; t++) {
        for (const id of ids) this.cache.grow(id, t + 1);
        this.decoder.write(ws, this.decoder.inputs(ids, windows.map((w) => [w[t]]), B));
        this.decoder.forward(ws, 1, L);
        const logits = await ws.logits.toFloat32();
        const nll = await tokenNllRows(logits, V, Int32Array.from(windows, (w) => w[t + 1]));
        for (let b = 0; b < B; b++) sums[b] += nll[b];
        onStep?.(t + 1, L - 1);
      }
    } finally {
      ws?.dispose();
      ids.forEach((id) => this.decoder.freeSequence(id));
      if (slot !== undefined) this.decoder.lora!.release(slot);
    }
    return Array.from(sums, (s) => s / (L - 1 - P));
  }

  /**
   * Streams generated tokens ({ id, text }); greedy unless temperature > 0. Bad ids or a
   * prompt longer than the context throw here, before any work.
   */
  generate(req: GenerateRequest): GenerationStream {
    this.check();
    return this.scheduler.submit(req);
  }

  /** Runs many requests in one continuously batched loop; resolves with every result. */
  generateBatch(reqs: GenerateRequest[]): Promise<GenerateResult[]> {
    try {
      this.check();
      if (!Array.isArray(reqs)) throw new SqueezeError('ERR_ARG', 'generateBatch: pass an array of requests');
      const streams = reqs.map((r) => this.scheduler.submit(r));
      return this.track(Promise.all(streams.map(collect)));
    } catch (e) {
      return Promise.reject(e);
    }
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.scheduler.close();
    await Promise.allSettled([...this.inflight]);
    for (const handle of [...this.prefixEntries.keys()]) handle.dispose();  // their squeezed indexes too
    this.decoder.dispose();
    this.cache.dispose();
    disposeWeights(this.weights);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }
}

function contextOf(cfg: ModelConfig, o: LoadOptions): number {
  let c = Math.min(cfg.maxPositionEmbeddings, cfg.slidingWindow ?? Infinity);
  if (o.maxContext !== undefined) {
    if (!Number.isInteger(o.maxContext) || o.maxContext < 1) throw new SqueezeError('ERR_ARG', `maxContext must be a positive integer, got ${o.maxContext}`);
    if (o.maxContext > c)
      throw new SqueezeError('ERR_CONTEXT_LENGTH', `maxContext ${o.maxContext} is longer than the model's ${c} positions`);
    c = o.maxContext;
  } else c = Math.min(c, 4096);
  return c;
}

function activationDtype(cfg: ModelConfig, device: string, dtype?: string): DType {
  if (dtype !== undefined && dtype !== 'f16' && dtype !== 'bf16')
    throw new SqueezeError('ERR_DTYPE', `dtype must be 'f16' or 'bf16', got '${dtype}'`);
  if (device === 'cpu') return 'f32';
  return (dtype as DType | undefined) ?? (cfg.dtype === 'bf16' ? 'bf16' : 'f16');
}

/** Loads a Hugging Face model folder (config.json, safetensors, tokenizer.json). */
export async function loadModel(dir: string, opts: LoadOptions = {}): Promise<Model> {
  const device = resolveDevice(opts.device ?? 'auto');
  const cfg = loadConfig(dir);
  const act = activationDtype(cfg, device, opts.dtype);
  let tok: Tokenizer | undefined;
  try {
    tok = Tokenizer.fromDir(dir);
  } catch (e) {
    if (!/no tokenizer\.json/.test((e as Error).message)) throw e;
  }
  contextOf(cfg, opts);
  const kvCal = opts.kvCache !== undefined ? resolveKvCalibration(cfg, opts.kvCache) : undefined;
  const ck = Checkpoint.open(dir);
  let w: ModelWeights;
  try {
    w = await loadWeights(ck, cfg, { device, act, onProgress: opts.onProgress });
  } finally {
    ck.close();
  }
  try {
    return new Model(cfg, tok, device, act, w, opts, kvCal);
  } catch (e) {
    disposeWeights(w);
    throw e;
  }
}

/**
 * A model of the given config with random weights made on the device (benchmarks at real
 * shapes). `config` is a config.json object or a normalised ModelConfig. With `quantize`, the
 * decoder linears are SqueezeLLM dense-and-sparse at that many bits, quantized in process on the
 * model's device (weights.ts randomQuantizedWeights); embeddings and lm_head stay dense.
 */
export async function createRandomModel(
  config: Record<string, unknown> | ModelConfig,
  opts: LoadOptions & { seed?: number; tokenizer?: Tokenizer; quantize?: RandomQuantizeOptions } = {},
): Promise<Model> {
  const cfg = 'invFreq' in config ? (config as ModelConfig) : parseConfig(config as Record<string, unknown>, 'config');
  const device = resolveDevice(opts.device ?? 'auto');
  const act = activationDtype(cfg, device, opts.dtype);
  contextOf(cfg, opts);
  const kvCal = opts.kvCache !== undefined ? resolveKvCalibration(cfg, opts.kvCache) : undefined;
  const dtype = device === 'cpu' ? 'f16' : act;
  const w = opts.quantize
    ? await randomQuantizedWeights(cfg, { device, dtype, act, seed: opts.seed, quantize: opts.quantize })
    : randomWeights(cfg, { device, dtype, seed: opts.seed });
  try {
    return new Model(cfg, opts.tokenizer, device, act, w, opts, kvCal);
  } catch (e) {
    disposeWeights(w);
    throw e;
  }
}

/** A short description for `squeezelm info`. */
export function describeModel(m: Model): Record<string, unknown> {
  const c = m.config, kv = m.kvCache, q = m.quantization;
  return {
    modelType: c.modelType,
    layers: c.numLayers,
    hidden: c.hiddenSize,
    heads: c.numHeads,
    kvHeads: c.numKvHeads,
    headDim: c.headDim,
    intermediate: c.intermediateSize,
    vocab: c.vocabSize,
    maxPositionEmbeddings: c.maxPositionEmbeddings,
    rope: { ...c.rope },
    tiedEmbeddings: c.tieWordEmbeddings,
    parameters: m.parameters,
    checkpointDtype: c.dtype,
    device: m.device,
    activationDtype: m.dtype,
    weightDtype: m.weightDtype,
    ...(q ? { quantization: q } : {}),
    kvCache: { bits: kv.bits, quantized: kv.quantized, bytesPerToken: kv.bytesPerToken },
    cpuThreads: os.cpus().length,
  };
}

function disposeSqueezed(c: SqueezedContext): void {
  c.layers.forEach((x) => {
    x.centroids.dispose();
    x.clusterStart.dispose();
    x.clusterTokens.dispose();
  });
}
