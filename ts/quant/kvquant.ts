/**
 * KVQuant calibration: per-channel key bounds (pre-RoPE) at the percentile matching the
 * outlier share, and per-layer sorted 2^b codebooks in [-1, 1] for keys and values by 1-D
 * k-means of the normalised samples (NormalFloat signposts as the start and fallback).
 * Saved as safetensors: layers.{i}.key_lo / key_hi [kvHeads*D], layers.{i}.key_codebook /
 * value_codebook [2^b] (fp16 values stored as f32), __metadata__ {format, bits, outliers, sink, layers, kv_heads, head_dim,
 * key_granularity (channel | token), key_rope (pre | post), codebook (kmeans | uniform), and where the
 * outlier slots differ from layer to layer key_slots / value_slots ("n0,n1,...": slots per layer)}.
 * The last three select the ablations of docs/kvquant.md; the defaults are KVQuant's method.
 */
import { SqueezeError } from '../errors';
import { f16ToFloat, floatToF16 } from '../util/half';
import { Tensor } from '../tensor';
import { SafetensorsFile, writeSafetensors } from '../model/safetensors';
import { KvqLayerCalibration, outlierSlots } from '../ops/kvquant';
import { native } from '../native';

export interface KvqCalibrationLayer {
  keyLo: Float32Array;
  keyHi: Float32Array;
  keyCodebook: Float32Array;
  valueCodebook: Float32Array;
}

export interface KvqCalibration {
  bits: number;
  /** Outlier share (e.g. 0.01). */
  outliers: number;
  sink: number;
  kvHeads: number;
  headDim: number;
  /** Keys quantized per token (ablation) instead of per channel against key_lo/key_hi. */
  keyPerToken?: boolean;
  /** Keys quantized after RoPE (ablation) instead of before. */
  postRope?: boolean;
  /** How the codebooks were made: 1-D k-means (default) or a uniform grid (ablation). */
  codebook?: 'kmeans' | 'uniform';
  /**
   * What weighted the k-means samples: the size of each sample's loss gradient ('fisher'), each
   * key channel's mean squared query ('queries', keys only) or nothing ('none'). Descriptive only.
   */
  sensitivity?: 'fisher' | 'queries' | 'none';
  /**
   * Outlier slots per token-head vector, layer by layer (calibrate-kv's allocation,
   * quant/kvquant-allocate.ts). Absent: outlierSlots(outliers, headDim) for keys and for values
   * in every layer.
   */
  slots?: LayerSlots;
  layers: KvqCalibrationLayer[];
}

/** Key and value outlier slots of every layer. */
export interface LayerSlots {
  key: number[];
  value: number[];
}

/** Most outlier slots of one kind per token-head vector (the cache's metadata indexes channels in a byte). */
export const MAX_SLOTS = 16;

/** The outlier slots of layer `l` of a calibration. */
export function layerSlots(cal: Pick<KvqCalibration, 'outliers' | 'headDim' | 'slots'>, l: number): { keyOutliers: number; valueOutliers: number } {
  if (cal.slots) return { keyOutliers: cal.slots.key[l], valueOutliers: cal.slots.value[l] };
  const n = outlierSlots(cal.outliers, cal.headDim);
  return { keyOutliers: n, valueOutliers: n };
}

export interface CalibrateOptions {
  bits: number;
  outliers?: number;
  /**
   * Share of each key channel's calibration samples left outside its bounds, split evenly
   * between the two tails (default: half the outlier share, so that a token-head vector rarely
   * has more channels out of bounds than it has outlier slots; measured better than the full
   * share at 3 bits on pycoder-mini, docs/kvquant.md).
   */
  keyClip?: number;
  sink?: number;
  kvHeads: number;
  headDim: number;
  /** Ablations (see KvqCalibration): the samples must then be post-RoPE keys for postRope. */
  keyPerToken?: boolean;
  postRope?: boolean;
  codebook?: 'kmeans' | 'uniform';
  /**
   * Per layer, a sensitivity per key channel [kvHeads*D] (e.g. the mean squared query that
   * multiplies it): the key codebook's k-means then weights each sample by its channel's.
   */
  keyWeights?: Float32Array[];
  /**
   * Per layer, a k-means weight per sample, laid out like `keys` and `values` ([T, kvHeads*D]),
   * e.g. from each sample's loss gradient (calibrateKv with `fisher`). Takes precedence over
   * keyWeights.
   */
  sampleWeights?: { keys: Float32Array[]; values: Float32Array[] };
  /** k-means iterations (default 25) and the most samples it looks at (default 200000). */
  iterations?: number;
  maxSamples?: number;
  /**
   * Outlier slots per layer instead of outlierSlots(outliers, headDim) everywhere. A layer's key
   * clip share then scales with its key slots (keyClip x its key slots / the uniform count), and
   * its value codebook is fitted with its value slots removed.
   */
  slots?: LayerSlots;
}

function checkBits(bits: number, what: string): void {
  if (bits !== 2 && bits !== 3 && bits !== 4) throw new SqueezeError('ERR_ARG', `${what}: bits must be 2, 3 or 4 (got ${bits})`);
}

// Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9).
function normInv(p: number): number {
  const a = [-3.969683028665376e1, 2.209460984245205e2, -2.759285104469687e2, 1.38357751867269e2, -3.066479806614716e1, 2.506628277459239];
  const b = [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
  const c = [-7.784894002430293e-3, -3.223964580411365e-1, -2.400758277161838, -2.549732539343734, 4.374664141464968, 2.938163982698783];
  const d = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
  const pl = 0.02425;
  if (p < pl) {
    const q = Math.sqrt(-2 * Math.log(p));
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  if (p > 1 - pl) return -normInv(1 - p);
  const q = p - 0.5, r = q * q;
  return ((((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q) / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

/** The entries rounded to fp16 values (sorted order is kept: rounding is monotone). */
function fp16Values(cb: Float32Array): Float32Array {
  return cb.map((x) => f16ToFloat(floatToF16(x)));
}

/** NormalFloat signposts: 2^bits normal quantiles scaled to [-1, 1], sorted. */
export function normalFloatCodebook(bits: number): Float32Array {
  checkBits(bits, 'normalFloatCodebook');
  const n = 1 << bits, delta = 0.5 / n;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = normInv(delta + ((1 - 2 * delta) * i) / (n - 1));
  const m = Math.max(Math.abs(out[0]), Math.abs(out[n - 1]));
  for (let i = 0; i < n; i++) out[i] /= m;
  return out;
}

/** 2^bits evenly spaced entries from -1 to 1. */
export function uniformCodebook(bits: number): Float32Array {
  checkBits(bits, 'uniformCodebook');
  const n = 1 << bits;
  return Float32Array.from({ length: n }, (_, i) => -1 + (2 * i) / (n - 1));
}

/**
 * kmeans1d / kmeans1dWeighted natively (csrc/cpu/kmeans1d.cc): the same steps in the same order,
 * so the same codebook bit for bit, about 10x faster. `weights` null: unweighted.
 */
export function kmeans1dNative(samples: Float32Array, weights: Float32Array | null, init: Float32Array, iterations = 25): Float32Array {
  return native().ops.kmeans1d(samples, weights, init, iterations) as Float32Array;
}

/** 1-D k-means (Lloyd) of samples in [-1, 1] from `init`; returns a sorted codebook (the TypeScript reference). */
export function kmeans1d(samples: Float32Array, init: Float32Array, iterations = 25): Float32Array {
  if (samples.length < init.length) return Float32Array.from(init);
  return lloyd1d(Float64Array.from(samples).sort(), null, init, iterations);
}

/** Weighted 1-D k-means (Lloyd) of samples in [-1, 1] with weights >= 0; returns a sorted codebook. */
export function kmeans1dWeighted(samples: Float32Array, weights: Float32Array, init: Float32Array, iterations = 25): Float32Array {
  if (samples.length < init.length) return Float32Array.from(init);
  const order = stableOrder(samples);
  return lloyd1d(Float64Array.from(order, (i) => samples[i]), Float64Array.from(order, (i) => weights[i]), init, iterations);
}

/**
 * @internal The indices of `a` by increasing value, equal values (-0 and +0 alike) in index order: the
 * order of a stable sort by `a[i] - a[j]`, made by one numeric sort of keys that hold a value's
 * order-preserving bits above its index (fast where a comparator sort of 200,000 indices took
 * seconds). NaN is not expected (samples are finite); it sorts last.
 */
export function stableOrder(a: Float32Array): Uint32Array {
  const n = a.length;
  if (n > 2 ** 21) return Uint32Array.from(Array.from(a.keys()).sort((i, j) => a[i] - a[j]));
  const bits = new Uint32Array(1), f = new Float32Array(bits.buffer);
  const keys = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    f[0] = a[i] === 0 ? 0 : a[i];  // -0 as +0
    const b = bits[0];
    const k = b & 0x80000000 ? ~b >>> 0 : (b | 0x80000000) >>> 0;  // monotone in the value
    keys[i] = k * 2 ** 21 + i;  // < 2^53: exact
  }
  keys.sort();
  const out = new Uint32Array(n);
  for (let i = 0; i < n; i++) out[i] = keys[i] % 2 ** 21;
  return out;
}

// Math.abs through a module binding: in a vm context (the test runner's sandbox) every lookup of
// the global Math goes through the context's interceptor, which made lloyd1d's loop 30x slower there.
const abs = Math.abs, min = Math.min, max = Math.max;

// Lloyd iterations over sorted samples x (weights w, or all 1 when null) from `init`.
function lloyd1d(x: Float64Array, w: Float64Array | null, init: Float32Array, iterations: number): Float32Array {
  const n = init.length;
  let cb = Float64Array.from(init).sort();
  for (let it = 0; it < iterations; it++) {
    const sum = new Float64Array(n), cnt = new Float64Array(n);
    let j = 0;
    for (let i = 0; i < x.length; i++) {
      while (j < n - 1 && abs(x[i] - cb[j + 1]) <= abs(x[i] - cb[j])) j++;
      const wi = w ? w[i] : 1;
      sum[j] += wi * x[i];
      cnt[j] += wi;
    }
    let moved = 0;
    const next = new Float64Array(n);
    for (let c = 0; c < n; c++) {
      next[c] = cnt[c] > 0 ? sum[c] / cnt[c] : cb[c];
      moved = Math.max(moved, Math.abs(next[c] - cb[c]));
    }
    cb = next.sort();
    if (moved < 1e-7) break;
  }
  const out = Float32Array.from(cb, (v) => Math.max(-1, Math.min(1, v)));
  for (let i = 1; i < n; i++) if (!(out[i] > out[i - 1])) return Float32Array.from(init);
  return out;
}

function subsample(a: Float32Array, max: number): Float32Array {
  if (a.length <= max) return a;
  const out = new Float32Array(max), step = a.length / max;
  for (let i = 0; i < max; i++) out[i] = a[Math.floor(i * step)];
  return out;
}

function quantile(sorted: Float32Array, p: number): number {
  const pos = Math.min(sorted.length - 1, Math.max(0, p * (sorted.length - 1)));
  const i = Math.floor(pos), f = pos - i;
  return i + 1 < sorted.length ? sorted[i] * (1 - f) + sorted[i + 1] * f : sorted[i];
}

/**
 * Calibrates from pre-RoPE keys and values collected per layer: keys[l], values[l] are
 * [T, kvHeads*D] row-major.
 */
export function calibrateFromSamples(keys: Float32Array[], values: Float32Array[], opts: CalibrateOptions): KvqCalibration {
  return new LayerFitter(keys, values, opts).calibration(opts.slots);
}

function checkCalibrateOptions(opts: CalibrateOptions, what: string): void {
  checkBits(opts.bits, what);
  const outliers = opts.outliers ?? 0.01, clip = opts.keyClip ?? outliers / 2, sink = opts.sink ?? 0;
  if (!(outliers >= 0 && outliers < 0.5)) throw new SqueezeError('ERR_ARG', `${what}: outlier share ${outliers} must lie in [0, 0.5)`);
  if (!(clip >= 0 && clip < 0.5)) throw new SqueezeError('ERR_ARG', `${what}: key clip share ${clip} must lie in [0, 0.5)`);
  if (!Number.isInteger(sink) || sink < 0) throw new SqueezeError('ERR_ARG', `${what}: sink must be a non-negative integer`);
  if (opts.codebook !== undefined && opts.codebook !== 'kmeans' && opts.codebook !== 'uniform')
    throw new SqueezeError('ERR_ARG', `${what}: codebook must be 'kmeans' or 'uniform', got '${opts.codebook}'`);
}

/**
 * `code` (ERR_FORMAT for files, ERR_ARG for arguments) unless `s` holds whole numbers from 0 to
 * MAX_SLOTS (and to headDim: a slot is a channel) for each of `layers` layers.
 */
export function checkLayerSlots(s: LayerSlots, layers: number, headDim: number, what: string, code: 'ERR_FORMAT' | 'ERR_ARG'): void {
  const most = Math.min(MAX_SLOTS, headDim);
  for (const [kind, a] of [['key', s.key], ['value', s.value]] as const) {
    if (!Array.isArray(a) || a.length !== layers) throw new SqueezeError(code, `${what}: ${kind} slots must list ${layers} layers, got ${Array.isArray(a) ? a.length : typeof a}`);
    const i = a.findIndex((n) => !(Number.isInteger(n) && n >= 0 && n <= most));
    if (i >= 0) throw new SqueezeError(code, `${what}: layer ${i} has ${a[i]} ${kind} slots (0..${most})`);
  }
}

/**
 * One layer's bounds and codebooks for nk key and nv value outlier slots (K, V: [T, kvHeads*D]).
 * The key clip share is opts.keyClip (default half the outlier share) scaled by nk over the
 * uniform slot count, so a layer given more slots also leaves more of each channel outside its
 * bounds; with the uniform count it is keyClip itself.
 */
export function calibrateLayer(K: Float32Array, V: Float32Array, opts: CalibrateOptions, l: number, nk: number, nv: number): KvqCalibrationLayer {
  checkCalibrateOptions(opts, 'calibrateLayer');
  checkLayerSamples(K, V, opts, l);
  return { ...fitKeys(K, opts, l, nk), valueCodebook: fitValues(V, opts, l, nv) };
}

/**
 * Fits layers for given slot counts, each layer's key half (bounds and key codebook, which depend
 * on the key slots only) and value half (the value codebook: value slots only) once per count:
 * the slot allocation tries many counts per layer, and a whole fit took 1.2 s per layer on
 * pycoder-mini's calibration set.
 */
export class LayerFitter {
  private readonly keys = new Map<string, Omit<KvqCalibrationLayer, 'valueCodebook'>>();
  private readonly values = new Map<string, Float32Array>();
  private sorted: { l: number; cols: Float32Array } | undefined;
  private readonly K: (Float32Array | undefined)[];
  private readonly V: (Float32Array | undefined)[];
  /**
   * keys[l], values[l]: [T, kvHeads*D] per layer; opts.slots is not read here (see calibration).
   * Or a layer count: the samples then come one layer at a time through load() and leave through
   * unload(), and the fits made meanwhile stay (a model's samples of every layer at once can
   * outgrow the host's memory).
   */
  constructor(K: Float32Array[] | number, V: Float32Array[] | undefined, readonly opts: CalibrateOptions) {
    checkCalibrateOptions(opts, 'calibrateFromSamples');
    const L = typeof K === 'number' ? K : K.length;
    if (!(Number.isInteger(L) && L > 0) || (typeof K !== 'number' && V?.length !== L))
      throw new SqueezeError('ERR_ARG', 'calibrateFromSamples: need keys and values for the same (non-zero) number of layers');
    this.K = typeof K === 'number' ? new Array<undefined>(L).fill(undefined) : [...K];
    this.V = typeof K === 'number' ? new Array<undefined>(L).fill(undefined) : [...V!];
    this.K.forEach((k, l) => { if (k) checkLayerSamples(k, this.V[l]!, opts, l); });
  }
  get layers(): number {
    return this.K.length;
  }
  /** Layer l's samples (and opts' weights of layer l must be in place by now). */
  load(l: number, K: Float32Array, V: Float32Array): void {
    this.checkLayer(l);
    checkLayerSamples(K, V, this.opts, l);
    this.K[l] = K;
    this.V[l] = V;
  }
  /** Lets go of layer l's samples; its fits stay. */
  unload(l: number): void {
    this.checkLayer(l);
    this.K[l] = this.V[l] = undefined;
    if (this.sorted?.l === l) this.sorted = undefined;
  }
  private checkLayer(l: number): void {
    if (!(Number.isInteger(l) && l >= 0 && l < this.layers)) throw new SqueezeError('ERR_ARG', `LayerFitter: no layer ${l} of ${this.layers}`);
  }
  private samples(l: number): { K: Float32Array; V: Float32Array } {
    this.checkLayer(l);
    const K = this.K[l], V = this.V[l];
    if (!K || !V) throw new SqueezeError('ERR_INTERNAL', `LayerFitter: layer ${l}'s samples are not loaded and this fit was not made while they were`);
    return { K, V };
  }
  /** The calibration of every layer with `slots` (default: the uniform count everywhere). */
  calibration(slots?: LayerSlots): KvqCalibration {
    const o = this.opts, { bits, kvHeads, headDim } = o;
    if (slots) checkLayerSlots(slots, this.layers, headDim, 'calibrateFromSamples: slots', 'ERR_ARG');
    const outliers = o.outliers ?? 0.01, uniform = o.codebook === 'uniform', keyPerToken = !!o.keyPerToken;
    const layers = Array.from({ length: this.layers }, (_, l) => {
      const n = layerSlots({ outliers, headDim, slots }, l);
      return this.layer(l, n.keyOutliers, n.valueOutliers);
    });
    const sensitivity = uniform ? 'none' : o.sampleWeights ? 'fisher' : o.keyWeights && !keyPerToken ? 'queries' : 'none';
    return {
      bits, outliers, sink: o.sink ?? 0, kvHeads, headDim, keyPerToken, postRope: !!o.postRope, codebook: uniform ? 'uniform' : 'kmeans', sensitivity,
      ...(slots ? { slots: { key: [...slots.key], value: [...slots.value] } } : {}), layers,
    };
  }

  /** Layer l's bounds and codebooks for nk key and nv value slots (as calibrateLayer). */
  layer(l: number, nk: number, nv: number): KvqCalibrationLayer {
    let k = this.keys.get(`${l}:${nk}`);
    if (!k) {
      const { K } = this.samples(l);
      // the sorted key channels of the last layer asked for (the allocation walks layer by layer)
      if (this.sorted?.l !== l) this.sorted = { l, cols: sortedColumns(K, this.opts.kvHeads * this.opts.headDim) };
      this.keys.set(`${l}:${nk}`, (k = fitKeys(K, this.opts, l, nk, this.sorted.cols)));
    }
    let v = this.values.get(`${l}:${nv}`);
    if (!v) this.values.set(`${l}:${nv}`, (v = fitValues(this.samples(l).V, this.opts, l, nv)));
    return { ...k, valueCodebook: v };
  }
}

function checkLayerSamples(K: Float32Array, V: Float32Array, opts: CalibrateOptions, l: number): void {
  const HD = opts.kvHeads * opts.headDim;
  if (K.length % HD !== 0 || V.length !== K.length || K.length === 0)
    throw new SqueezeError('ERR_SHAPE', `calibrateFromSamples: layer ${l}: keys and values must be [T, ${HD}] with the same T`);
  const sw = opts.sampleWeights;
  if (sw && (sw.keys[l]?.length !== K.length || sw.values[l]?.length !== V.length))
    throw new SqueezeError('ERR_SHAPE', `calibrateFromSamples: sampleWeights of layer ${l} must be laid out like its keys and values`);
  const wl = sw ? undefined : opts.keyWeights?.[l];
  if (wl && wl.length !== HD) throw new SqueezeError('ERR_SHAPE', `calibrateFromSamples: keyWeights[${l}] must hold ${HD} values`);
}

/** A codebook of 2^bits entries from normalised samples: uniform, or (weighted) k-means from NormalFloat points. */
function fitBook(x: Samples, opts: CalibrateOptions): Float32Array {
  const { bits } = opts, maxS = opts.maxSamples ?? 200000, iters = opts.iterations ?? 25;
  if (opts.codebook === 'uniform') return uniformCodebook(bits);
  const nf = normalFloatCodebook(bits);
  // entries are fp16 values (every op reads them at fp16 precision; kvquant_layout.h)
  return fp16Values(x.w ? kmeans1dNative(x.x, x.w, nf, iters) : kmeans1dNative(subsample(x.x, maxS), null, nf, iters));
}

/** The key half of a layer's fit for nk key slots (see calibrateLayer for the clip share). */
function fitKeys(K: Float32Array, opts: CalibrateOptions, l: number, nk: number, sorted = sortedColumns(K, opts.kvHeads * opts.headDim)):
  Omit<KvqCalibrationLayer, 'valueCodebook'> {
  const { kvHeads, headDim } = opts;
  const outliers = opts.outliers ?? 0.01, clip0 = opts.keyClip ?? outliers / 2, n0 = outlierSlots(outliers, headDim);
  const clip = n0 === nk ? clip0 : n0 > 0 ? Math.min(0.49, (clip0 * nk) / n0) : 0;
  const HD = kvHeads * headDim, maxS = opts.maxSamples ?? 200000, T = K.length / HD;
  const keyLo = new Float32Array(HD), keyHi = new Float32Array(HD);
  for (let c = 0; c < HD; c++) {
    const col = sorted.subarray(c * T, (c + 1) * T);
    keyLo[c] = quantile(col, clip / 2);
    keyHi[c] = quantile(col, 1 - clip / 2);
    if (!(keyHi[c] > keyLo[c])) { keyLo[c] -= 1e-3; keyHi[c] += 1e-3; }
  }
  const swk = opts.sampleWeights?.keys[l];
  if (opts.keyPerToken) return { keyLo, keyHi, keyCodebook: fitBook(perTokenSamples(K, T * kvHeads, headDim, nk, maxS, swk), opts) };
  // normalised key samples inside the bounds: every channel of every tStep-th token
  const kn = new F32Builder(), kw = new F32Builder();
  const tStep = Math.max(1, Math.floor(T / Math.max(1, Math.floor(maxS / HD))));
  const wl = swk ? undefined : opts.keyWeights?.[l];
  for (let t = 0; t < T; t += tStep)
    for (let c = 0; c < HD; c++) {
      const x = (2 * (K[t * HD + c] - keyLo[c])) / (keyHi[c] - keyLo[c]) - 1;
      if (!(x >= -1 && x <= 1)) continue;
      kn.push(x);
      kw.push(swk ? swk[t * HD + c] : wl ? wl[c] : 1);
    }
  return { keyLo, keyHi, keyCodebook: fitBook({ x: kn.done(), w: swk || wl ? kw.done() : undefined }, opts) };
}

/** Each channel of X [T, HD] sorted: [HD][T] (the key bounds are quantiles of these, for every slot count). */
function sortedColumns(X: Float32Array, HD: number): Float32Array {
  const T = X.length / HD, out = new Float32Array(X.length);
  for (let c = 0; c < HD; c++) {
    const col = out.subarray(c * T, (c + 1) * T);
    for (let t = 0; t < T; t++) col[t] = X[t * HD + c];
    col.sort();
  }
  return out;
}

/** The value codebook of a layer for nv value slots. */
function fitValues(V: Float32Array, opts: CalibrateOptions, l: number, nv: number): Float32Array {
  const { kvHeads, headDim } = opts, T = V.length / (kvHeads * headDim);
  return fitBook(perTokenSamples(V, T * kvHeads, headDim, nv, opts.maxSamples ?? 200000, opts.sampleWeights?.values[l]), opts);
}

// Normalised entries of token-head vectors against each vector's min/max without its n
// largest-magnitude entries (the outliers), as the cache quantizes values.
// With `weights` (one per element of X) each sample keeps its element's weight.
function perTokenSamples(X: Float32Array, vecs: number, headDim: number, n: number, maxS: number, weights?: Float32Array): Samples {
  const out = new F32Builder(), w = weights ? new F32Builder() : undefined;
  const vstride = Math.max(1, Math.floor((vecs * headDim) / maxS));
  const skip = new Uint8Array(headDim), top = new Int32Array(Math.max(1, n));
  for (let vi = 0; vi < vecs; vi += Math.max(1, Math.floor(vstride / headDim) || 1)) {
    const v = X.subarray(vi * headDim, (vi + 1) * headDim);
    largestMagnitudes(v, n, top, skip);
    let mn = Infinity, mx = -Infinity;
    for (let c = 0; c < headDim; c++) if (!skip[c]) { mn = min(mn, v[c]); mx = max(mx, v[c]); }
    if (!(mx > mn)) continue;
    for (let c = 0; c < headDim; c++) {
      if (skip[c]) continue;
      out.push((2 * (v[c] - mn)) / (mx - mn) - 1);
      w?.push(weights![vi * headDim + c]);
    }
  }
  return { x: out.done(), w: w?.done() };
}

/**
 * @internal Marks in `skip` (cleared first) the n entries of v of largest magnitude, ties to the lower index
 * (the first n of v's indices sorted by decreasing |v|, then increasing index), kept in `top` by
 * insertion as the entries are read in index order.
 */
export function largestMagnitudes(v: Float32Array, n: number, top: Int32Array, skip: Uint8Array): void {
  skip.fill(0);
  if (n <= 0) return;
  let have = 0;
  for (let c = 0; c < v.length; c++) {
    const a = abs(v[c]);
    if (have === n && !(a > abs(v[top[n - 1]]))) continue;  // an equal one keeps its lower index
    let i = have < n ? have++ : n - 1;
    while (i > 0 && a > abs(v[top[i - 1]])) { top[i] = top[i - 1]; i--; }
    top[i] = c;
  }
  for (let i = 0; i < have; i++) skip[top[i]] = 1;
}

/** Normalised samples and, when the fit is weighted, a weight per sample. */
interface Samples {
  x: Float32Array;
  w?: Float32Array;
}

/**
 * A growing Float32Array (samples are appended one by one; an array of numbers of that size cost
 * seconds per calibration). Values are rounded to f32 as they are stored, as the codebook fit reads
 * them anyway.
 */
class F32Builder {
  private a = new Float32Array(1024);
  length = 0;
  push(v: number): void {
    if (this.length === this.a.length) {
      const b = new Float32Array(this.a.length * 2);
      b.set(this.a);
      this.a = b;
    }
    this.a[this.length++] = v;
  }
  done(): Float32Array {
    return this.a.subarray(0, this.length);
  }
}

/** Writes a calibration as safetensors. */
export function saveKvqCalibration(file: string, cal: KvqCalibration): void {
  const tensors: Record<string, { dtype: string; shape: number[]; data: ArrayBufferView }> = {};
  cal.layers.forEach((l, i) => {
    tensors[`layers.${i}.key_lo`] = { dtype: 'f32', shape: [l.keyLo.length], data: l.keyLo };
    tensors[`layers.${i}.key_hi`] = { dtype: 'f32', shape: [l.keyHi.length], data: l.keyHi };
    tensors[`layers.${i}.key_codebook`] = { dtype: 'f32', shape: [l.keyCodebook.length], data: l.keyCodebook };
    tensors[`layers.${i}.value_codebook`] = { dtype: 'f32', shape: [l.valueCodebook.length], data: l.valueCodebook };
  });
  writeSafetensors(file, tensors, {
    format: 'squeezelm-kvquant', bits: String(cal.bits), outliers: String(cal.outliers), sink: String(cal.sink),
    layers: String(cal.layers.length), kv_heads: String(cal.kvHeads), head_dim: String(cal.headDim),
    key_granularity: cal.keyPerToken ? 'token' : 'channel', key_rope: cal.postRope ? 'post' : 'pre', codebook: cal.codebook ?? 'kmeans',
    ...(cal.sensitivity ? { sensitivity: cal.sensitivity } : {}),
    ...(cal.slots ? { key_slots: cal.slots.key.join(','), value_slots: cal.slots.value.join(',') } : {}),
  });
}

/** The model dims a calibration must match (any left undefined is not checked). */
export interface KvqExpect {
  layers?: number;
  kvHeads?: number;
  headDim?: number;
  bits?: number;
}

/** ERR_FORMAT, naming `what`, where a calibration's bits or dims differ from the model's. */
export function checkKvqCalibrationDims(what: string, got: { bits: number; layers: number; kvHeads: number; headDim: number }, expect?: KvqExpect): void {
  if (expect?.bits !== undefined && expect.bits !== got.bits) throw new SqueezeError('ERR_FORMAT', `${what}: calibrated for ${got.bits} bits, ${expect.bits} requested`);
  for (const [k, want, have] of [['layers', expect?.layers, got.layers], ['kv_heads', expect?.kvHeads, got.kvHeads], ['head_dim', expect?.headDim, got.headDim]] as const)
    if (want !== undefined && want !== have) throw new SqueezeError('ERR_FORMAT', `${what}: calibration has ${k} = ${have}, the model has ${want}`);
}

/** Reads a calibration; `expect` (the model's dims) turns a mismatch into ERR_FORMAT. */
export function loadKvqCalibration(file: string, expect?: KvqExpect): KvqCalibration {
  const f = SafetensorsFile.open(file);
  try {
    const m = f.metadata;
    const num = (k: string): number => {
      const v = Number(m[k]);
      if (m[k] === undefined || !Number.isFinite(v)) throw new SqueezeError('ERR_FORMAT', `${file}: metadata '${k}' missing or not a number`);
      return v;
    };
    const bits = num('bits'), layers = num('layers'), kvHeads = num('kv_heads'), headDim = num('head_dim');
    if (bits !== 2 && bits !== 3 && bits !== 4) throw new SqueezeError('ERR_ARG', `${file}: bits must be 2, 3 or 4 (got ${bits})`);
    const pick = <T extends string>(k: string, allowed: readonly T[]): T => {
      const v = (m[k] ?? allowed[0]) as T;
      if (!allowed.includes(v)) throw new SqueezeError('ERR_FORMAT', `${file}: metadata '${k}' = '${m[k]}' is not one of ${allowed.join(', ')}`);
      return v;
    };
    const granularity = pick('key_granularity', ['channel', 'token'] as const);
    const rope = pick('key_rope', ['pre', 'post'] as const);
    const codebook = pick('codebook', ['kmeans', 'uniform'] as const);
    const sensitivity = m.sensitivity === undefined ? undefined : pick('sensitivity', ['queries', 'fisher', 'none'] as const);
    checkKvqCalibrationDims(file, { bits, layers, kvHeads, headDim }, expect);
    const HD = kvHeads * headDim, n = 1 << bits;
    const read = (name: string, len: number): Float32Array => {
      const a = f.readFloat32(name);
      if (a.length !== len) throw new SqueezeError('ERR_FORMAT', `${file}: '${name}' has ${a.length} values, expected ${len}`);
      return Float32Array.from(a);
    };
    // What calibrate-kv writes: finite bounds with lo <= hi, finite codebooks in ascending order.
    // Anything else is a damaged file and would quantize to NaN or nonsense without an error.
    const finite = (name: string, a: Float32Array): Float32Array => {
      const i = a.findIndex((x) => !Number.isFinite(x));
      if (i >= 0) throw new SqueezeError('ERR_FORMAT', `${file}: '${name}' holds ${a[i]} at index ${i}`);
      return a;
    };
    const out: KvqCalibrationLayer[] = [];
    for (let i = 0; i < layers; i++) {
      const p = `layers.${i}`;
      const keyLo = finite(`${p}.key_lo`, read(`${p}.key_lo`, HD)), keyHi = finite(`${p}.key_hi`, read(`${p}.key_hi`, HD));
      const c = keyLo.findIndex((lo, j) => lo > keyHi[j]);
      if (c >= 0) throw new SqueezeError('ERR_FORMAT', `${file}: ${p} key channel ${c} has key_lo ${keyLo[c]} above key_hi ${keyHi[c]}`);
      const books = [`${p}.key_codebook`, `${p}.value_codebook`].map((name) => {
        const b = finite(name, read(name, n));
        for (let j = 1; j < b.length; j++)
          if (!(b[j] >= b[j - 1])) throw new SqueezeError('ERR_FORMAT', `${file}: '${name}' is not in ascending order (entry ${j})`);
        return b;
      });
      out.push({ keyLo, keyHi, keyCodebook: books[0], valueCodebook: books[1] });
    }
    let slots: LayerSlots | undefined;
    if (m.key_slots !== undefined || m.value_slots !== undefined) {
      if (m.key_slots === undefined || m.value_slots === undefined)
        throw new SqueezeError('ERR_FORMAT', `${file}: metadata has ${m.key_slots === undefined ? 'value_slots without key_slots' : 'key_slots without value_slots'}`);
      const list = (v: string) => v.split(',').map((x) => (/^\s*\d+\s*$/.test(x) ? Number(x) : NaN));
      slots = { key: list(m.key_slots), value: list(m.value_slots) };
      checkLayerSlots(slots, layers, headDim, `${file}: metadata key_slots / value_slots`, 'ERR_FORMAT');
    }
    return {
      bits, outliers: num('outliers'), sink: num('sink'), kvHeads, headDim,
      keyPerToken: granularity === 'token', postRope: rope === 'post', codebook, ...(sensitivity ? { sensitivity } : {}),
      ...(slots ? { slots } : {}), layers: out,
    };
  } finally {
    f.close();
  }
}

/** Moves one layer's calibration to a device for the cache ops. */
export function calibrationTensors(cal: KvqCalibration, layer: number, device = 'cpu'): KvqLayerCalibration {
  const l = cal.layers[layer];
  if (!l) throw new SqueezeError('ERR_ARG', `calibrationTensors: no layer ${layer}`);
  return {
    keyLo: Tensor.from(l.keyLo, [l.keyLo.length], { device }), keyHi: Tensor.from(l.keyHi, [l.keyHi.length], { device }),
    keyCodebook: Tensor.from(l.keyCodebook, [l.keyCodebook.length], { device }),
    valueCodebook: Tensor.from(l.valueCodebook, [l.valueCodebook.length], { device }),
  };
}
