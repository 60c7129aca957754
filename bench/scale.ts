/**
 * The "scale" suite (manual: `npm run bench -- --only scale`): a LLaMA-2-7B-shaped model with
 * random fp16 weights and a 2-bit KVQuant cache (1% outliers, 1 fp16 sink token) decodes at
 * 1,000,000 tokens of context (SQUEEZELM_SCALE_TOKENS overrides), batch 1.
 *
 * The cache is filled with synthetic quantized data instead of a prefill: random codes made on
 * the device, valid metadata (fp16 value min < max, finite outliers, outlier channels < head
 * dim) built once on the host for a block of records and replicated over every layer's
 * metadata with device copies, random fp16 sink rows. The sequence is grown through the
 * cache's own page bookkeeping (createSequence / grow), so the page table the kernels read is
 * the runtime's. A decode step (every layer, the quantized append of the new token, attention
 * over the whole context, lm_head, sampling) is timed like bench/decode.ts times one.
 *
 * Rows: the step at the full context and at a smaller one (128K; also with the full context as
 * the kernel's length bound, as the scheduler passes it), with bytes = weights + the cache read
 * at that context. Notes: memory (device total, used by weights / cache / other), cache bytes
 * per token per layer, and the largest context an 80 GB H100 would hold (computed from the
 * measured sizes; on an H100 itself, SQUEEZELM_SCALE_TOKENS=fit measures it: the note says so).
 */
import * as os from 'os';
import { native } from '../ts/native';
import { devices } from '../ts/device';
import * as ops from '../ts/ops';
import { Tensor } from '../ts/tensor';
import { createRandomModel, Model } from '../ts/model/model';
import { ModelConfig, parameterCount, parseConfig } from '../ts/model/config';
import { KvqCache, kvqAttentionWorkspaceSize, kvqCodeBytes, kvqMetaBytes } from '../ts/ops/kvquant';
import { KvqCalibration, layerSlots, normalFloatCodebook } from '../ts/quant/kvquant';
import { QuantizedAttention, quantizedBytesPerToken } from '../ts/runtime/kvq-attention';
import { floatToF16 } from '../ts/util/half';
import { BenchContext, BenchResult, Timing, row, stats, timeCuda } from './harness';
import { LLAMA2_7B } from './decode';

const SUITE = 'scale';
const GB = 1e9, GiB = 2 ** 30;
/** Total memory of an 80 GB H100 (HBM3) as the driver reports it (nvidia-smi: 81559 MiB). */
export const H100_80GB_BYTES = 81559 * 2 ** 20;
/** Headroom left free in the fit check and in the H100 estimate (allocator, cuBLAS, fragmentation). */
export const MARGIN_BYTES = 1.5 * GiB;

export interface ScaleOptions {
  /** Model config (default LLaMA-2-7B; max_position_embeddings is raised to the context). */
  config?: Record<string, unknown>;
  /**
   * Context of the main measurement (default SQUEEZELM_SCALE_TOKENS or 1,000,000); 'fit': the
   * largest that this device's free memory holds.
   */
  tokens?: number | 'fit';
  /** The smaller comparison context (default 131072; skipped when not below `tokens`). */
  compareTokens?: number;
  bits?: 2 | 3 | 4;
  /** Outlier share (default 0.01, as calibrate-kv). */
  outliers?: number;
  /** fp16 sink tokens (default 1, as calibrate-kv). */
  sink?: number;
  pageSize?: number;
  /** Timed samples per measurement (default 5; quick 3). */
  repeats?: number;
}

/** A calibration with plausible numbers, made in memory: per-channel key bounds around 0, NormalFloat codebooks. */
export function syntheticCalibration(cfg: ModelConfig, bits: 2 | 3 | 4, outliers: number, sink: number, seed = 7): KvqCalibration {
  let s = seed >>> 0;
  const rnd = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
  const HD = cfg.numKvHeads * cfg.headDim;
  const layers = Array.from({ length: cfg.numLayers }, () => {
    const keyLo = new Float32Array(HD), keyHi = new Float32Array(HD);
    for (let i = 0; i < HD; i++) { keyLo[i] = -1.5 - rnd(); keyHi[i] = 1.5 + rnd(); }
    return { keyLo, keyHi, keyCodebook: normalFloatCodebook(bits), valueCodebook: normalFloatCodebook(bits) };
  });
  return { bits, outliers, sink, kvHeads: cfg.numKvHeads, headDim: cfg.headDim, keyPerToken: false, postRope: false, codebook: 'kmeans', layers };
}

/**
 * `records` valid metadata records (csrc/kernels/kvquant/kvquant_layout.h, mode 0): fp16 value
 * min in [-2, -1) and max in (1, 2], nk + nv finite fp16 outlier values in [-4, 4), distinct
 * outlier channels below headDim for the keys and for the values.
 */
export function syntheticMeta(records: number, headDim: number, nk: number, nv: number, seed: number): Uint8Array {
  const mb = kvqMetaBytes(nk, nv), out = new Uint8Array(records * mb);
  const dv = new DataView(out.buffer);
  let s = seed >>> 0;
  const rnd = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
  const channels = (n: number): number[] => {
    const picked: number[] = [];
    while (picked.length < Math.min(n, headDim)) {
      const c = Math.floor(rnd() * headDim);
      if (!picked.includes(c)) picked.push(c);
    }
    return picked;
  };
  for (let r = 0; r < records; r++) {
    const o = r * mb;
    dv.setUint16(o, floatToF16(-1 - rnd()), true);
    dv.setUint16(o + 2, floatToF16(1 + rnd()), true);
    for (let i = 0; i < nk + nv; i++) dv.setUint16(o + 4 + 2 * i, floatToF16(rnd() * 8 - 4), true);
    const idx = [...channels(nk), ...channels(nv)];
    for (let i = 0; i < nk + nv; i++) out[o + 4 + 2 * (nk + nv) + i] = idx[i];
  }
  return out;
}

/** Memory a run at `tokens` needs, computed before anything is allocated. */
export interface ScalePlan {
  tokens: number;
  pageSize: number;
  pages: number;
  /** Every weight on the device (f16), and what a decode step reads of them (no embedding table). */
  weightBytes: number;
  weightReadBytes: number;
  /** Cache bytes per token: one layer (all kv heads; codes + metadata/outliers), and all layers. */
  perTokenLayer: number;
  perToken: number;
  codeBytesPerHead: number;
  metaBytesPerHead: number;
  /** The quantized page pools of every layer (pages * pageSize tokens). */
  cacheBytes: number;
  /** The fp16 sink store of every layer. */
  sinkBytes: number;
  /** Decode workspace and kvqAttention scratch (one at a time). */
  workspaceBytes: number;
  /** Sum of the above plus MARGIN_BYTES. */
  needBytes: number;
}

export function scalePlan(cfg: ModelConfig, cal: KvqCalibration, tokens: number, pageSize: number, device: string, sinkRows: number): ScalePlan {
  const act = device === 'cpu' ? 4 : 2;
  const params = parameterCount(cfg);
  const weightBytes = 2 * params;
  const weightReadBytes = 2 * (params - cfg.vocabSize * cfg.hiddenSize * (cfg.tieWordEmbeddings ? 0 : 1));
  const slots = layerSlots(cal, 0);
  const codeBytesPerHead = 2 * kvqCodeBytes(cfg.headDim, cal.bits);
  const metaBytesPerHead = kvqMetaBytes(slots.keyOutliers, slots.valueOutliers);
  const perToken = quantizedBytesPerToken(cfg, cal);
  const perTokenLayer = perToken / cfg.numLayers;
  const pages = Math.ceil(tokens / pageSize);
  const cacheBytes = pages * pageSize * perToken;
  const sinkBytes = cfg.numLayers * 2 * Math.max(1, sinkRows) * cal.sink * cfg.numKvHeads * cfg.headDim * 2;
  const H = cfg.hiddenSize, D = cfg.headDim, I = cfg.intermediateSize;
  const wsElems = 5 * H + (cfg.numHeads + 2 * cfg.numKvHeads) * D + 2 * cfg.numHeads * D + 3 * I + cfg.vocabSize;
  const attnScratch = device === 'cpu' ? 0 : 4 * kvqAttentionWorkspaceSize(device, 1, cfg.numHeads, cfg.numKvHeads, D, tokens);
  const workspaceBytes = act * wsElems + attnScratch + 4 * Math.ceil(tokens / pageSize);
  const needBytes = weightBytes + cacheBytes + sinkBytes + workspaceBytes + MARGIN_BYTES;
  return { tokens, pageSize, pages, weightBytes, weightReadBytes, perTokenLayer, perToken, codeBytesPerHead, metaBytesPerHead, cacheBytes, sinkBytes, workspaceBytes, needBytes };
}

const gb = (b: number) => `${(b / GB).toFixed(2)} GB`;

/**
 * The largest context (whole pages) whose plan fits `free` bytes: a binary search over the page
 * count (the plan grows with it), from the cost of one page of cache as the upper bound.
 */
export function largestFit(cfg: ModelConfig, cal: KvqCalibration, pageSize: number, device: string, sinkRows: number, free: number): number {
  const fits = (pages: number) => scalePlan(cfg, cal, Math.max(1, pages) * pageSize, pageSize, device, sinkRows).needBytes <= free;
  const one = scalePlan(cfg, cal, pageSize, pageSize, device, sinkRows);
  if (!fits(1)) return 0;
  let lo = 1, hi = Math.max(1, Math.floor((free - (one.needBytes - one.cacheBytes)) / (one.perToken * pageSize)) + 1);
  while (fits(hi)) hi *= 2;
  while (hi - lo > 1) {  // fits(lo), !fits(hi)
    const mid = Math.floor((lo + hi) / 2);
    if (fits(mid)) lo = mid;
    else hi = mid;
  }
  return lo * pageSize;
}

/**
 * Fills every layer's quantized cache with synthetic data on the device: random codes, valid
 * metadata (one host block uploaded once, then doubled in place over layer 0's metadata and
 * copied to the other layers), random fp16 sink rows.
 */
export async function fillSynthetic(caches: KvqCache[], seed = 1000, blockRecords = 1 << 16): Promise<void> {
  if (!caches.length) return;
  const o = caches[0].opts, device = caches[0].meta.device;
  const first = caches[0].meta;
  const total = first.numel;
  const mb = kvqMetaBytes(o.keyOutliers, o.valueOutliers, o.keyPerToken);
  const block = syntheticMeta(Math.max(1, Math.min(blockRecords, total / mb)), o.headDim, o.keyOutliers, o.valueOutliers, seed);
  const blockDev = Tensor.from(block, [block.length], { dtype: 'u8', device });
  const flat = first.view(0, [total]);
  try {
    let filled = block.length;
    ops.copy(flat.view(0, [filled]), blockDev);
    while (filled < total) {
      const len = Math.min(filled, total - filled);
      ops.copy(flat.view(filled, [len]), flat.view(0, [len]));
      filled += len;
    }
    caches.forEach((c, l) => {
      ops.fillRandomInt(c.kCodes, seed + 10 * l + 1);
      ops.fillRandomInt(c.vCodes, seed + 10 * l + 2);
      if (c.sinkK.numel > 0) {
        ops.fillRandom(c.sinkK, seed + 10 * l + 3, 0, 1);
        ops.fillRandom(c.sinkV, seed + 10 * l + 4, 0, 1);
      }
      if (l > 0) ops.copy(c.meta, first);
    });
    await native().synchronize(device);
  } finally {
    flat.dispose();
    blockDev.dispose();
  }
}

/** Wall-clock timing of fn (the CPU, where there are no CUDA events). */
async function timeWall(device: string, fn: (i: number) => void, warmup: number, iters: number, repeats: number): Promise<Timing> {
  for (let i = 0; i < warmup; i++) fn(i);
  await native().synchronize(device);
  const samples: number[] = [];
  for (let r = 0; r < repeats; r++) {
    const t0 = performance.now();
    for (let i = 0; i < iters; i++) fn(i);
    await native().synchronize(device);
    samples.push(((performance.now() - t0) * 1000) / iters);
  }
  return { plain: stats(samples), graph: null };
}

interface MemInfo { total: number; free: number; allocated: number; peak: number }
function memInfo(device: string): MemInfo {
  if (device === 'cpu') return { total: os.totalmem(), free: os.freemem(), allocated: 0, peak: 0 };
  const d = devices().find((x) => x.id === device);
  const s = native().memoryStats(device);
  return { total: Number(d?.totalMemory ?? 0), free: Number(d?.freeMemory ?? 0), allocated: s.allocated, peak: s.peak };
}

/** The suite body on any device (the CPU at toy sizes for a smoke test). */
export async function runScale(ctx: BenchContext, device: string, opts: ScaleOptions = {}): Promise<BenchResult[]> {
  const log = ctx.log;
  const envTokens = process.env.SQUEEZELM_SCALE_TOKENS;
  // 'fit': the largest context this device's free memory holds (whole pages), found from the plan.
  const fitMode = opts.tokens === 'fit' || (opts.tokens === undefined && envTokens === 'fit');
  let tokens = fitMode ? 0 : opts.tokens !== undefined ? Number(opts.tokens) : envTokens ? Number(envTokens) : 1_000_000;
  if (!fitMode && (!Number.isInteger(tokens) || tokens < 2)) {
    throw new Error(`scale: the context must be an integer >= 2 tokens or 'fit' (SQUEEZELM_SCALE_TOKENS='${envTokens}')`);
  }
  const compare = opts.compareTokens ?? 131072;
  const bits = opts.bits ?? 2, outliers = opts.outliers ?? 0.01, sink = opts.sink ?? 1, pageSize = opts.pageSize ?? 16;
  const repeats = opts.repeats ?? (ctx.quick ? 3 : 5);
  const json: Record<string, unknown> = { ...(opts.config ?? LLAMA2_7B) };
  const cfg0 = parseConfig(json, 'scale config');
  const cal = syntheticCalibration(cfg0, bits, outliers, sink);
  const sinkRows = sink > 0 ? 2 : 1; // Model: 2 * maxBatch slots when the calibration has a sink

  if (device !== 'cpu') native().emptyCache(device); // give back what earlier suites left cached
  const before = memInfo(device);
  if (fitMode) {
    if (device === 'cpu') throw new Error("scale: SQUEEZELM_SCALE_TOKENS=fit needs a CUDA device (the CPU's memory is not the limit measured)");
    tokens = largestFit(cfg0, cal, pageSize, device, sinkRows, before.free);
    if (tokens < 2) throw new Error(`scale: no context fits on ${device}: ${gb(before.free)} free`);
    log(`scale: the largest context that fits ${gb(before.free)} free on ${device}: ${tokens} tokens`);
  }
  json.max_position_embeddings = Math.max(Number(json.max_position_embeddings ?? 0), tokens);
  const cfg = parseConfig(json, 'scale config');
  const plan = scalePlan(cfg, cal, tokens, pageSize, device, sinkRows), slots = layerSlots(cal, 0);
  log(`scale: ${cfg.numLayers} layers x ${cfg.numKvHeads} kv heads x ${cfg.headDim}, ${bits}-bit cache, outliers ${outliers} ` +
    `(${slots.keyOutliers}+${slots.valueOutliers} slots), sink ${sink}, page ${pageSize}, ${tokens} tokens (${plan.pages} pages)`);
  log(`scale: cache ${plan.perTokenLayer} B/token/layer (codes ${plan.codeBytesPerHead} + meta/outliers ${plan.metaBytesPerHead} per kv head), ` +
    `${plan.perToken} B/token over ${cfg.numLayers} layers`);
  log(`scale: need weights ${gb(plan.weightBytes)} + cache ${gb(plan.cacheBytes)} + sink ${gb(plan.sinkBytes)} + workspaces ${gb(plan.workspaceBytes)} ` +
    `+ margin ${gb(MARGIN_BYTES)} = ${gb(plan.needBytes)}; ${device} has ${gb(before.free)} free of ${gb(before.total)}`);
  if (device !== 'cpu' && plan.needBytes > before.free) {
    const fit = Math.floor((before.free - plan.needBytes + plan.cacheBytes) / plan.perToken / pageSize) * pageSize;
    throw new Error(`scale: ${tokens} tokens do not fit on ${device}: weights ${gb(plan.weightBytes)} + cache ${gb(plan.cacheBytes)} ` +
      `(${plan.perToken} B/token) + sink ${gb(plan.sinkBytes)} + workspaces ${gb(plan.workspaceBytes)} + margin ${gb(MARGIN_BYTES)} = ` +
      `${gb(plan.needBytes)} > ${gb(before.free)} free (${gb(before.total)} total); about ${Math.max(0, fit)} tokens would fit ` +
      `(set SQUEEZELM_SCALE_TOKENS)`);
  }

  const t0 = performance.now();
  const model: Model = await createRandomModel(json, {
    device, dtype: 'f16', seed: 1234, maxBatch: 1, maxContext: tokens, kvPages: plan.pages, pageSize, kvCache: { bits, calibration: cal },
  });
  const rows: BenchResult[] = [];
  let seq = -1;
  try {
    const dec = model.decoder;
    const attn = dec.attn;
    if (!(attn instanceof QuantizedAttention)) throw new Error('scale: the model has no quantized cache');
    await native().synchronize(device);
    const tModel = performance.now();
    await fillSynthetic(attn.caches);
    const tFill = performance.now();
    const cacheAlloc = attn.bytes;
    log(`scale: model ${((tModel - t0) / 1000).toFixed(1)} s, synthetic fill ${((tFill - tModel) / 1000).toFixed(1)} s; ` +
      `cache tensors ${gb(cacheAlloc)} (planned ${gb(plan.cacheBytes + plan.sinkBytes)})`);

    seq = dec.cache.createSequence();
    const V = cfg.vocabSize;
    // [label, context, maxSeqLen bound given to the kernels]
    const runs: Array<[string, number, number]> = [];
    if (compare > 1 && compare < tokens) {
      runs.push([`step b1 ctx ${compare}`, compare, compare]);
      runs.push([`step b1 ctx ${compare}, bound ${tokens}`, compare, tokens]);
    }
    runs.push([`step b1 ctx ${tokens}`, tokens, tokens]);
    let after: MemInfo | undefined;
    const pending: Array<{ label: string; L: number; bound: number; t: Timing; bytes: number; bad: number }> = [];
    for (const [label, L, bound] of runs) {
      dec.cache.grow(seq, L); // the step appends position L-1 and attends over L tokens
      const ws = dec.decodeWorkspace(1, bound);
      try {
        dec.write(ws, dec.inputs([seq], [[(L * 7 + 11) % V]], 1));
        ws.temperature.write(new Float32Array(1));
        ws.topK.write(new Int32Array(1));
        ws.topP.write(new Float32Array(1).fill(1));
        ws.rng.write(new Uint32Array(2));
        const fn = () => {
          dec.forward(ws, 1, bound);
          dec.sample(ws);
        };
        const ts = performance.now();
        const t = device === 'cpu' ? await timeWall(device, fn, 1, 2, repeats) : await timeCuda({ device, warmup: 2, iters: 3, repeats, fn });
        const logits = await ws.logits.toFloat32();
        let bad = 0;
        for (const x of logits) if (!Number.isFinite(x)) bad++;
        if (L === tokens) after = memInfo(device);
        pending.push({ label, L, bound, t, bytes: plan.weightReadBytes + L * plan.perToken, bad });
        const us = (t.graph ?? t.plain).median;
        log(`scale ${label}: ${(us / 1000).toFixed(2)} ms/step (${t.graph ? 'graph' : 'plain'}), plain ${(t.plain.median / 1000).toFixed(2)} ms, ` +
          `${(1e6 / us).toFixed(2)} tokens/s; ${bad} non-finite logits; ${((performance.now() - ts) / 1000).toFixed(1)} s` +
          (t.graphError ? `; no graph: ${t.graphError}` : ''));
      } finally {
        ws.dispose();
      }
    }

    // Memory: what the driver and the pool say at the full context.
    const m = after ?? memInfo(device);
    const used = device === 'cpu' ? 0 : m.total - m.free;
    const other = device === 'cpu' ? 0 : Math.max(0, used - plan.weightBytes - cacheAlloc);
    const memNote = device === 'cpu' ? 'cpu run (memory not measured)'
      : `memory: device ${gb(m.total)}, used ${gb(used)} = weights ${gb(plan.weightBytes)} + cache ${gb(cacheAlloc)} + other ${gb(other)} ` +
        `(pool allocated ${gb(m.allocated)}, peak ${gb(m.peak)})`;
    // H100 80 GB estimate (computed): the non-weight, non-cache use measured here carried over, plus the margin.
    const overhead = device === 'cpu' ? 2 * GiB : other;
    const room = H100_80GB_BYTES - plan.weightBytes - overhead - MARGIN_BYTES - plan.sinkBytes;
    const h100Tokens = Math.max(0, Math.floor(room / plan.perToken / pageSize) * pageSize);
    const perLayerFor1M = room / (1_000_000 * cfg.numLayers);
    // On an 80 GB H100 with SQUEEZELM_SCALE_TOKENS=fit the row's context is the measured answer; the estimate is kept beside it.
    const onH100 = fitMode && /H100/.test(ctx.deviceName) && m.total > 0.95 * H100_80GB_BYTES && m.total < 1.1 * H100_80GB_BYTES;
    const h100Note = (onH100 ? `this H100 80GB holds and decodes ${tokens} tokens (measured: the largest fit of its free memory); the estimate: ` : '') +
      `H100 80GB (computed, not measured): ${gb(H100_80GB_BYTES)} - weights ${gb(plan.weightBytes)} - other ${gb(overhead)} ` +
      `- margin ${gb(MARGIN_BYTES)} leaves ${gb(room)} = ${h100Tokens} tokens at ${plan.perTokenLayer} B/token/layer; ` +
      `1M tokens there needs <= ${perLayerFor1M.toFixed(0)} B/token/layer`;
    log(`scale: ${memNote}`);
    log(`scale: ${h100Note}`);

    for (const p of pending) {
      const r = row(ctx, SUITE, p.label, p.t, {
        bytes: p.bytes,
        note: [
          `${(1e6 / (p.t.graph ?? p.t.plain).median).toFixed(2)} tokens/s`,
          `${bits}-bit cache ${plan.perTokenLayer} B/token/layer (codes ${plan.codeBytesPerHead} + meta ${plan.metaBytesPerHead} per kv head), ` +
            `read ${gb(p.L * plan.perToken)} cache + ${gb(plan.weightReadBytes)} weights per step`,
          p.bound !== p.L ? `kernel length bound ${p.bound} (the scheduler passes maxContext)` : '',
          p.bad ? `WARNING ${p.bad} non-finite logits` : '',
          p.L === tokens ? memNote : '',
          p.L === tokens ? h100Note : '',
        ].filter(Boolean).join('; '),
      });
      rows.push(r);
    }
    return rows;
  } finally {
    if (seq >= 0) model.decoder.cache.free(seq);
    await model.dispose();
    if (device !== 'cpu') native().emptyCache(device);
  }
}

/** The manual suite for bench/run.ts (no rows without a CUDA device). */
export async function benchScale(ctx: BenchContext): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  return runScale(ctx, ctx.device);
}
