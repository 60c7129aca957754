/**
 * Outlier slots per layer for a KVQuant cache, under the byte budget of the uniform share.
 *
 * A fixed number of exact slots per token-head vector is KVQuant's dense-and-sparse step, but
 * layers do not need them equally: on pycoder-mini (2 bits) one layer's keys lose 6% of
 * perplexity without their slot and gain 3% with three, while another layer is better off with
 * none (docs/kvquant.md, "Outlier slots per layer"). So calibrate-kv measures, on calibration
 * windows, what each layer's keys and values cost the model's loss at each candidate number of
 * slots, and spends the metadata bytes that the uniform share would take (the same bytes per
 * token) where they lower the summed cost most.
 *
 * The measurement: one prefill of the windows per (layer, kind, slot count), with that layer's
 * keys, or its values, replaced by what the cache hands back for them (quantized into a scratch
 * cache with kvqRopeAppend, unpacked with kvqDequantize, both the runtime's own ops on the
 * model's device; the sink tokens exact as fp16, as the cache keeps them) and every other key and
 * value exact. A prefill over quantized keys and values attends to exactly what decode-style
 * evaluation attends to, at the cost of one forward pass. Costs are assumed additive over layers
 * and over keys and values; the allocation is then an exact knapsack over the layers. The layers
 * before the measured one run exact, so each prefill starts at the measured layer from their saved
 * output (setLayerWindow): with L layers a measurement costs (L + 1) / 2L of a full pass on average.
 */
import { SqueezeError } from '../errors';
import { Tensor } from '../tensor';
import * as ops from '../ops';
import type { Model } from '../model/model';
import { ResidualState, setLayerWindow, setProjectionObserver } from '../model/llama';
import { windowNllNative } from '../runtime/ppl';
import { KvqCache, KvqLayerCalibration, kvqDequantize, kvqMetaBytes, kvqRopeAppend } from '../ops/kvquant';
import { KvqCalibrationLayer, LayerSlots, MAX_SLOTS } from './kvquant';

/** Slot counts measured per layer: keys and values. */
export interface SlotCandidates {
  key: number[];
  value: number[];
}

const LADDER = [0, 1, 2, 3, 4, 6, 8, 12, 16];

/**
 * The slot counts tried for a uniform count of n0 per kind: keys up to 8 n0, values up to
 * 2 n0 + 1 (keys carry most of the error at low bit widths; docs/kvquant.md), both capped at
 * MAX_SLOTS and the head dim, and taken from 0, 1, 2, 3, 4, 6, 8, 12, 16.
 */
export function slotCandidates(n0: number, headDim: number): SlotCandidates {
  const cap = Math.min(MAX_SLOTS, headDim);
  return {
    key: LADDER.filter((n) => n <= Math.min(cap, 8 * n0)),
    value: LADDER.filter((n) => n <= Math.min(cap, 2 * n0 + 1)),
  };
}

/** Loss increase (nats per token) of each layer's keys and values at each candidate slot count. */
export interface SlotCosts {
  /** Mean next-token NLL of the windows with nothing quantized. */
  base: number;
  candidates: SlotCandidates;
  /** key[l][i]: layer l's keys quantized with candidates.key[i] slots, all else exact, minus base. */
  key: number[][];
  value: number[][];
}

/** One batch of windows as the scratch caches see it: page table, lengths, row maps. */
interface BatchScratch {
  windows: Int32Array[];
  T: number;
  pageTable: Tensor;
  seqLens: Tensor;
  cuQ: Tensor;
  /** gather indices (rows of D) putting the unpacked keys / values / both in place of the projections' */
  index: Partial<Record<QuantizedKinds, Tensor>>;
  dispose(): void;
}

const PAGE = 16;

function batchScratch(windows: Int32Array[], device: string): BatchScratch {
  const B = windows.length, lens = windows.map((w) => w.length), T = lens.reduce((a, b) => a + b, 0);
  const perSeq = Math.ceil(Math.max(...lens) / PAGE);
  const pt = new Int32Array(B * perSeq).map((_, i) => i);
  const cu = new Int32Array(B + 1);
  lens.forEach((n, b) => { cu[b + 1] = cu[b] + n; });
  const s: BatchScratch = {
    windows, T,
    pageTable: Tensor.from(pt, [B, perSeq], { device }),
    seqLens: Tensor.from(Int32Array.from(lens), [B], { device }),
    cuQ: Tensor.from(cu, [B + 1], { device }),
    index: {},
    dispose() {
      for (const t of [s.pageTable, s.seqLens, s.cuQ, ...Object.values(s.index)]) t?.dispose();
    },
  };
  return s;
}

/**
 * Gather map over rows of D: row (t, j) of the projections [T, Hq + 2H] takes itself, or for j
 * among the replaced kind's heads row t*H + h of that kind's unpacked block after the copy of qkv.
 */
function gatherIndex(T: number, Hq: number, H: number, kinds: QuantizedKinds, device: string): Tensor {
  const R = Hq + 2 * H, idx = new Int32Array(T * R);
  for (let t = 0; t < T; t++)
    for (let j = 0; j < R; j++) {
      const isKey = j >= Hq && j < Hq + H, isValue = j >= Hq + H;
      if (isKey && kinds !== 'values') idx[t * R + j] = T * R + t * H + (j - Hq);
      else if (isValue && kinds !== 'keys') idx[t * R + j] = T * R + T * H + t * H + (j - Hq - H);
      else idx[t * R + j] = t * R + j;
    }
  return Tensor.from(idx, [T * R], { device });
}

/** What a quantized layer of quantizedPrefillNll replaces: its keys, its values, or both. */
export type QuantizedKinds = 'keys' | 'values' | 'both';

/** One layer whose keys and/or values quantizedPrefillNll passes through the quantizer. */
export interface QuantizedLayer {
  cal: KvqCalibrationLayer;
  keyOutliers: number;
  valueOutliers: number;
  kinds: QuantizedKinds;
}

export interface PrefillOptions {
  bits: number;
  sink: number;
  /** Windows per prefill (at most the model's maxBatch). */
  batch: number;
  /**
   * Start each prefill at layer `from` from `states` (the residual stream before that layer, one
   * state per batch of `batch` windows, as residualStates leaves them): the layers before it must
   * be exact (not listed).
   */
  from?: number;
  states?: ResidualState[];
}

/**
 * The residual stream before layer l + 1 of every batch of `windows` (batches of `batch`), by running
 * layer l alone from `states` (the stream before layer l; none for l = 0), all exact. The caller owns
 * (disposes) the returned tensors.
 */
export async function residualStates(model: Model, windows: Int32Array[], l: number, states: ResidualState[] | undefined,
  batch: number): Promise<ResidualState[]> {
  if (!Number.isInteger(l) || l < 0 || l + 1 >= model.config.numLayers)
    throw new SqueezeError('ERR_ARG', `residualStates: layer ${l} has no next layer (${model.config.numLayers} layers)`);
  if (l > 0 && !states) throw new SqueezeError('ERR_ARG', 'residualStates: states before a layer > 0 are needed');
  const out: ResidualState[] = [];
  try {
    for (let i = 0, b = 0; i < windows.length; i += batch, b++) {
      setLayerWindow({ from: l, to: l + 1, restore: states?.[b], save: (s) => out.push({ x: ops.clone(s.x), mlp: ops.clone(s.mlp) }) });
      await model.prefillOnly(windows.slice(i, i + batch));
    }
  } catch (e) {
    out.forEach((s) => { s.x.dispose(); s.mlp.dispose(); });
    throw e;
  } finally {
    setLayerWindow(null);
  }
  return out;
}

/**
 * Mean next-token NLL of `windows` by prefill, with the keys and/or values of the listed layers
 * replaced by what the quantized cache hands back for them (kvqRopeAppend into a scratch cache,
 * then kvqDequantize; positions below `sink` come back as fp16, as the cache keeps them). With
 * every layer listed ('both') this is the decode-style NLL of that cache, by one prefill.
 */
export async function quantizedPrefillNll(model: Model, windows: Int32Array[], layers: Map<number, QuantizedLayer>, o: PrefillOptions): Promise<number> {
  const cfg = model.config, device = model.device, H = cfg.numKvHeads, D = cfg.headDim, Hq = cfg.numHeads, R = Hq + 2 * H;
  if (!windows.length) throw new SqueezeError('ERR_ARG', 'quantizedPrefillNll: no windows');
  const batch = Math.max(1, Math.floor(o.batch));
  const batches: BatchScratch[] = [];
  const targets = new Map<number, { q: QuantizedLayer; cache: KvqCache; cal: KvqLayerCalibration }>();
  const invFreq = Tensor.from(cfg.invFreq, [cfg.invFreq.length], { dtype: 'f32', device });
  let cur: BatchScratch | undefined;
  const hook = (layer: number, qkv: Tensor, positions: Tensor): void => {
    const t = targets.get(layer), s = cur;
    if (!t || !s) return;
    const T = s.T;
    kvqRopeAppend(null, t.cache, t.cal, qkv, positions, invFreq, s.pageTable, s.seqLens, s.cuQ);
    // [qkv rows | unpacked keys | unpacked values] as rows of D, then gathered back into qkv
    const all = Tensor.empty([T * R + 2 * T * H, D], { dtype: qkv.dtype, device });
    try {
      const rows = qkv.reshape([T * R, D]);
      ops.copy(all.view(0, [T * R, D]), rows);
      let r = 0;
      s.windows.forEach((w, b) => {
        kvqDequantize(all.view((T * R + r * H) * D, [w.length, H, D]), all.view((T * R + T * H + r * H) * D, [w.length, H, D]),
          t.cache, t.cal, s.pageTable, b, b);
        r += w.length;
      });
      const kinds = t.q.kinds;
      ops.gatherRows(rows, all, (s.index[kinds] ??= gatherIndex(T, Hq, H, kinds, device)));
    } finally {
      all.dispose();
    }
  };
  const from = o.from ?? 0;
  if (from > 0) {
    if (!o.states || o.states.length !== Math.ceil(windows.length / batch))
      throw new SqueezeError('ERR_ARG', `quantizedPrefillNll: starting at layer ${from} needs one state per batch of windows`);
    for (const l of layers.keys())
      if (l < from) throw new SqueezeError('ERR_ARG', `quantizedPrefillNll: layer ${l} is quantized but the prefill starts at layer ${from}`);
  }
  try {
    for (let i = 0; i < windows.length; i += batch) batches.push(batchScratch(windows.slice(i, i + batch), device));
    const pages = Math.max(...batches.map((s) => s.pageTable.numel));
    for (const [l, q] of layers) {
      if (!Number.isInteger(l) || l < 0 || l >= cfg.numLayers) throw new SqueezeError('ERR_ARG', `quantizedPrefillNll: no layer ${l}`);
      const cache = new KvqCache({
        pages, pageSize: PAGE, kvHeads: H, headDim: D, bits: o.bits, keyOutliers: q.keyOutliers, valueOutliers: q.valueOutliers,
        sink: o.sink, maxSeqs: batch, device,
      });
      targets.set(l, { q, cache, cal: layerTensors(q.cal, device) });
    }
    setProjectionObserver(hook);
    let sum = 0, n = 0;
    for (const [b, s] of batches.entries()) {
      cur = s;
      if (from > 0) setLayerWindow({ from, to: cfg.numLayers, restore: o.states![b] });
      const logits = await model.logitsBatch(s.windows);
      setLayerWindow(null);
      const nll = await Promise.all(s.windows.map((w, j) => windowNllNative(logits[j], w, cfg.vocabSize)));
      s.windows.forEach((w, j) => { sum += nll[j] * (w.length - 1); n += w.length - 1; });
    }
    return sum / n;
  } finally {
    setProjectionObserver(null);
    setLayerWindow(null);
    invFreq.dispose();
    for (const s of batches) s.dispose();
    for (const t of targets.values()) {
      t.cache.dispose();
      for (const x of Object.values(t.cal)) x.dispose();
    }
  }
}

export interface MeasureOptions extends PrefillOptions {
  candidates: SlotCandidates;
  /** The uniform slot count: the other kind's count in `fit` while one kind is measured (that kind stays exact). */
  uniform: number;
  /** Called after each prefill. */
  onProgress?: (done: number, total: number) => void;
  /** false: every prefill from the embedding (the same costs, slower; tests compare the two). */
  reuse?: boolean;
  /**
   * Called before layer l's first fit (the layers are measured in order, each once), and after its
   * last prefill: calibrate-kv loads that layer's samples into its fitter there, and lets them go.
   */
  beforeLayer?: (l: number) => Promise<void>;
  afterLayer?: (l: number) => void;
}

/**
 * Measures SlotCosts on `windows` (each at least sink + 2 tokens). `fit(l, nk, nv)` returns layer
 * l's calibration for nk key and nv value slots.
 */
export async function measureSlotCosts(model: Model, windows: Int32Array[], fit: (l: number, nk: number, nv: number) => KvqCalibrationLayer,
  o: MeasureOptions): Promise<SlotCosts> {
  const L = model.config.numLayers, c = o.candidates, n0 = o.uniform;
  const total = 1 + L * (c.key.length + c.value.length);
  let done = 0;
  const base = await quantizedPrefillNll(model, windows, new Map(), o);
  o.onProgress?.(++done, total);
  const key: number[][] = [], value: number[][] = [];
  // the residual stream before layer l (none before layer 0: the prefill starts at the embedding)
  let states: ResidualState[] | undefined;
  const drop = (): void => states?.forEach((s) => { s.x.dispose(); s.mlp.dispose(); });
  try {
    for (let l = 0; l < L; l++) {
      const at: PrefillOptions = { ...o, from: o.reuse === false ? 0 : l, states: o.reuse === false ? undefined : states };
      await o.beforeLayer?.(l);
      key.push([]);
      value.push([]);
      for (const nk of c.key) {
        const q: QuantizedLayer = { cal: fit(l, nk, n0), keyOutliers: nk, valueOutliers: 0, kinds: 'keys' };
        key[l].push((await quantizedPrefillNll(model, windows, new Map([[l, q]]), at)) - base);
        o.onProgress?.(++done, total);
      }
      for (const nv of c.value) {
        const q: QuantizedLayer = { cal: fit(l, n0, nv), keyOutliers: 0, valueOutliers: nv, kinds: 'values' };
        value[l].push((await quantizedPrefillNll(model, windows, new Map([[l, q]]), at)) - base);
        o.onProgress?.(++done, total);
      }
      o.afterLayer?.(l);
      if (o.reuse !== false && l + 1 < L) {
        const next = await residualStates(model, windows, l, states, Math.max(1, Math.floor(o.batch)));
        drop();
        states = next;
      }
    }
  } finally {
    drop();
  }
  return { base, candidates: { key: [...c.key], value: [...c.value] }, key, value };
}

function layerTensors(l: KvqCalibrationLayer, device: string): KvqLayerCalibration {
  const t = (a: Float32Array) => Tensor.from(a, [a.length], { device });
  return { keyLo: t(l.keyLo), keyHi: t(l.keyHi), keyCodebook: t(l.keyCodebook), valueCodebook: t(l.valueCodebook) };
}

/**
 * The slot counts per layer of least summed cost whose metadata bytes per token-head vector,
 * summed over the layers, stay within `budget` (an exact knapsack over the layers in units of
 * the metadata's 4-byte padding; ties go to fewer bytes, then to the earlier candidates).
 */
export function allocateSlots(costs: SlotCosts, budget: number): LayerSlots {
  const L = costs.key.length, c = costs.candidates;
  const options: { nk: number; nv: number; units: number; cost: number }[][] = [];
  for (let l = 0; l < L; l++) {
    const opts: { nk: number; nv: number; units: number; cost: number }[] = [];
    c.key.forEach((nk, i) => c.value.forEach((nv, j) => {
      opts.push({ nk, nv, units: kvqMetaBytes(nk, nv) / 4, cost: costs.key[l][i] + costs.value[l][j] });
    }));
    options.push(opts);
  }
  const U = Math.floor(budget / 4);
  // best[l][u]: least cost of layers 0..l using exactly u units; pick[l][u]: the option of layer l
  let best = new Float64Array(U + 1).fill(Infinity);
  best[0] = 0;
  const pick: Int32Array[] = [];
  for (let l = 0; l < L; l++) {
    const next = new Float64Array(U + 1).fill(Infinity), p = new Int32Array(U + 1).fill(-1);
    for (let u = 0; u <= U; u++) {
      if (best[u] === Infinity) continue;
      options[l].forEach((op, k) => {
        const v = u + op.units;
        if (v <= U && best[u] + op.cost < next[v]) { next[v] = best[u] + op.cost; p[v] = k; }
      });
    }
    best = next;
    pick.push(p);
  }
  let u = -1;
  for (let v = 0; v <= U; v++) if (best[v] < Infinity && (u < 0 || best[v] < best[u])) u = v;
  if (u < 0) throw new SqueezeError('ERR_ARG', `slot allocation: a budget of ${budget} metadata bytes is below ${L} layers' minimum`);
  const key = new Array<number>(L), value = new Array<number>(L);
  for (let l = L - 1; l >= 0; l--) {
    const op = options[l][pick[l][u]];
    key[l] = op.nk;
    value[l] = op.nv;
    u -= op.units;
  }
  return { key, value };
}
