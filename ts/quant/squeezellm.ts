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
import * as fs from 'fs';
import * as path from 'path';
import { SqueezeError } from '../errors';
import { DType, Tensor } from '../tensor';
import { checkOutlierCsr, kmeansRows, lutMatmulPacked, lutPackedShape, lutRepack, sortOutlierRows } from '../ops/lut';
import { matmul } from '../ops/gemm';
import { Checkpoint, SafetensorsFile, WriteTensor, writeSafetensors } from '../model/safetensors';
import { float32ToF16Bits, f16BitsToFloat32, bf16BitsToFloat32 } from '../util/half';
import { GptqFactor, gptqFactor, gptqRefit } from './gptq';

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
  const groups = Math.ceil(K / 32);
  const q = new Int32Array(groups * b * N);
  for (let n = 0; n < N; n++) {
    for (let g = 0; g < groups; g++) {
      for (let i = 0; i < 32; i++) {
        const k = g * 32 + i;
        const c = k < K ? codes[n * K + k] : 0;
        if (c >>> b) throw new SqueezeError('ERR_ARG', `packCodes: code ${c} at [${n}, ${k}] does not fit ${b} bits`);
        const bit = i * b, word = bit >>> 5, off = bit & 31;
        q[(g * b + word) * N + n] |= c << off;
        if (off + b > 32) q[(g * b + word + 1) * N + n] |= c >>> (32 - off);
      }
    }
  }
  return q;
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
}

/** Threshold t such that about `share` of |values| exceed it (estimated on a strided sample). */
function topThreshold(n: number, value: (i: number) => number, share: number): number {
  if (share <= 0 || n === 0) return Infinity;
  const step = Math.max(1, Math.floor(n / 2_000_000));
  const sample = new Float32Array(Math.ceil(n / step));
  for (let i = 0, j = 0; i < n; i += step, j++) sample[j] = value(i);
  sample.sort();
  const idx = Math.min(sample.length - 1, Math.max(0, Math.floor(sample.length * (1 - share))));
  return sample[idx];
}

/** Quantizes one weight matrix w [N,K] (row n = output channel n). */
export async function quantizeLinear(w: Float32Array, N: number, K: number, o: QuantizeOptions): Promise<SqueezeLinear> {
  const bits = checkBits(o.bits), E = 1 << bits;
  if (w.length !== N * K) throw new SqueezeError('ERR_SHAPE', `quantizeLinear: weight has ${w.length} elements, expected ${N}x${K}`);
  const sens = o.sens;
  if (sens && sens.length !== K && sens.length !== N * K)
    throw new SqueezeError('ERR_SHAPE', `quantizeLinear: sensitivity has ${sens.length} elements, expected ${K} or ${N * K}`);
  const sAt = (i: number): number => (!sens ? 1 : sens.length === K ? sens[i % K] : sens[i]);
  // Magnitude outliers: |w| above a per-matrix threshold; sensitive: top saliency sens * w^2, or
  // with outlierScore 'error' the top sens * (w - q)^2 of a first dense-only fit.
  const byError = o.outlierScore === 'error' && (o.sensitive ?? 0) > 0;
  const tMag = topThreshold(N * K, (i) => Math.abs(w[i]), o.outliers ?? 0);
  const tSens = sens && !byError ? topThreshold(N * K, (i) => sAt(i) * w[i] * w[i], o.sensitive ?? 0) : Infinity;
  const isOut = new Uint8Array(N * K);
  for (let i = 0; i < N * K; i++)
    if (Math.abs(w[i]) > tMag || (sens !== undefined && sAt(i) * w[i] * w[i] > tSens)) isOut[i] = 1;
  let fit = await denseFit(w, N, K, E, isOut, sAt, o);
  if (byError) {
    const q = fit.q;
    const tErr = topThreshold(N * K, (i) => (isOut[i] ? 0 : sAt(i) * (w[i] - q[i]) * (w[i] - q[i])), o.sensitive ?? 0);
    for (let i = 0; i < N * K; i++) if (!isOut[i] && sAt(i) * (w[i] - q[i]) * (w[i] - q[i]) > tErr) isOut[i] = 1;
    fit = await denseFit(w, N, K, E, isOut, sAt, o);
  }
  const { lut, codes, q } = fit;
  let nnz = 0;
  for (let i = 0; i < N * K; i++) nnz += isOut[i];
  let rows: Int32Array | undefined, cols: Int32Array | undefined, vals: Float32Array | undefined;
  if (nnz > 0) {
    rows = new Int32Array(N + 1);
    cols = new Int32Array(nnz);
    vals = new Float32Array(nnz);
    let j = 0;
    for (let n = 0; n < N; n++) {
      let z = 0; // the centroid nearest zero
      for (let e = 1; e < E; e++) if (Math.abs(lut[n * E + e]) < Math.abs(lut[n * E + z])) z = e;
      for (let k = 0; k < K; k++) {
        const i = n * K + k;
        if (!isOut[i]) continue;
        codes[i] = z;
        cols[j] = k;
        vals[j] = q[i] - lut[n * E + z];
        j++;
      }
      rows[n + 1] = j;
    }
  }
  return { N, K, bits, qweight: packCodes(codes, N, K, bits), lut, rows, cols, vals };
}

/**
 * The dense part for a given outlier mask: weighted k-means (outliers weigh 0), then with o.gptq
 * error compensation with table refits. q: what every weight stands for (its centroid; outliers
 * their exact value, compensated with o.gptq).
 */
async function denseFit(w: Float32Array, N: number, K: number, E: number, isOut: Uint8Array,
  sAt: (i: number) => number, o: QuantizeOptions): Promise<{ lut: Float32Array; codes: Uint8Array; q: Float32Array }> {
  const weight = new Float32Array(N * K);
  for (let i = 0; i < N * K; i++) weight[i] = isOut[i] ? 0 : Math.max(0, sAt(i));
  const device = o.device ?? 'cpu';
  const tw = Tensor.from(w, [N, K], { device }), ts = Tensor.from(weight, [N, K], { device });
  const tl = Tensor.empty([N, E], { dtype: 'f32', device }), tc = Tensor.empty([N, K], { dtype: 'u8', device });
  let lut: Float32Array, codes: Uint8Array;
  try {
    kmeansRows(tl, tc, tw, ts, o.iters ?? 30);
    lut = (await tl.toArray()) as Float32Array;
    codes = (await tc.toArray()) as Uint8Array;
  } finally {
    [tw, ts, tl, tc].forEach((t) => t.dispose());
  }
  if (o.gptq) return gptqRefit(w, N, K, codes, lut, E, isOut, o.gptq, o.gptqRounds ?? 3);
  const q = new Float32Array(N * K);
  for (let i = 0; i < N * K; i++) q[i] = isOut[i] ? w[i] : lut[Math.floor(i / K) * E + codes[i]];
  return { lut, codes, q };
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
  const out: SqueezeLinear = { N, K, bits: bits as Bits, qweight: q.data as Int32Array, lut: floatsOf(ln, l) };
  const rn = `${prefix}.rows`, cn = `${prefix}.cols`, vn = `${prefix}.vals`;
  const present = [rn, cn, vn].filter((n) => reader.has(n)).length;
  if (present !== 0 && present !== 3) throw new SqueezeError('ERR_FORMAT', `${prefix}: rows, cols and vals must come together`);
  if (present === 3) {
    const r = reader.read(rn), c = reader.read(cn), v = reader.read(vn);
    if (r.dtype !== 'I32' || c.dtype !== 'I32') throw new SqueezeError('ERR_FORMAT', `${rn}/${cn}: expected I32`);
    const rows = r.data as Int32Array;
    let cols = c.data as Int32Array, vals = floatsOf(vn, v);
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

/** A quantized linear on a device: forward(y[M,N], x[M,K]) replaces a dense matmul. */
export interface SqueezeLinearModule {
  readonly N: number;
  readonly K: number;
  readonly bits: Bits;
  readonly bytes: number;
  forward(y: Tensor, x: Tensor): void;
  dispose(): void;
}

/**
 * Uploads host arrays of a linear to `device` and repacks the codes once into the kernel layout
 * (lutRepack); tables and outliers in f16 on CUDA (f32 on CPU).
 */
export function uploadSqueezeLinear(l: SqueezeLinear, device: string, dtype?: DType): SqueezeLinearModule {
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
  const lut = Tensor.from(fl(l.lut), [l.N, E], { dtype: fd, device });
  const has = !!(l.rows && l.cols && l.vals);
  const rows = has ? Tensor.from(l.rows!, [l.N + 1], { dtype: 'i32', device }) : undefined;
  const cols = has ? Tensor.from(l.cols!, [l.cols!.length], { dtype: 'i32', device }) : undefined;
  const vals = has ? Tensor.from(fl(l.vals!), [l.vals!.length], { dtype: fd, device }) : undefined;
  const all = [q, lut, rows, cols, vals].filter((t): t is Tensor => !!t);
  return {
    N: l.N, K: l.K, bits: l.bits,
    bytes: all.reduce((s, t) => s + t.byteLength, 0),
    forward(y: Tensor, x: Tensor): void {
      if (x.shape.length !== 2 || x.shape[1] !== l.K)
        throw new SqueezeError('ERR_SHAPE', `squeezellm linear: x is [${x.shape}], expected [M, ${l.K}]`);
      lutMatmulPacked(y, x, q, lut, rows, cols, vals, l.bits);
    },
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
  out: string;
  /** Round-to-nearest uniform grid per row instead of k-means (a baseline; no outliers). */
  rtn?: boolean;
  iters?: number;
  /** Where k-means runs: 'cpu' (default) or 'cuda' / 'cuda:N'. */
  device?: string;
  onProgress?: (done: number, total: number, name: string) => void;
}

const LINEARS = ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj',
  'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'];

/**
 * Quantizes every q/k/v/o/gate/up/down linear of a Hugging Face folder and writes a complete
 * model folder (embeddings, norms and lm_head as stored; tokenizer files copied). Without
 * `fisher` or `calib`, k-means weights are uniform (no sensitivity outliers).
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
  const factors = new Map<Float64Array, GptqFactor>(); // q, k, v share one input
  try {
    const names = ck.names();
    const targets = names.filter((n) => n.endsWith('.weight') && LINEARS.some((l) => n.endsWith(`${l}.weight`)));
    for (const name of names) {
      const prefix = name.slice(0, -'.weight'.length);
      if (!targets.includes(name)) {
        const r = ck.read(name);
        tensors[name] = { dtype: r.dtype, shape: r.shape, data: r.data };
        continue;
      }
      const r = ck.read(name);
      const [N, K] = r.shape;
      const w = floatsOf(name, r);
      let sens: Float32Array | undefined;
      if (fisher && fisher.has(name)) sens = fisher.readFloat32(name);
      else if (o.calib?.has(prefix)) sens = o.calib.get(prefix);
      let gptq: GptqFactor | undefined;
      const h = o.rtn ? undefined : o.cov?.get(prefix);
      if (h) {
        gptq = factors.get(h) ?? gptqFactor(h, K, o.damp ?? 0.01);
        factors.set(h, gptq);
      }
      const l = o.rtn ? rtnQuantize(w, N, K, bits)
        : await quantizeLinear(w, N, K, {
          bits, outliers: outShare, sensitive: sens ? sensShare : 0, sens, gptq, gptqRounds: o.gptqRounds, outlierScore: o.outlierScore,
          iters: o.iters, device: o.device,
        });
      Object.assign(tensors, squeezeTensors(prefix, l));
      linears++;
      nnz += l.cols?.length ?? 0;
      total += N * K;
      o.onProgress?.(linears, targets.length, prefix);
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
  };
  fs.writeFileSync(path.join(o.out, 'config.json'), JSON.stringify(cfg, null, 2));
  for (const f of fs.readdirSync(dir))
    if (/^(tokenizer.*|special_tokens_map\.json|generation_config\.json|.*\.model)$/.test(f))
      fs.copyFileSync(path.join(dir, f), path.join(o.out, f));
  return { linears, outliers: nnz };
}

/**
 * `squeezelm quantize (--model DIR | DIR) --out DIR [--bits 3|4] [--outliers PCT] [--sensitive PCT]
 * [--calib FILE [--calib-windows N] [--calib-power P]] [--gptq [--gptq-rounds R] [--damp D]]
 * [--outlier-score weight|error] [--fisher FILE] [--rtn] [--device cpu|cuda]`. Outlier shares
 * are percentages of each matrix (0.45 = 0.45%); --calib gathers the activation sensitivity
 * (every window of FILE unless --calib-windows), --gptq also E[x xᵀ] for error compensation.
 */
export async function quantizeCommand(argv: string[]): Promise<void> {
  const pos: string[] = [];
  const opt: Record<string, string> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--rtn' || a === '--gptq') opt[a.slice(2)] = '1';
    else if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      if (eq > 0) opt[a.slice(2, eq)] = a.slice(eq + 1);
      else opt[a.slice(2)] = argv[++i] ?? '';
    } else pos.push(a);
  }
  if (opt.model !== undefined) pos.push(opt.model);
  if (pos.length !== 1 || !opt.out)
    throw new SqueezeError('ERR_ARG', 'usage: squeezelm quantize --model DIR --out DIR [--bits 3|4] [--outliers pct] [--sensitive pct] [--calib file [--calib-windows n] [--calib-power p]] [--gptq [--gptq-rounds r] [--damp d]] [--outlier-score weight|error] [--fisher file] [--rtn] [--device cpu|cuda]');
  const known = ['model', 'out', 'bits', 'outliers', 'sensitive', 'calib', 'calib-windows', 'calib-power', 'gptq',
    'gptq-rounds', 'damp', 'outlier-score', 'fisher', 'rtn', 'iters', 'device'];
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
    const cw = num('calib-windows', 0);
    calib = await activationStats(pos[0], opt.calib, cw > 0 ? Math.floor(cw) : undefined, num('calib-power', 1), cov);
  } else if (opt.gptq === '1') {
    throw new SqueezeError('ERR_ARG', '--gptq needs --calib FILE (the calibration activations)');
  }
  const r = await quantizeModel(pos[0], {
    bits: num('bits', 4), outliers: num('outliers', 0.45) / 100, sensitive: num('sensitive', 0.05) / 100,
    fisher: opt.fisher, calib, cov, damp: num('damp', 0.01), gptqRounds: Math.floor(num('gptq-rounds', 3)),
    outlierScore: score, rtn: opt.rtn === '1', out: opt.out, iters: num('iters', 30), device: opt.device,
    onProgress: (d, t, n) => process.stderr.write(`\r[${d}/${t}] ${n}`.padEnd(60)),
  });
  process.stderr.write(`\nquantized ${r.linears} linears (${r.outliers} outliers) in ${((Date.now() - t0) / 1000).toFixed(1)} s -> ${opt.out}\n`);
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
 * The loader hook for a decoder's linear (or a fused group such as gate+up): undefined when the
 * checkpoint holds dense `<prefix>.weight`s, the quantized module when every prefix has
 * `<prefix>.qweight` (ERR_FORMAT when only some do). `inFeatures` is the input size from the config.
 */
export function loadQuantizedLinear(reader: TensorReader, prefixes: string[], inFeatures: number, device: string,
  dtype?: DType): SqueezeLinearModule | undefined {
  const q = prefixes.filter((p) => reader.has(`${p}.qweight`));
  if (q.length === 0) return undefined;
  if (q.length !== prefixes.length)
    throw new SqueezeError('ERR_FORMAT', `squeezellm: ${prefixes.join(' + ')} are fused, but only ${q.join(', ')} are quantized`);
  return uploadSqueezeLinear(concatSqueezeLinears(prefixes.map((p) => readSqueezeLinear(reader, p, inFeatures))), device, dtype);
}

/** y = x · Wᵀ (+ bias) for a dense weight tensor or a quantized module. */
export function linearForward(y: Tensor, x: Tensor, w: Tensor | SqueezeLinearModule, bias?: Tensor): void {
  if (w instanceof Tensor) {
    matmul(y, x, w, bias);
    return;
  }
  if (bias) throw new SqueezeError('ERR_UNSUPPORTED', 'squeezellm: biases on quantized linears are not supported yet');
  w.forward(y, x);
}
