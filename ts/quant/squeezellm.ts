/**
 * SqueezeLLM quantization: per output row weighted k-means to 2^bits centroids (weights: Fisher
 * diagonal, or a proxy), dense-and-sparse decomposition (magnitude and sensitivity outliers kept
 * exact in CSR), packing to the interchange format, safetensors I/O, a model-folder quantizer and
 * a loader for quantized linears.
 *
 * Interchange format per linear `<p>`: `<p>.qweight` i32 [ceil(K/32)*bits, N] (codes packed along
 * K, least significant bits first, 3-bit straddling words), `<p>.lookup_table` [N, 2^bits],
 * optional `<p>.rows` i32 [N+1], `<p>.cols` i32 [nnz], `<p>.vals` [nnz] (weight minus that row's
 * centroid nearest zero).
 */
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as path from 'path';
import { SqueezeError } from '../errors';
import { DType, Tensor, TypedArray } from '../tensor';
import { resolveDevice } from '../device';
import {
  LutNormOptions, LutRopeAppendArgs, checkOutlierCsr, kmeansRows, lutMatmulPacked, lutPackedShape, lutPairRow, lutPairable, lutRepack, lutRopeAppend,
  sortOutlierRows,
} from '../ops/lut';
import { matmul } from '../ops/gemm';
import { add } from '../ops/elementwise';
import { Checkpoint, SafetensorsFile, WriteTensor, writeSafetensors } from '../model/safetensors';
import { lmHeadTied } from '../model/config';
import { float32ToF16Bits, f16BitsToFloat32, bf16BitsToFloat32 } from '../util/half';
import { GptqFactor, gptqFactorNative, gptqRefit } from './gptq';

export type Bits = 3 | 4;

export interface SqueezeLinear {
  N: number;
  K: number;
  bits: Bits;
  qweight: Int32Array;
  /** [N, 2^bits] */
  lut: Float32Array;
  rows?: Int32Array;
  cols?: Int32Array;
  vals?: Float32Array;
}

function checkBits(bits: number): Bits {
  if (bits !== 3 && bits !== 4) throw new SqueezeError('ERR_UNSUPPORTED', `squeezellm: bits must be 3 or 4, got ${bits}`);
  return bits;
}

// ---------------------------------------------------------------- packing

/** codes u8 [N,K] -> qweight i32 [ceil(K/32)*bits, N] (K padded with code 0). */
export function packCodes(codes: Uint8Array, N: number, K: number, bits: number): Int32Array {
  const b = checkBits(bits);
  const q = new Int32Array(Math.ceil(K / 32) * b * N);
  packRows(q, codes, 0, N, N, K, b);
  return q;
}

/** Packs rows [n0, n1) into qweight q [ceil(K/32)*b, N]; codes holds those rows only ([n1 - n0, K]). */
function packRows(q: Int32Array, codes: Uint8Array, n0: number, n1: number, N: number, K: number, b: Bits): void {
  const groups = Math.ceil(K / 32), full = K >>> 5;
  const acc = new Int32Array(b + 1);
  let seen = 0; // every code OR-ed: a code that does not fit sets a bit at or above b
  for (let n = n0; n < n1; n++) {
    const row = (n - n0) * K;
    // Whole groups of 32 codes: each word built in a register and stored once (q is [words, N]).
    for (let g = 0; g < full; g++) {
      const p = row + g * 32, o = g * b * N + n;
      if (b === 4) {
        for (let j = 0; j < 4; j++) {
          let v = 0;
          for (let i = 0; i < 8; i++) {
            const c = codes[p + 8 * j + i];
            seen |= c;
            v |= c << (4 * i);
          }
          q[o + j * N] = v;
        }
      } else {
        // 3 bits: word 0 holds codes 0-9 and the low 2 bits of code 10, word 1 its high bit,
        // codes 11-20 and the low bit of code 21, word 2 its high 2 bits and codes 22-31.
        let v = 0;
        for (let i = 0; i < 11; i++) { const c = codes[p + i]; seen |= c; v |= c << (3 * i); }
        q[o] = v;
        v = codes[p + 10] >>> 2;
        for (let i = 11; i < 22; i++) { const c = codes[p + i]; seen |= c; v |= c << (3 * i - 32); }
        q[o + N] = v;
        v = codes[p + 21] >>> 1;
        for (let i = 22; i < 32; i++) { const c = codes[p + i]; seen |= c; v |= c << (3 * i - 64); }
        q[o + 2 * N] = v;
      }
    }
    // The last, partial group (K padded with code 0).
    if (full < groups) {
      const k0 = full * 32, len = K - k0;
      acc.fill(0);
      for (let i = 0; i < len; i++) {
        const c = codes[row + k0 + i];
        seen |= c;
        const bit = i * b, word = bit >>> 5, off = bit & 31;
        acc[word] |= c << off;
        if (off + b > 32) acc[word + 1] |= c >>> (32 - off);
      }
      for (let j = 0; j < b; j++) q[(full * b + j) * N + n] = acc[j];
    }
  }
  if (seen >>> b) {
    let i = 0;
    while (!(codes[i] >>> b)) i++;
    const n = Math.floor(i / K), k = i - n * K;
    throw new SqueezeError('ERR_ARG', `packCodes: code ${codes[i]} at [${n0 + n}, ${k}] does not fit ${b} bits`);
  }
}

/** qweight i32 [ceil(K/32)*bits, N] -> codes u8 [N,K]. */
export function unpackCodes(q: Int32Array, N: number, K: number, bits: number): Uint8Array {
  const b = checkBits(bits);
  const groups = Math.ceil(K / 32), mask = (1 << b) - 1;
  if (q.length !== groups * b * N) throw new SqueezeError('ERR_SHAPE', `unpackCodes: qweight has ${q.length} words, expected ${groups * b * N}`);
  const codes = new Uint8Array(N * K);
  for (let n = 0; n < N; n++)
    for (let k = 0; k < K; k++) {
      const g = k >>> 5, i = k & 31, bit = i * b, word = bit >>> 5, off = bit & 31;
      let v = q[(g * b + word) * N + n] >>> off;
      if (off + b > 32) v |= q[(g * b + word + 1) * N + n] << (32 - off);
      codes[n * K + k] = v & mask;
    }
  return codes;
}

/** The dense weight [N,K] (dense part + outliers): the oracle for lutMatmul. */
export function dequantize(l: SqueezeLinear): Float32Array {
  const { N, K, bits } = l, E = 1 << bits;
  const codes = unpackCodes(l.qweight, N, K, bits);
  const w = new Float32Array(N * K);
  for (let n = 0; n < N; n++) for (let k = 0; k < K; k++) w[n * K + k] = l.lut[n * E + codes[n * K + k]];
  if (l.rows && l.cols && l.vals)
    for (let n = 0; n < N; n++) for (let j = l.rows[n]; j < l.rows[n + 1]; j++) w[n * K + l.cols[j]] += l.vals[j];
  return w;
}

// ---------------------------------------------------------------- quantizer

export interface QuantizeOptions {
  bits: number;
  /** Share of weights kept exact by magnitude (e.g. 0.0045). */
  outliers?: number;
  /** Share of weights kept exact by sensitivity (e.g. 0.0005). */
  sensitive?: number;
  /** Sensitivity: Fisher diagonal [N,K], or per input channel [K] (mean squared activation); uniform when absent. */
  sens?: Float32Array;
  /**
   * The damped calibration second moment of this linear's input (gptq.ts gptqFactor): error
   * compensation with table refits after k-means (gptq.ts gptqRefit).
   */
  gptq?: GptqFactor;
  /** GPTQ + refit rounds with `gptq` (default 3; 0 only refits the outlier values). */
  gptqRounds?: number;
  /**
   * How the `sensitive` outliers are picked: 'weight' (default) the top sens * w^2; 'error' the
   * top sens * (w - q)^2 after a first dense fit (with `gptq`: after compensation), then refit.
   */
  outlierScore?: 'weight' | 'error';
  iters?: number;
  /** Where k-means runs: 'cpu' (default) or 'cuda' / 'cuda:N'. */
  device?: string;
  /**
   * w already on `device` ([N, K], f32, f16 or bf16, holding exactly w's values, e.g. the tensor w
   * was read from): k-means reads it instead of a fresh upload of w.
   */
  deviceWeight?: Tensor;
}

// Host buffers of a whole [N, K] matrix are avoided where a slice does: at 7B shapes each linear
// has up to 45M weights, and large fresh allocations are slow to touch on some hosts. Slices of
// at most this many bytes move between host and device.
export const SLICE_BYTES = 1 << 24;

/**
 * The value at rank `idx` of `a` in ascending order, as Float32Array.prototype.sort orders it
 * (NaN last), found by selection instead of a full sort; `a` is reordered. Only -0 and +0 may come
 * back swapped, which no `>` comparison against the threshold can tell apart.
 */
function selectRank(a: Float32Array, idx: number): number {
  let m = 0; // NaNs to the end
  for (let i = 0; i < a.length; i++) if (a[i] === a[i]) a[m++] = a[i];
  if (idx >= m) return NaN;
  let lo = 0, hi = m - 1, rounds = 0;
  while (hi > lo) {
    if (++rounds > 64) return a.subarray(lo, hi + 1).sort()[idx - lo]; // pathological pivots
    // Median of three as the pivot, then a three-way partition: < p | = p | > p.
    const x = a[lo], y = a[(lo + hi) >>> 1], z = a[hi];
    const p = x < y ? (y < z ? y : x < z ? z : x) : (x < z ? x : y < z ? z : y);
    let lt = lo, i = lo, gt = hi;
    while (i <= gt) {
      const v = a[i];
      if (v < p) { a[i++] = a[lt]; a[lt++] = v; }
      else if (v > p) { a[i] = a[gt]; a[gt--] = v; }
      else i++;
    }
    if (idx < lt) hi = lt - 1;
    else if (idx > gt) lo = gt + 1;
    else return p;
  }
  return a[idx];
}

/** Threshold t such that about `share` of |values| exceed it (estimated on a strided sample). */
function topThreshold(n: number, value: (i: number) => number, share: number): number {
  if (share <= 0 || n === 0) return Infinity;
  const step = Math.max(1, Math.floor(n / 2_000_000));
  const sample = new Float32Array(Math.ceil(n / step));
  for (let i = 0, j = 0; i < n; i += step, j++) sample[j] = value(i);
  const idx = Math.min(sample.length - 1, Math.max(0, Math.floor(sample.length * (1 - share))));
  return selectRank(sample, idx);
}

/** A growing list of flat indices (ascending when pushed in order). */
class IndexList {
  a: Float64Array;
  n = 0;
  constructor(capacity: number) { this.a = new Float64Array(Math.max(16, capacity)); }
  push(i: number): void {
    if (this.n === this.a.length) {
      const b = new Float64Array(2 * this.a.length);
      b.set(this.a);
      this.a = b;
    }
    this.a[this.n++] = i;
  }
  get list(): Float64Array { return this.a.subarray(0, this.n); }
}

/** Flat indices, ascending, of w's weights with |w| > tMag or sens * w^2 > tSens. */
function findOutliers(w: Float32Array, N: number, K: number, tMag: number, sens: Float32Array | undefined, tSens: number,
  share: number): Float64Array {
  const out = new IndexList(Math.ceil(1.25 * share * N * K) + 1024);
  if (!sens || !(tSens < Infinity)) {
    for (let i = 0; i < N * K; i++) if (Math.abs(w[i]) > tMag) out.push(i);
  } else if (sens.length === K) {
    for (let n = 0, i = 0; n < N; n++)
      for (let k = 0; k < K; k++, i++) {
        const x = w[i];
        if (Math.abs(x) > tMag || sens[k] * x * x > tSens) out.push(i);
      }
  } else {
    for (let i = 0; i < N * K; i++) {
      const x = w[i];
      if (Math.abs(x) > tMag || sens[i] * x * x > tSens) out.push(i);
    }
  }
  return out.list;
}

/** Quantizes one weight matrix w [N,K] (row n = output channel n). */
export async function quantizeLinear(w: Float32Array, N: number, K: number, o: QuantizeOptions): Promise<SqueezeLinear> {
  const bits = checkBits(o.bits), E = 1 << bits;
  if (w.length !== N * K) throw new SqueezeError('ERR_SHAPE', `quantizeLinear: weight has ${w.length} elements, expected ${N}x${K}`);
  const sens = o.sens;
  if (sens && sens.length !== K && sens.length !== N * K)
    throw new SqueezeError('ERR_SHAPE', `quantizeLinear: sensitivity has ${sens.length} elements, expected ${K} or ${N * K}`);
  const dw = o.deviceWeight;
  if (dw) {
    if (dw.shape.length !== 2 || dw.shape[0] !== N || dw.shape[1] !== K)
      throw new SqueezeError('ERR_SHAPE', `quantizeLinear: deviceWeight is [${dw.shape}], expected [${N}, ${K}]`);
    if (dw.device !== resolveDevice(o.device ?? 'cpu'))
      throw new SqueezeError('ERR_DEVICE', `quantizeLinear: deviceWeight is on ${dw.device}, k-means runs on ${o.device ?? 'cpu'}`);
  }
  const sAt = (i: number): number => (!sens ? 1 : sens.length === K ? sens[i % K] : sens[i]);
  // Magnitude outliers: |w| above a per-matrix threshold; sensitive: top saliency sens * w^2, or
  // with outlierScore 'error' the top sens * (w - q)^2 of a first dense-only fit.
  const byError = o.outlierScore === 'error' && (o.sensitive ?? 0) > 0;
  const tMag = topThreshold(N * K, (i) => Math.abs(w[i]), o.outliers ?? 0);
  const tSens = sens && !byError ? topThreshold(N * K, (i) => sAt(i) * w[i] * w[i], o.sensitive ?? 0) : Infinity;
  let out = findOutliers(w, N, K, tMag, sens, tSens, (o.outliers ?? 0) + (o.sensitive ?? 0));
  if (!o.gptq && !byError) {
    // k-means alone: the codes are read back in slices straight into the packed result.
    const fit = await kmeansFit(w, N, K, E, out, o);
    try {
      return await assemble(N, K, bits, fit.lut, out, w, (n0, n1) => readRows(fit.codes, n0, n1, K));
    } finally {
      fit.codes.dispose();
    }
  }
  // With compensation or error-scored outliers the whole codes and outlier mask take part.
  const isOut = new Uint8Array(N * K);
  for (const i of out) isOut[i] = 1;
  let fit = await denseFit(w, N, K, E, isOut, out, o);
  if (byError) {
    const q = fit.q ?? denseValues(w, N, K, E, isOut, fit.lut, fit.codes);
    const tErr = topThreshold(N * K, (i) => (isOut[i] ? 0 : sAt(i) * (w[i] - q[i]) * (w[i] - q[i])), o.sensitive ?? 0);
    const more = new IndexList(out.length + Math.ceil(1.25 * (o.sensitive ?? 0) * N * K) + 1024);
    for (let i = 0; i < N * K; i++) {
      if (!isOut[i] && sAt(i) * (w[i] - q[i]) * (w[i] - q[i]) > tErr) isOut[i] = 1;
      if (isOut[i]) more.push(i);
    }
    out = more.list;
    fit = await denseFit(w, N, K, E, isOut, out, o);
  }
  const { lut, codes } = fit;
  // What an outlier stands for: its exact value, or with compensation the refit one.
  return assemble(N, K, bits, lut, out, fit.q ?? w, async (n0, n1) => codes.subarray(n0 * K, n1 * K));
}

/** Elements [off, off + len) of a tensor, on the host (read through a view, freed after). */
export async function readSlice(t: Tensor, off: number, len: number): Promise<TypedArray> {
  const v = t.view(off, [len]);
  try {
    return await v.toArray();
  } finally {
    v.dispose();
  }
}

/** Codes of rows [n0, n1) of a [N, K] u8 tensor, on the host. */
const readRows = async (codes: Tensor, n0: number, n1: number, K: number): Promise<Uint8Array> =>
  (await readSlice(codes, n0 * K, (n1 - n0) * K)) as Uint8Array;

/**
 * The packed linear from the tables, the outliers (ascending flat indices) and the codes, read
 * in row slices (writable; an outlier's code becomes its row's centroid nearest zero). Outlier
 * values: q at the outlier minus that centroid.
 */
async function assemble(N: number, K: number, bits: Bits, lut: Float32Array, out: Float64Array, q: Float32Array,
  rowsOf: (n0: number, n1: number) => Promise<Uint8Array>): Promise<SqueezeLinear> {
  const E = 1 << bits, nnz = out.length;
  const qweight = new Int32Array(Math.ceil(K / 32) * bits * N);
  let rows: Int32Array | undefined, cols: Int32Array | undefined, vals: Float32Array | undefined;
  if (nnz > 0) {
    rows = new Int32Array(N + 1);
    cols = new Int32Array(nnz);
    vals = new Float32Array(nnz);
  }
  const R = Math.max(1, Math.min(N, Math.floor(SLICE_BYTES / Math.max(1, K))));
  let j = 0, zRow = -1, z = 0;
  for (let n0 = 0; n0 < N; n0 += R) {
    const n1 = Math.min(N, n0 + R), base = n0 * K;
    const codes = await rowsOf(n0, n1);
    for (; j < nnz && out[j] < n1 * K; j++) {
      const i = out[j], n = Math.floor(i / K);
      if (n !== zRow) { // the centroid nearest zero
        zRow = n;
        z = 0;
        for (let e = 1; e < E; e++) if (Math.abs(lut[n * E + e]) < Math.abs(lut[n * E + z])) z = e;
      }
      codes[i - base] = z;
      cols![j] = i - n * K;
      vals![j] = q[i] - lut[n * E + z];
      rows![n + 1]++;
    }
    packRows(qweight, codes, n0, n1, N, K, bits);
  }
  if (rows) for (let n = 0; n < N; n++) rows[n + 1] += rows[n];
  return { N, K, bits, qweight, lut, rows, cols, vals };
}

/** What every weight stands for after a fit without compensation: its centroid, outliers their exact value. */
function denseValues(w: Float32Array, N: number, K: number, E: number, isOut: Uint8Array, lut: Float32Array,
  codes: Uint8Array): Float32Array {
  const q = new Float32Array(N * K);
  for (let n = 0, i = 0; n < N; n++)
    for (let k = 0; k < K; k++, i++) q[i] = isOut[i] ? w[i] : lut[n * E + codes[i]];
  return q;
}

/**
 * k-means weights on `device`: 0 for outliers (ascending flat indices), else max(0, sensitivity);
 * uniform weights as f16 ones and zeros (exact, half the bytes), or one shared row of ones when
 * nothing is an outlier. Written in slices.
 */
function kmeansWeights(out: Float64Array, N: number, K: number, sens: Float32Array | undefined, device: string): Tensor {
  if (!sens && out.length === 0) return Tensor.from(new Float32Array(K).fill(1), [K], { device });
  const f16 = !sens;
  const t = Tensor.empty([N, K], { dtype: f16 ? 'f16' : 'f32', device });
  try {
    const total = N * K, slice = Math.min(total, SLICE_BYTES >> (f16 ? 1 : 2));
    const buf = f16 ? new Uint16Array(slice) : new Float32Array(slice);
    let j = 0;
    for (let off = 0; off < total; off += slice) {
      const len = Math.min(slice, total - off), b = buf.subarray(0, len);
      if (f16) b.fill(0x3c00); // f16 1.0
      else if (sens!.length === K) for (let i = 0, k = off % K; i < len; i++, k = k + 1 === K ? 0 : k + 1) b[i] = Math.max(0, sens![k]);
      else for (let i = 0; i < len; i++) b[i] = Math.max(0, sens![off + i]);
      for (; j < out.length && out[j] < off + len; j++) b[out[j] - off] = 0;
      const v = t.view(off, [len]);
      v.write(b);
      v.dispose();
    }
    return t;
  } catch (e) {
    t.dispose();
    throw e;
  }
}

/** Weighted k-means of w's rows on o.device (outliers weigh 0): host tables, codes left on the device. */
async function kmeansFit(w: Float32Array, N: number, K: number, E: number, out: Float64Array,
  o: QuantizeOptions): Promise<{ lut: Float32Array; codes: Tensor }> {
  const device = o.device ?? 'cpu';
  const own: Tensor[] = [];
  const tc = Tensor.empty([N, K], { dtype: 'u8', device });
  try {
    const tw = o.deviceWeight ?? Tensor.from(w, [N, K], { device });
    if (tw !== o.deviceWeight) own.push(tw);
    const ts = kmeansWeights(out, N, K, o.sens, device);
    own.push(ts);
    const tl = Tensor.empty([N, E], { dtype: 'f32', device });
    own.push(tl);
    kmeansRows(tl, tc, tw, ts, o.iters ?? 30);
    return { lut: (await tl.toArray()) as Float32Array, codes: tc };
  } catch (e) {
    tc.dispose();
    throw e;
  } finally {
    own.forEach((t) => t.dispose());
  }
}

/**
 * The dense part for a given outlier mask (and its ascending flat indices): weighted k-means
 * (outliers weigh 0), then with o.gptq error compensation with table refits. q (with o.gptq
 * only): what every weight stands for (its centroid, outliers their compensated value); without,
 * a weight stands for its centroid and an outlier for itself.
 */
async function denseFit(w: Float32Array, N: number, K: number, E: number, isOut: Uint8Array, out: Float64Array,
  o: QuantizeOptions): Promise<{ lut: Float32Array; codes: Uint8Array; q?: Float32Array }> {
  const { lut, codes: tc } = await kmeansFit(w, N, K, E, out, o);
  let codes: Uint8Array;
  try {
    codes = (await tc.toArray()) as Uint8Array;
  } finally {
    tc.dispose();
  }
  if (o.gptq) return gptqRefit(w, N, K, codes, lut, E, isOut, o.gptq, o.gptqRounds ?? 3);
  return { lut, codes };
}

/** Round-to-nearest baseline: uniform per-row min-max grid at the same bits, as a table. */
export function rtnQuantize(w: Float32Array, N: number, K: number, bits: number): SqueezeLinear {
  const b = checkBits(bits), E = 1 << b;
  const lut = new Float32Array(N * E), codes = new Uint8Array(N * K);
  for (let n = 0; n < N; n++) {
    let lo = Infinity, hi = -Infinity;
    for (let k = 0; k < K; k++) { lo = Math.min(lo, w[n * K + k]); hi = Math.max(hi, w[n * K + k]); }
    const step = hi > lo ? (hi - lo) / (E - 1) : 1;
    for (let e = 0; e < E; e++) lut[n * E + e] = lo + e * step;
    for (let k = 0; k < K; k++) codes[n * K + k] = Math.min(E - 1, Math.max(0, Math.round((w[n * K + k] - lo) / step)));
  }
  return { N, K, bits: b, qweight: packCodes(codes, N, K, b), lut };
}

/** sum sens * (w - q)^2 (sens [N,K], [K] or uniform). */
export function weightedError(w: Float32Array, q: Float32Array, N: number, K: number, sens?: Float32Array): number {
  let s = 0;
  for (let i = 0; i < N * K; i++) {
    const d = w[i] - q[i];
    s += (sens ? (sens.length === K ? sens[i % K] : sens[i]) : 1) * d * d;
  }
  return s;
}

// ---------------------------------------------------------------- safetensors I/O

export interface SqueezeMeta {
  bits: number;
  lut_dtype: 'f16' | 'f32';
  outlier_dtype: 'f16' | 'f32';
  outlier_share: number;
  source: string;
}

/** The tensors of one quantized linear, ready for writeSafetensors. */
export function squeezeTensors(prefix: string, l: SqueezeLinear, lutDtype: 'f16' | 'f32' = 'f16',
  outlierDtype: 'f16' | 'f32' = 'f16'): Record<string, WriteTensor> {
  const E = 1 << l.bits;
  const fl = (a: Float32Array, d: 'f16' | 'f32') => (d === 'f16' ? float32ToF16Bits(a) : a);
  const t: Record<string, WriteTensor> = {
    [`${prefix}.qweight`]: { dtype: 'i32', shape: [Math.ceil(l.K / 32) * l.bits, l.N], data: l.qweight },
    [`${prefix}.lookup_table`]: { dtype: lutDtype, shape: [l.N, E], data: fl(l.lut, lutDtype) },
  };
  if (l.rows && l.cols && l.vals) {
    t[`${prefix}.rows`] = { dtype: 'i32', shape: [l.N + 1], data: l.rows };
    t[`${prefix}.cols`] = { dtype: 'i32', shape: [l.cols.length], data: l.cols };
    t[`${prefix}.vals`] = { dtype: outlierDtype, shape: [l.vals.length], data: fl(l.vals, outlierDtype) };
  }
  return t;
}

export function squeezeMetadata(m: SqueezeMeta): Record<string, string> {
  return {
    format: 'squeezellm', bits: String(m.bits), lut_dtype: m.lut_dtype, outlier_dtype: m.outlier_dtype,
    outlier_share: String(m.outlier_share), source: m.source,
  };
}

/** What loadSqueezeLinear reads from: a SafetensorsFile or a Checkpoint. */
export interface TensorReader {
  has(name: string): boolean;
  read(name: string): { dtype: string; shape: number[]; data: ArrayBufferView };
}

function floatsOf(name: string, r: { dtype: string; data: ArrayBufferView }): Float32Array {
  if (r.dtype === 'F32') return r.data as Float32Array;
  if (r.dtype === 'F16') return f16BitsToFloat32(r.data as Uint16Array);
  if (r.dtype === 'BF16') return bf16BitsToFloat32(r.data as Uint16Array);
  throw new SqueezeError('ERR_FORMAT', `${name}: expected F16/BF16/F32, got ${r.dtype}`);
}

/**
 * Table entries and outlier values as floats, each finite and within fp16's range (the CUDA
 * kernels hold them in fp16): quantize never writes anything else, so another value means a
 * damaged file, and it would turn every output of its row into inf or NaN (ERR_FORMAT naming it).
 */
function tableFloats(name: string, r: { dtype: string; data: ArrayBufferView }): Float32Array {
  const a = floatsOf(name, r);
  for (let i = 0; i < a.length; i++)
    if (!(Math.abs(a[i]) <= 65504))
      throw new SqueezeError('ERR_FORMAT', `${name}: value ${a[i]} at index ${i} is not a finite fp16 number`);
  return a;
}

/** Reads one linear (host arrays), checking shapes and the outlier CSR (ERR_FORMAT naming the tensor). */
export function readSqueezeLinear(reader: TensorReader, prefix: string, inFeatures?: number): SqueezeLinear {
  const qn = `${prefix}.qweight`, ln = `${prefix}.lookup_table`;
  const q = reader.read(qn), l = reader.read(ln);
  if (q.dtype !== 'I32' || q.shape.length !== 2) throw new SqueezeError('ERR_FORMAT', `${qn}: expected I32 [K*bits/32, N], got ${q.dtype} [${q.shape}]`);
  if (l.shape.length !== 2) throw new SqueezeError('ERR_FORMAT', `${ln}: expected [N, 2^bits], got [${l.shape}]`);
  const [R, N] = q.shape, E = l.shape[1];
  const bits = E === 16 ? 4 : E === 8 ? 3 : 0;
  if (!bits) throw new SqueezeError('ERR_UNSUPPORTED', `${ln}: ${E} entries per row; only 3-bit (8) and 4-bit (16) tables are supported`);
  if (l.shape[0] !== N) throw new SqueezeError('ERR_SHAPE', `${ln}: [${l.shape}] does not match ${N} output rows of ${qn}`);
  if (R % bits !== 0) throw new SqueezeError('ERR_SHAPE', `${qn}: ${R} packed rows is not a multiple of bits = ${bits}`);
  const Kp = (R / bits) * 32;
  const K = inFeatures ?? Kp;
  if (Math.ceil(K / 32) * 32 !== Kp) throw new SqueezeError('ERR_SHAPE', `${qn}: [${q.shape}] holds ${Kp} inputs, expected ${K} (padded to 32)`);
  const out: SqueezeLinear = { N, K, bits: bits as Bits, qweight: q.data as Int32Array, lut: tableFloats(ln, l) };
  const rn = `${prefix}.rows`, cn = `${prefix}.cols`, vn = `${prefix}.vals`;
  const present = [rn, cn, vn].filter((n) => reader.has(n)).length;
  if (present !== 0 && present !== 3) throw new SqueezeError('ERR_FORMAT', `${prefix}: rows, cols and vals must come together`);
  if (present === 3) {
    const r = reader.read(rn), c = reader.read(cn), v = reader.read(vn);
    if (r.dtype !== 'I32' || c.dtype !== 'I32') throw new SqueezeError('ERR_FORMAT', `${rn}/${cn}: expected I32`);
    const rows = r.data as Int32Array;
    let cols = c.data as Int32Array, vals = tableFloats(vn, v);
    if (vals.length !== cols.length) throw new SqueezeError('ERR_FORMAT', `${vn}: ${vals.length} values for ${cols.length} cols`);
    // Foreign files may list a row's outliers in any order; the kernels want them by column.
    if (rows.length === N + 1 && rows[0] === 0 && rows[N] === cols.length) {
      const sorted = cols.slice(), v2 = vals.slice();
      if (sortOutlierRows(rows, sorted, v2)) { cols = sorted; vals = v2; }
    }
    checkOutlierCsr(rows, cols, N, K, `${prefix} outliers`);
    Object.assign(out, { rows, cols, vals });
  }
  return out;
}

/** What a quantized linear's launch may know of the launch after it. */
export interface ChainOptions {
  /**
   * The quantized linear that runs next on the same stream (a decode step's next projection): this
   * launch requests the first codes of its row groups into L2 at its end (lutMatmulPacked's
   * prefetchNext: the 4-bit CUDA GEMVs of up to 2 rows act on it; a hint, the result does not depend
   * on it).
   */
  prefetchNext?: SqueezeLinearModule | null;
}

/** A quantized linear on a device: forward(y[M,N], x[M,K]) replaces a dense matmul. */
export interface SqueezeLinearModule {
  readonly N: number;
  readonly K: number;
  readonly bits: Bits;
  readonly bytes: number;
  /** The half its rows are stored paired at (pairSqueezeRows; 0: as they are). */
  readonly pairHalf: number;
  /** Its codes in the kernels' packed layout (lutRepack), e.g. for another module's prefetchNext. */
  readonly codes: Tensor;
  /**
   * y = x · Wᵀ (+ outliers); with norm.normWeight, of rmsnorm(x) * normWeight (LutNormOptions); with
   * opts.prefetchNext, the module whose launch follows (ChainOptions).
   */
  forward(y: Tensor, x: Tensor, opts?: LutNormOptions & ChainOptions): void;
  /**
   * y += x · Wᵀ, the product rounded to y's dtype first, in one launch (lutMatmulPacked's residual
   * epilogue: the residual add behind a block's last projection; on CUDA up to 64 rows of x).
   */
  forwardAdd(y: Tensor, x: Tensor, opts?: ChainOptions): void;
  /**
   * A gate|up module stored paired at N/2 only: act[M, N/2] = silu(gate) * up of y = x · Wᵀ in one
   * launch (lutMatmulPacked's siluPairs epilogue; on CUDA up to 64 rows of x); opts as in forward.
   */
  siluPairs?(act: Tensor, x: Tensor, opts?: LutNormOptions & ChainOptions): void;
  /**
   * A q|k|v module stored paired at head_dim/2 only: the projection of x and ropeAppend into qOut
   * and the paged caches in one launch (lutRopeAppend; on CUDA up to 64 rows of x).
   */
  ropeAppend?(qOut: Tensor, kCache: Tensor, vCache: Tensor, x: Tensor, r: LutRopeAppendArgs): void;
  dispose(): void;
}

/**
 * The same linear with its rows stored paired at half H (csrc/cpu/lut_gemm.h, "Paired rows"):
 * stored row p is row lutPairRow(p, H) of `l`, with its codes, table and outliers.
 */
export function pairSqueezeRows(l: SqueezeLinear, H: number): SqueezeLinear {
  if (!lutPairable(l.N, H))
    throw new SqueezeError('ERR_ARG', `squeezellm: rows of a ${l.N}-row linear cannot be paired at ${H} (a multiple of 8 that 2 * ${H} divides)`);
  const { N, K, bits } = l, E = 1 << bits, R = Math.ceil(K / 32) * bits;
  const src = Int32Array.from({ length: N }, (_, p) => lutPairRow(p, H));
  const qweight = new Int32Array(R * N), lut = new Float32Array(N * E);
  for (let r = 0; r < R; r++) {
    const o = r * N;
    for (let p = 0; p < N; p++) qweight[o + p] = l.qweight[o + src[p]];
  }
  for (let p = 0; p < N; p++) lut.set(l.lut.subarray(src[p] * E, (src[p] + 1) * E), p * E);
  if (!l.rows || !l.cols || !l.vals) return { ...l, qweight, lut };
  const rows = new Int32Array(N + 1), cols = new Int32Array(l.cols.length), vals = new Float32Array(l.vals.length);
  for (let p = 0; p < N; p++) {
    const b = l.rows[src[p]], e = l.rows[src[p] + 1];
    cols.set(l.cols.subarray(b, e), rows[p]);
    vals.set(l.vals.subarray(b, e), rows[p]);
    rows[p + 1] = rows[p] + (e - b);
  }
  return { ...l, qweight, lut, rows, cols, vals };
}

/** Options of uploadSqueezeLinear. */
export interface UploadOptions {
  /**
   * Store the rows paired at this half (pairSqueezeRows): the output is unchanged; a gate|up
   * linear paired at N/2 gains siluPairs, a q|k|v linear paired at head_dim/2 ropeAppend. 0 /
   * absent: as they are.
   */
  pairHalf?: number;
}

/**
 * Uploads host arrays of a linear to `device` and repacks the codes once into the kernel layout
 * (lutRepack); tables and outliers in f16 on CUDA (f32 on CPU).
 */
export function uploadSqueezeLinear(src: SqueezeLinear, device: string, dtype?: DType, opts: UploadOptions = {}): SqueezeLinearModule {
  const pairHalf = opts.pairHalf ?? 0;
  const l = pairHalf ? pairSqueezeRows(src, pairHalf) : src;
  const fd: DType = device === 'cpu' || dtype === 'f32' ? 'f32' : 'f16';
  const fl = (a: Float32Array) => (fd === 'f16' ? float32ToF16Bits(a) : a);
  const E = 1 << l.bits;
  const qi = Tensor.from(l.qweight, [Math.ceil(l.K / 32) * l.bits, l.N], { dtype: 'i32', device });
  const q = Tensor.empty(lutPackedShape(l.N, l.K, l.bits), { dtype: 'i32', device });
  try {
    lutRepack(q, qi, l.bits);
  } catch (e) {
    q.dispose();
    throw e;
  } finally {
    qi.dispose();
  }
  // Everything uploaded so far is freed if a later upload fails (a device out of memory).
  const all: Tensor[] = [q];
  const up = (t: Tensor): Tensor => (all.push(t), t);
  let lut: Tensor, rows: Tensor | undefined, cols: Tensor | undefined, vals: Tensor | undefined;
  try {
    lut = up(Tensor.from(fl(l.lut), [l.N, E], { dtype: fd, device }));
    if (l.rows && l.cols && l.vals) {
      rows = up(Tensor.from(l.rows, [l.N + 1], { dtype: 'i32', device }));
      cols = up(Tensor.from(l.cols, [l.cols.length], { dtype: 'i32', device }));
      vals = up(Tensor.from(fl(l.vals), [l.vals.length], { dtype: fd, device }));
    }
  } catch (e) {
    all.forEach((t) => t.dispose());
    throw e;
  }
  const checkX = (x: Tensor): void => {
    if (x.shape.length !== 2 || x.shape[1] !== l.K)
      throw new SqueezeError('ERR_SHAPE', `squeezellm linear: x is [${x.shape}], expected [M, ${l.K}]`);
  };
  return {
    N: l.N, K: l.K, bits: l.bits, pairHalf,
    bytes: all.reduce((s, t) => s + t.byteLength, 0),
    codes: q,
    forward(y: Tensor, x: Tensor, opts?: LutNormOptions & ChainOptions): void {
      checkX(x);
      lutMatmulPacked(y, x, q, lut, rows, cols, vals, l.bits, { ...opts, pairHalf, prefetchNext: opts?.prefetchNext?.codes });
    },
    forwardAdd(y: Tensor, x: Tensor, opts?: ChainOptions): void {
      checkX(x);
      lutMatmulPacked(y, x, q, lut, rows, cols, vals, l.bits, { pairHalf, epilogue: 'residual', prefetchNext: opts?.prefetchNext?.codes });
    },
    siluPairs: 2 * pairHalf === l.N ? (act: Tensor, x: Tensor, opts?: LutNormOptions & ChainOptions): void => {
      checkX(x);
      lutMatmulPacked(act, x, q, lut, rows, cols, vals, l.bits, { ...opts, pairHalf, epilogue: 'siluPairs', prefetchNext: opts?.prefetchNext?.codes });
    } : undefined,
    ropeAppend: pairHalf > 0 && 2 * pairHalf < l.N ? (qOut: Tensor, kCache: Tensor, vCache: Tensor, x: Tensor, r: LutRopeAppendArgs): void => {
      checkX(x);
      lutRopeAppend(qOut, kCache, vCache, x, q, lut, rows, cols, vals, l.bits, pairHalf, r);
    } : undefined,
    dispose(): void { all.forEach((t) => t.dispose()); },
  };
}

/**
 * The loader hook: the decoder calls this for a linear whose `<prefix>.qweight` exists, and
 * `forward(y, x)` instead of a dense matmul.
 */
export function loadSqueezeLinear(reader: TensorReader, prefix: string, device: string, dtype?: DType,
  inFeatures?: number): SqueezeLinearModule {
  return uploadSqueezeLinear(readSqueezeLinear(reader, prefix, inFeatures), device, dtype);
}

/** True when `<prefix>.qweight` exists (a quantized linear). */
export function isSqueezeLinear(reader: TensorReader, prefix: string): boolean {
  return reader.has(`${prefix}.qweight`);
}

// ---------------------------------------------------------------- model folders

export interface QuantizeModelOptions {
  bits: number;
  /** Magnitude outlier share (default 0.0045). */
  outliers?: number;
  /** Sensitive outlier share (default 0.0005; only with fisher or calibration statistics). */
  sensitive?: number;
  /** A safetensors file holding the Fisher diagonal per linear weight (same names as the model). */
  fisher?: string;
  /** Per-linear input statistics: `<linear>` -> mean squared activation per input channel [K]. */
  calib?: Map<string, Float32Array>;
  /** Per-linear E[x xᵀ] [K,K]: enables error compensation with table refits (gptq.ts). */
  cov?: Map<string, Float64Array>;
  /** Damping of E[x xᵀ]: this share of its mean diagonal is added to the diagonal (default 0.01). */
  damp?: number;
  /** GPTQ + refit rounds (default 3). */
  gptqRounds?: number;
  /** How sensitive outliers are picked (QuantizeOptions.outlierScore). */
  outlierScore?: 'weight' | 'error';
  /**
   * Quantize the lm_head too (default false: kept as stored). A tied model's lm_head is its
   * embedding matrix: that is quantized as `lm_head` and the embeddings stay dense, so the written
   * config unties them. Its sensitivity is `lm_head.weight` in the Fisher file, or the calibration
   * statistics of its input (the final norm's output, key `lm_head`).
   */
  lmHead?: boolean;
  out: string;
  /** Round-to-nearest uniform grid per row instead of k-means (a baseline; no outliers). */
  rtn?: boolean;
  iters?: number;
  /** Where k-means runs: 'cpu' (default) or 'cuda' / 'cuda:N'. */
  device?: string;
  /**
   * Reuse the linears an interrupted run with the same source and settings finished (default
   * true): each finished linear is kept in `<out>/.squeezelm-partial/` until the model is written.
   * false: start over (what an earlier run left there is discarded).
   */
  resume?: boolean;
  /** After each linear; `resumed`: taken from an interrupted run instead of quantized again. */
  onProgress?: (done: number, total: number, name: string, resumed: boolean) => void;
  /** Why the partial results of an earlier run were discarded (settings or source changed). */
  onRestart?: (reason: string) => void;
}

/** Where quantizeModel keeps each finished linear of a run in progress, inside the output folder. */
export const PARTIAL_DIR = '.squeezelm-partial';

const LINEARS = ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj',
  'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'];

/**
 * Quantizes every q/k/v/o/gate/up/down linear of a Hugging Face folder (and with `lmHead` the
 * lm_head) and writes a complete model folder (embeddings, norms and, unless asked, lm_head as
 * stored; tokenizer files copied). Without `fisher` or `calib`, k-means weights are uniform (no
 * sensitivity outliers).
 */
export async function quantizeModel(dir: string, o: QuantizeModelOptions): Promise<{ linears: number; outliers: number }> {
  const bits = checkBits(o.bits);
  const cfgPath = path.join(dir, 'config.json');
  let cfg: Record<string, unknown>;
  try { cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8')); } catch (e) {
    throw new SqueezeError('ERR_FORMAT', `${cfgPath}: ${(e as Error).message}`);
  }
  const ck = Checkpoint.open(dir);
  const fisher = o.fisher ? SafetensorsFile.open(o.fisher) : undefined;
  const outShare = o.outliers ?? 0.0045, sensShare = o.sensitive ?? 0.0005;
  const tensors: Record<string, WriteTensor> = {};
  let linears = 0, nnz = 0, total = 0;
  let partial: PartialStore;
  try {
    partial = PartialStore.open(path.join(o.out, PARTIAL_DIR), runFingerprint(dir, o, outShare, sensShare), o.resume !== false, o.onRestart);
  } catch (e) {
    ck.close();
    fisher?.close();
    throw e;
  }
  // q, k, v share one input and so one factor; a factor is dropped after the last linear that reads
  // it, so only the current layer's factors (and the f32 copies the refit makes of them) stay alive.
  const factors = new Map<Float64Array, GptqFactor>();
  const usesLeft = new Map<Float64Array, number>();
  try {
    const names = ck.names();
    // (source tensor, prefix of the quantized tensors written)
    const jobs: Array<[string, string]> = names.filter((n) => n.endsWith('.weight') && LINEARS.some((l) => n.endsWith(`${l}.weight`)))
      .map((n) => [n, n.slice(0, -'.weight'.length)]);
    if (o.lmHead) {
      const tiedHead = lmHeadTied(cfg.tie_word_embeddings === true, names.includes('lm_head.weight'));  // as the loader ties
      const src = tiedHead ? 'model.embed_tokens.weight' : 'lm_head.weight';
      if (!names.includes(src)) throw new SqueezeError('ERR_FORMAT', `${ck.describe()}: --lm-head: no tensor '${src}'`);
      if (ck.entry(src).shape.length !== 2) throw new SqueezeError('ERR_FORMAT', `${ck.describe()}: tensor '${src}' is not a matrix`);
      jobs.push([src, 'lm_head']);
      if (tiedHead) cfg.tie_word_embeddings = false;  // the embeddings stay dense, the head is quantized
    }
    // Not copied: every quantized source but the embeddings (still read for the row lookup), and with
    // --lm-head a stored lm_head.weight (a tied checkpoint's copy too).
    const quantized = new Set(jobs.map(([n]) => n).filter((n) => n !== 'model.embed_tokens.weight'));
    if (o.lmHead) quantized.add('lm_head.weight');
    for (const [, prefix] of jobs) {
      const h = o.rtn ? undefined : o.cov?.get(prefix);
      if (h) usesLeft.set(h, (usesLeft.get(h) ?? 0) + 1);
    }
    for (const name of names) {
      if (quantized.has(name)) continue;
      const r = ck.read(name);
      tensors[name] = { dtype: r.dtype, shape: r.shape, data: r.data };
    }
    for (const [name, prefix] of jobs) {
      const [N, K] = ck.entry(name).shape;
      const h = o.rtn ? undefined : o.cov?.get(prefix);
      const dropFactor = (): void => {  // after the last linear that reads this input
        if (!h) return;
        const left = usesLeft.get(h)! - 1;
        usesLeft.set(h, left);
        if (left === 0) factors.delete(h);
      };
      const kept = partial.read(prefix);
      if (kept) {
        Object.assign(tensors, kept.tensors);
        dropFactor();
        linears++;
        nnz += kept.nnz;
        total += N * K;
        o.onProgress?.(linears, jobs.length, prefix, true);
        continue;
      }
      const r = ck.read(name);
      const w = floatsOf(name, r);
      let sens: Float32Array | undefined;
      const fisherName = `${prefix}.weight`;  // the lm_head's Fisher is lm_head.weight's, tied or not
      if (fisher && fisher.has(fisherName)) sens = fisher.readFloat32(fisherName);
      else if (o.calib?.has(prefix)) sens = o.calib.get(prefix);
      let gptq: GptqFactor | undefined;
      if (h) {
        gptq = factors.get(h) ?? (await gptqFactorNative(h, K, o.damp ?? 0.01));
        factors.set(h, gptq);
      }
      const l = o.rtn ? rtnQuantize(w, N, K, bits)
        : await quantizeLinear(w, N, K, {
          bits, outliers: outShare, sensitive: sens ? sensShare : 0, sens, gptq, gptqRounds: o.gptqRounds, outlierScore: o.outlierScore,
          iters: o.iters, device: o.device,
        });
      dropFactor();
      const t = squeezeTensors(prefix, l);
      partial.write(prefix, t);
      Object.assign(tensors, t);
      linears++;
      nnz += l.cols?.length ?? 0;
      total += N * K;
      o.onProgress?.(linears, jobs.length, prefix, false);
    }
  } finally {
    ck.close();
    fisher?.close();
  }
  fs.mkdirSync(o.out, { recursive: true });
  writeSafetensors(path.join(o.out, 'model.safetensors'), tensors, squeezeMetadata({
    bits, lut_dtype: 'f16', outlier_dtype: 'f16', outlier_share: total ? nnz / total : 0, source: path.basename(path.resolve(dir)),
  }));
  cfg.quantization_config = {
    quant_method: o.rtn ? 'rtn' : 'squeezellm', bits, outlier_share: total ? nnz / total : 0, dense_outliers: outShare,
    sensitive_outliers: fisher || o.calib ? sensShare : 0,
    sensitive_score: fisher || o.calib ? o.outlierScore ?? 'weight' : 'none',
    error_compensation: o.cov && !o.rtn ? 'gptq_refit' : 'none',
    ...(o.cov && !o.rtn ? { damp: o.damp ?? 0.01, gptq_rounds: o.gptqRounds ?? 3 } : {}),
    sensitivity: o.rtn ? 'none' : fisher ? 'fisher' : o.calib ? 'activations' : 'uniform',
    lm_head: !!o.lmHead,
  };
  fs.writeFileSync(path.join(o.out, 'config.json'), JSON.stringify(cfg, null, 2));
  for (const f of fs.readdirSync(dir))
    if (/^(tokenizer.*|special_tokens_map\.json|generation_config\.json|.*\.model)$/.test(f))
      fs.copyFileSync(path.join(dir, f), path.join(o.out, f));
  partial.remove();  // the model is complete
  return { linears, outliers: nnz };
}

/**
 * What decides a quantization's result: the source checkpoint (file names, sizes and modification
 * times), every setting, and digests of the Fisher file and of the calibration statistics handed in.
 * A run resumes an interrupted one only when this is the same.
 */
function runFingerprint(dir: string, o: QuantizeModelOptions, outShare: number, sensShare: number): string {
  const stamp = (f: string): unknown => {
    const st = fs.statSync(f);
    return [path.basename(f), st.size, Math.round(st.mtimeMs)];
  };
  const source = fs.readdirSync(dir).filter((f) => /\.safetensors$|^config\.json$|\.index\.json$/.test(f)).sort()
    .map((f) => stamp(path.join(dir, f)));
  const digest = (m?: Map<string, Float32Array | Float64Array>): string | null => {
    if (!m) return null;
    const h = crypto.createHash('sha256');
    for (const k of [...m.keys()].sort()) {
      const a = m.get(k)!;
      h.update(k).update(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
    }
    return h.digest('hex');
  };
  return JSON.stringify({
    format: 1, source: path.resolve(dir), files: source, bits: o.bits, outliers: outShare, sensitive: sensShare,
    fisher: o.fisher ? [path.resolve(o.fisher), stamp(o.fisher)] : null, calib: digest(o.calib), cov: digest(o.cov),
    damp: o.damp ?? 0.01, gptqRounds: o.gptqRounds ?? 3, outlierScore: o.outlierScore ?? 'weight', rtn: !!o.rtn, iters: o.iters ?? null,
    lmHead: !!o.lmHead,
  });
}

/**
 * The finished linears of a run in progress: one safetensors file per linear beside a manifest
 * holding the run's fingerprint, each written to a temporary name and renamed, so an interrupted
 * write leaves no file that reads as finished.
 */
class PartialStore {
  private constructor(private readonly dir: string, private readonly done: Set<string>) {}

  static open(dir: string, fingerprint: string, resume: boolean, onRestart?: (reason: string) => void): PartialStore {
    const manifest = path.join(dir, 'manifest.json');
    const done = new Set<string>();
    if (fs.existsSync(manifest)) {
      const same = resume && fs.readFileSync(manifest, 'utf8') === fingerprint;
      if (same) {
        for (const f of fs.readdirSync(dir)) if (f.endsWith('.safetensors')) done.add(f.slice(0, -'.safetensors'.length));
      } else {
        onRestart?.(resume ? 'the source or the settings differ from the interrupted run' : 'resume is off');
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }
    fs.mkdirSync(dir, { recursive: true });
    if (done.size === 0) writeAtomic(manifest, fingerprint);
    return new PartialStore(dir, done);
  }

  /** The tensors of a linear an earlier run finished, or undefined. */
  read(prefix: string): { tensors: Record<string, WriteTensor>; nnz: number } | undefined {
    if (!this.done.has(prefix)) return undefined;
    const f = SafetensorsFile.open(path.join(this.dir, `${prefix}.safetensors`));
    try {
      const tensors: Record<string, WriteTensor> = {};
      for (const n of f.names()) {
        if (!n.startsWith(`${prefix}.`)) throw new SqueezeError('ERR_FORMAT', `${PARTIAL_DIR}/${prefix}.safetensors holds '${n}'`);
        tensors[n] = f.read(n);
      }
      if (!tensors[`${prefix}.qweight`]) throw new SqueezeError('ERR_FORMAT', `${PARTIAL_DIR}/${prefix}.safetensors has no qweight`);
      const cols = tensors[`${prefix}.cols`];
      return { tensors, nnz: cols ? cols.shape[0] : 0 };
    } finally {
      f.close();
    }
  }

  write(prefix: string, tensors: Record<string, WriteTensor>): void {
    const file = path.join(this.dir, `${prefix}.safetensors`);
    writeSafetensors(`${file}.tmp`, tensors);
    fs.renameSync(`${file}.tmp`, file);
  }

  remove(): void {
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

function writeAtomic(file: string, text: string): void {
  fs.writeFileSync(`${file}.tmp`, text);
  fs.renameSync(`${file}.tmp`, file);
}

/**
 * `squeezelm quantize (--model DIR | DIR) --out DIR [--bits 3|4] [--outliers PCT] [--sensitive PCT]
 * [--calib FILE [--calib-windows N] [--calib-window L] [--calib-power P]] [--gptq [--gptq-rounds R] [--damp D]]
 * [--outlier-score weight|error] [--fisher FILE] [--rtn] [--lm-head] [--device cpu|cuda] [--no-resume]`. Outlier
 * shares are percentages of each matrix (0.45 = 0.45%); --calib gathers the activation sensitivity
 * (every window of FILE unless --calib-windows; FILE is ids or text, read as ppl reads it, windows of
 * --calib-window tokens), --gptq also E[x xᵀ] for error compensation; --lm-head quantizes the lm_head
 * too (kept as stored otherwise). An
 * interrupted run is resumed from the linears it finished (same model and settings) unless --no-resume.
 */
export async function quantizeCommand(argv: string[]): Promise<void> {
  const pos: string[] = [];
  const opt: Record<string, string> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--rtn' || a === '--gptq' || a === '--no-resume' || a === '--lm-head') opt[a.slice(2)] = '1';
    else if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      if (eq > 0) opt[a.slice(2, eq)] = a.slice(eq + 1);
      else opt[a.slice(2)] = argv[++i] ?? '';
    } else pos.push(a);
  }
  if (opt.model !== undefined) pos.push(opt.model);
  if (pos.length !== 1 || !opt.out)
    throw new SqueezeError('ERR_ARG', 'usage: squeezelm quantize --model DIR --out DIR [--bits 3|4] [--outliers pct] [--sensitive pct] [--calib file [--calib-windows n] [--calib-window l] [--calib-power p]] [--gptq [--gptq-rounds r] [--damp d]] [--outlier-score weight|error] [--fisher file] [--rtn] [--lm-head] [--device cpu|cuda] [--no-resume]');
  const known = ['model', 'out', 'bits', 'outliers', 'sensitive', 'calib', 'calib-windows', 'calib-window', 'calib-power', 'gptq',
    'gptq-rounds', 'damp', 'outlier-score', 'fisher', 'rtn', 'iters', 'device', 'no-resume', 'lm-head'];
  for (const k of Object.keys(opt)) if (!known.includes(k)) throw new SqueezeError('ERR_ARG', `quantize: unknown option --${k}`);
  const num = (k: string, d: number) => {
    if (opt[k] === undefined) return d;
    const v = Number(opt[k]);
    if (!Number.isFinite(v) || v < 0) throw new SqueezeError('ERR_ARG', `--${k}: expected a number, got '${opt[k]}'`);
    return v;
  };
  const score = (opt['outlier-score'] ?? 'weight') as 'weight' | 'error';
  if (score !== 'weight' && score !== 'error') throw new SqueezeError('ERR_ARG', `--outlier-score: expected weight or error, got '${score}'`);
  const t0 = Date.now();
  let calib: Map<string, Float32Array> | undefined, cov: Map<string, Float64Array> | undefined;
  if (opt.calib) {
    const { activationStats } = await import('./calib');
    if (opt.gptq === '1') cov = new Map();
    const cw = num('calib-windows', 0), cl = num('calib-window', 0);
    if (cl !== 0 && !Number.isInteger(cl)) throw new SqueezeError('ERR_ARG', `--calib-window: expected a whole number of tokens, got '${opt['calib-window']}'`);
    calib = await activationStats(pos[0], opt.calib, cw > 0 ? Math.floor(cw) : undefined, num('calib-power', 1), cov, cl > 0 ? cl : undefined);
  } else if (opt.gptq === '1') {
    throw new SqueezeError('ERR_ARG', '--gptq needs --calib FILE (the calibration activations)');
  }
  const r = await quantizeModel(pos[0], {
    bits: num('bits', 4), outliers: num('outliers', 0.45) / 100, sensitive: num('sensitive', 0.05) / 100,
    fisher: opt.fisher, calib, cov, damp: num('damp', 0.01), gptqRounds: Math.floor(num('gptq-rounds', 3)),
    outlierScore: score, rtn: opt.rtn === '1', lmHead: opt['lm-head'] === '1', out: opt.out, iters: num('iters', 30), device: opt.device,
    resume: opt['no-resume'] !== '1',
    onRestart: (why) => process.stderr.write(`quantize: starting over (${why})\n`),
    onProgress: progressBar(Date.now()),
  });
  process.stderr.write(`\nquantized ${r.linears} linears (${r.outliers} outliers) in ${((Date.now() - t0) / 1000).toFixed(1)} s -> ${opt.out}\n`);
}

/**
 * A one-line progress bar on stderr: linears done, elapsed time, and the time left estimated from
 * the linears quantized in this run (those taken from an interrupted run cost nothing).
 */
function progressBar(t0: number): (done: number, total: number, name: string, resumed: boolean) => void {
  let resumed = 0;
  const fmt = (s: number): string => (s >= 90 ? `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s` : `${s.toFixed(0)}s`);
  return (done, total, name, fromEarlier) => {
    if (fromEarlier) resumed++;
    const width = 24, fill = Math.round((width * done) / total);
    const elapsed = (Date.now() - t0) / 1000, ran = done - resumed;
    const left = ran > 0 ? (elapsed / ran) * (total - done) : NaN;
    const eta = Number.isFinite(left) ? ` ~${fmt(left)} left` : '';
    const note = resumed ? ` (${resumed} from the interrupted run)` : '';
    process.stderr.write(`\r[${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${done}/${total} ${fmt(elapsed)}${eta}${note} ${name}`.padEnd(110));
  };
}

// ---------------------------------------------------------------- decoder hooks

/** Stacks linears of one input size along the output dim (e.g. gate then up: one fused matmul). */
export function concatSqueezeLinears(ls: SqueezeLinear[]): SqueezeLinear {
  if (ls.length === 1) return ls[0];
  const { K, bits } = ls[0], E = 1 << bits;
  if (ls.some((l) => l.K !== K || l.bits !== bits))
    throw new SqueezeError('ERR_FORMAT', 'squeezellm: fused linears must share input size and bits');
  const N = ls.reduce((a, l) => a + l.N, 0), R = Math.ceil(K / 32) * bits;
  const qweight = new Int32Array(R * N), lut = new Float32Array(N * E);
  const sparse = ls.some((l) => l.rows);
  const nnz = ls.reduce((a, l) => a + (l.cols?.length ?? 0), 0);
  const rows = sparse ? new Int32Array(N + 1) : undefined, cols = sparse ? new Int32Array(nnz) : undefined;
  const vals = sparse ? new Float32Array(nnz) : undefined;
  let n0 = 0, j0 = 0;
  for (const l of ls) {
    for (let r = 0; r < R; r++) qweight.set(l.qweight.subarray(r * l.N, (r + 1) * l.N), r * N + n0);
    lut.set(l.lut, n0 * E);
    if (sparse) {
      for (let n = 0; n < l.N; n++) rows![n0 + n + 1] = j0 + (l.rows ? l.rows[n + 1] : 0);
      if (l.cols) { cols!.set(l.cols, j0); vals!.set(l.vals!, j0); j0 += l.cols.length; }
    }
    n0 += l.N;
  }
  return { N, K, bits, qweight, lut, rows, cols, vals };
}

/**
 * Whether the linears `prefixes` (one fused group, such as q|k|v) are quantized: every one has
 * `<prefix>.qweight` (true) or none (false); only some is ERR_FORMAT naming the group (`where`: the
 * file, for the message).
 */
export function groupQuantized(reader: Pick<TensorReader, 'has'>, prefixes: string[], where = 'squeezellm'): boolean {
  const q = prefixes.filter((p) => reader.has(`${p}.qweight`));
  if (q.length > 0 && q.length < prefixes.length)
    throw new SqueezeError('ERR_FORMAT', `${where}: ${prefixes.join(' + ')} are fused, but only ${q.join(', ')} ${q.length > 1 ? 'are' : 'is'} quantized`);
  return q.length > 0;
}

/**
 * The loader hook for a decoder's linear (or a fused group such as gate+up): undefined when the
 * checkpoint holds dense `<prefix>.weight`s, the quantized module when every prefix has
 * `<prefix>.qweight` (ERR_FORMAT when only some do). `inFeatures` is the input size from the config.
 */
export function loadQuantizedLinear(reader: TensorReader, prefixes: string[], inFeatures: number, device: string,
  dtype?: DType, opts: UploadOptions = {}): SqueezeLinearModule | undefined {
  if (!groupQuantized(reader, prefixes)) return undefined;
  return uploadSqueezeLinear(concatSqueezeLinears(prefixes.map((p) => readSqueezeLinear(reader, p, inFeatures))), device, dtype, opts);
}

/** y = x · Wᵀ (+ bias) for a dense weight tensor or a quantized module. */
export function linearForward(y: Tensor, x: Tensor, w: Tensor | SqueezeLinearModule, bias?: Tensor): void {
  if (w instanceof Tensor) {
    matmul(y, x, w, bias);
    return;
  }
  w.forward(y, x);
  // The LUT kernels have no bias epilogue; the bias (one row) is added to every row after them.
  if (bias) add(y, y, bias);
}
