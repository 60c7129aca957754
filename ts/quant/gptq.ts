/**
 * Error compensation for the SqueezeLLM quantizer, after GPTQ (Frantar et al., 2023) and
 * GPTVQ (van Baalen et al., 2024), using the calibration second moment H = E[x xᵀ] of a
 * linear's input. The output error of a weight row error d is dᵀ H d; plain weighted k-means
 * only sees diag(H). Per row, with the non-uniform table of that row:
 *
 * 1. code the columns in order (largest H_kk first: "act order"; free here because every row
 *    has one table for all its columns), each to its nearest centroid, and spread the error of
 *    each column over the columns not yet coded through the upper Cholesky factor of H⁻¹;
 * 2. refit the table to those codes: the least-squares centroids under H,
 *    t = (Aᵀ H A)⁻¹ Aᵀ H (w − outliers) with A the one-hot code matrix (an E×E solve per row);
 * 3. set each outlier (kept exact in the sparse part) to the value that best absorbs the
 *    remaining error of the dense part: d_S = −H_SS⁻¹ H_S,rest d_rest;
 *
 * and repeat 1-3 a few rounds, keeping the state with the smallest dᵀ H d.
 */
import { SqueezeError } from '../errors';
import { Tensor } from '../tensor';
import { gptqRefitRows } from '../ops/lut';
import { native } from '../native';

/** A damped, column-permuted second moment and the factor GPTQ needs. */
export interface GptqFactor {
  K: number;
  /** perm[i] = original column coded i-th (descending H_kk with act order, identity without). */
  perm: Int32Array;
  /** The damped H in permuted order [K,K]. */
  h: Float64Array;
  /** Upper U with H⁻¹ = Uᵀ U (permuted order) [K,K]. */
  u: Float64Array;
}

/** Lower Cholesky factor of a symmetric positive definite a [n,n] (row-major). */
export function cholesky(a: Float64Array, n: number): Float64Array {
  const l = new Float64Array(n * n);
  for (let i = 0; i < n; i++)
    for (let j = 0; j <= i; j++) {
      let s = a[i * n + j];
      const li = i * n, lj = j * n;
      for (let k = 0; k < j; k++) s -= l[li + k] * l[lj + k];
      l[i * n + j] = i === j ? Math.sqrt(Math.max(s, 1e-300)) : s / l[j * n + j];
    }
  return l;
}

/**
 * Damps H [K,K] (`damp` x the mean diagonal on the diagonal; dead channels get a unit diagonal),
 * orders the columns (act order: descending H_kk) and factors H⁻¹ = Uᵀ U with U upper.
 */
export function gptqFactor(h: Float64Array, K: number, damp = 0.01, actOrder = true): GptqFactor {
  if (h.length !== K * K) throw new SqueezeError('ERR_SHAPE', `gptqFactor: H has ${h.length} elements, expected ${K}x${K}`);
  if (!(damp >= 0)) throw new SqueezeError('ERR_ARG', `gptqFactor: damp must be >= 0, got ${damp}`);
  const diag = new Float64Array(K);
  let mean = 0;
  for (let k = 0; k < K; k++) mean += (diag[k] = h[k * K + k]);
  mean = mean / K || 1;
  const perm = Int32Array.from({ length: K }, (_, i) => i);
  if (actOrder) perm.sort((a, b) => diag[b] - diag[a] || a - b);
  const a = new Float64Array(K * K);
  for (let i = 0; i < K; i++)
    for (let j = 0; j < K; j++) a[i * K + j] = h[perm[i] * K + perm[j]];
  for (let k = 0; k < K; k++) {
    if (!(a[k * K + k] > 0)) {
      for (let j = 0; j < K; j++) a[k * K + j] = a[j * K + k] = 0;
      a[k * K + k] = mean;
    }
    a[k * K + k] += damp * mean;
  }
  const l = cholesky(a, K);
  // inv(L) (lower), stored transposed (ct row j = column j of inv(L)), then H⁻¹ = inv(L)ᵀ inv(L):
  // every inner loop runs over contiguous memory.
  const ct = new Float64Array(K * K);
  for (let j = 0; j < K; j++) {
    const c = j * K;
    ct[c + j] = 1 / l[j * K + j];
    for (let i = j + 1; i < K; i++) {
      let s = 0;
      const li = i * K;
      for (let k = j; k < i; k++) s -= l[li + k] * ct[c + k];
      ct[c + i] = s / l[li + i];
    }
  }
  const hinv = new Float64Array(K * K);
  for (let i = 0; i < K; i++)
    for (let j = 0; j <= i; j++) {
      let s = 0;
      const ci = i * K, cj = j * K;
      for (let k = i; k < K; k++) s += ct[ci + k] * ct[cj + k];
      hinv[i * K + j] = s;
      hinv[j * K + i] = s;
    }
  // GPTQ's factor: upper U with H⁻¹ = Uᵀ U (Uᵀ is the lower Cholesky factor of H⁻¹); row k of
  // U, divided by U_kk, carries column k's error onto the later columns.
  const lh = cholesky(hinv, K), r = new Float64Array(K * K);
  for (let i = 0; i < K; i++) for (let j = i; j < K; j++) r[i * K + j] = lh[j * K + i];
  return { K, perm, h: a, u: r };
}

/**
 * gptqFactor natively (csrc/cpu/gptq.cc gptq_factor), on a worker thread with all cores: the same
 * permutation and damped H, and the same U up to rounding, from one reversed Cholesky of H and a
 * triangular inverse (a third of the reference's arithmetic, blocked). What the quantizer uses:
 * at K = 11008 the reference takes tens of minutes per matrix in JavaScript.
 */
export async function gptqFactorNative(h: Float64Array, K: number, damp = 0.01, actOrder = true): Promise<GptqFactor> {
  if (h.length !== K * K) throw new SqueezeError('ERR_SHAPE', `gptqFactor: H has ${h.length} elements, expected ${K}x${K}`);
  if (!(damp >= 0)) throw new SqueezeError('ERR_ARG', `gptqFactor: damp must be >= 0, got ${damp}`);
  const r = (await native().ops.gptqFactor(h, K, damp, actOrder)) as { perm: Int32Array; h: Float64Array; u: Float64Array };
  return { K, perm: r.perm, h: r.h, u: r.u };
}

/** sum over rows of dᵀ H d, d = w − q (rows of length K, H [K,K]). */
export function outputError(w: Float32Array | Float64Array, q: Float32Array | Float64Array, N: number, K: number,
  h: Float64Array): number {
  let s = 0;
  const d = new Float64Array(K);
  for (let n = 0; n < N; n++) {
    for (let k = 0; k < K; k++) d[k] = w[n * K + k] - q[n * K + k];
    s += quadForm(d, h, K);
  }
  return s;
}

function quadForm(d: Float64Array, h: Float64Array, K: number): number {
  let s = 0;
  for (let i = 0; i < K; i++) {
    const di = d[i];
    if (di === 0) continue;
    let t = 0;
    const o = i * K;
    for (let j = 0; j < K; j++) t += h[o + j] * d[j];
    s += di * t;
  }
  return s;
}

/** Solves a x = b in place (a [n,n] overwritten, partial pivoting); returns false when singular. */
function solve(a: Float64Array, b: Float64Array, n: number): boolean {
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(a[r * n + c]) > Math.abs(a[p * n + c])) p = r;
    if (!(Math.abs(a[p * n + c]) > 0)) return false;
    if (p !== c) {
      for (let j = 0; j < n; j++) { const t = a[c * n + j]; a[c * n + j] = a[p * n + j]; a[p * n + j] = t; }
      const t = b[c]; b[c] = b[p]; b[p] = t;
    }
    for (let r = c + 1; r < n; r++) {
      const f = a[r * n + c] / a[c * n + c];
      if (f === 0) continue;
      for (let j = c; j < n; j++) a[r * n + j] -= f * a[c * n + j];
      b[r] -= f * b[c];
    }
  }
  for (let c = n - 1; c >= 0; c--) {
    let s = b[c];
    for (let j = c + 1; j < n; j++) s -= a[c * n + j] * b[j];
    b[c] = s / a[c * n + c];
  }
  return true;
}

/** One row's state in permuted column order. */
interface RowState {
  codes: Uint8Array;
  t: Float64Array;
  /** The value of every column (dense value, or the exact outlier value). */
  q: Float64Array;
}

/**
 * GPTQ pass for one row (permuted order): codes each non-outlier column to its nearest centroid
 * of `t` with error feedback; outliers take their compensated value. Writes codes and q.
 */
function gptqRow(w: Float64Array, out: Uint8Array, t: Float64Array, E: number, u: Float64Array, K: number,
  s: RowState, work: Float64Array): void {
  work.set(w);
  for (let k = 0; k < K; k++) {
    const v = work[k];
    if (out[k]) { s.q[k] = v; continue; }
    let best = 0, bd = Math.abs(v - t[0]);
    for (let e = 1; e < E; e++) {
      const d = Math.abs(v - t[e]);
      if (d < bd) { bd = d; best = e; }
    }
    s.codes[k] = best;
    s.q[k] = t[best];
    const err = (v - t[best]) / u[k * K + k];
    if (err === 0) continue;
    const o = k * K;
    for (let j = k + 1; j < K; j++) work[j] -= err * u[o + j];
  }
}

/**
 * Least-squares table for fixed codes (outlier values fixed), then the best outlier values for
 * that table. Updates t and q of the row.
 */
function refitRow(w: Float64Array, out: Uint8Array, E: number, h: Float64Array, K: number, s: RowState,
  g: Float64Array, m: Float64Array, b: Float64Array, tmp: Float64Array): void {
  // r = w − q on outliers (a fixed residual), w on the dense columns; objective |r − A t|_H.
  const c = s.codes;
  m.fill(0);
  b.fill(0);
  let trace = 0;
  for (let k = 0; k < K; k++) {
    if (out[k]) continue;
    tmp.fill(0);
    let gk = 0;
    const o = k * K;
    for (let j = 0; j < K; j++) {
      const hv = h[o + j];
      if (out[j]) { gk += hv * (w[j] - s.q[j]); continue; }
      gk += hv * w[j];
      tmp[c[j]] += hv;
    }
    g[k] = gk;
    const ck = c[k];
    b[ck] += gk;
    for (let e = 0; e < E; e++) m[ck * E + e] += tmp[e];
    trace += h[o + k];
  }
  // A tiny ridge toward the current table keeps empty codes where they are.
  const lam = 1e-9 * (trace / K || 1);
  for (let e = 0; e < E; e++) { m[e * E + e] += lam; b[e] += lam * s.t[e]; }
  if (solve(m, b, E)) {
    for (let e = 0; e < E; e++) if (Number.isFinite(b[e])) s.t[e] = b[e];
    for (let k = 0; k < K; k++) if (!out[k]) s.q[k] = s.t[c[k]];
  }
  optimizeOutliers(w, out, h, K, s);
}

/** d_S = −H_SS⁻¹ H_S,rest d_rest: the outlier values that absorb the dense part's error. */
function optimizeOutliers(w: Float64Array, out: Uint8Array, h: Float64Array, K: number, s: RowState): void {
  const S: number[] = [];
  for (let k = 0; k < K; k++) if (out[k]) S.push(k);
  const n = S.length;
  if (!n) return;
  const a = new Float64Array(n * n), y = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const o = S[i] * K;
    let t = 0;
    for (let j = 0; j < K; j++) if (!out[j]) t += h[o + j] * (w[j] - s.q[j]);
    y[i] = -t;
    for (let j = 0; j < n; j++) a[i * n + j] = h[o + S[j]];
  }
  if (!solve(a, y, n)) return;
  for (let i = 0; i < n; i++) if (Number.isFinite(y[i])) s.q[S[i]] = w[S[i]] - y[i];
}

export interface GptqResult {
  codes: Uint8Array;
  lut: Float32Array;
  /** The weight each column stands for: the table value, or the exact outlier value. */
  q: Float32Array;
  /** sum dᵀ H d (damped H) before (k-means) and after. */
  errorBefore: number;
  errorAfter: number;
}

/**
 * Error compensation with table refits for one linear. w [N,K] (original order), k-means codes
 * u8 [N,K] and tables [N,E] as the start, outlier mask [N,K]; `rounds` GPTQ + refit rounds
 * (0: only the outlier values are optimized for the k-means tables). Never returns a state
 * worse (in dᵀ H d) than the k-means start.
 */
export async function gptqRefit(w: Float32Array, N: number, K: number, codes0: Uint8Array, lut0: Float32Array,
  E: number, isOut: Uint8Array, f: GptqFactor, rounds = 3): Promise<GptqResult> {
  checkArgs(w, N, K, codes0, lut0, E, isOut, f, rounds);
  const t = {
    lut: Tensor.from(lut0, [N, E]), codes: Tensor.from(codes0, [N, K], { dtype: 'u8' }), q: Tensor.empty([N, K]),
    err: Tensor.empty([N, 2]), w: Tensor.from(w, [N, K]), out: Tensor.from(isOut, [N, K], { dtype: 'u8' }),
    h: Tensor.from(f32Of(f).h, [K, K]), u: Tensor.from(f32Of(f).u, [K, K]),
  };
  try {
    gptqRefitRows(t.lut, t.codes, t.q, t.err, t.w, t.out, t.h, t.u, f.perm, rounds);
    const err = (await t.err.toArray()) as Float32Array;
    let errorBefore = 0, errorAfter = 0;
    for (let n = 0; n < N; n++) { errorBefore += err[2 * n]; errorAfter += err[2 * n + 1]; }
    return {
      codes: (await t.codes.toArray()) as Uint8Array, lut: (await t.lut.toArray()) as Float32Array,
      q: (await t.q.toArray()) as Float32Array, errorBefore, errorAfter,
    };
  } finally {
    Object.values(t).forEach((x) => x.dispose());
  }
}

// The f32 copies of a factor's h and u that the native refit reads, made once per factor (q, k and
// v share one, and the error-scored outlier choice refits twice).
const f32Cache = new WeakMap<GptqFactor, { h: Float32Array; u: Float32Array }>();
function f32Of(f: GptqFactor): { h: Float32Array; u: Float32Array } {
  let c = f32Cache.get(f);
  if (!c) f32Cache.set(f, (c = { h: Float32Array.from(f.h), u: Float32Array.from(f.u) }));
  return c;
}

function checkArgs(w: Float32Array, N: number, K: number, codes0: Uint8Array, lut0: Float32Array, E: number,
  isOut: Uint8Array, f: GptqFactor, rounds: number): void {
  if (f.K !== K) throw new SqueezeError('ERR_SHAPE', `gptqRefit: factor is for K = ${f.K}, weight has K = ${K}`);
  if (w.length !== N * K || codes0.length !== N * K || isOut.length !== N * K || lut0.length !== N * E)
    throw new SqueezeError('ERR_SHAPE', `gptqRefit: w, codes, outlier mask [${N}, ${K}] and tables [${N}, ${E}] disagree`);
  if (!Number.isInteger(rounds) || rounds < 0 || rounds > 100) throw new SqueezeError('ERR_ARG', `gptqRefit: rounds must be an integer in [0, 100], got ${rounds}`);
}

/** The same computation in TypeScript (float64 throughout): the oracle of the native op. */
export function gptqRefitReference(w: Float32Array, N: number, K: number, codes0: Uint8Array, lut0: Float32Array,
  E: number, isOut: Uint8Array, f: GptqFactor, rounds = 3): GptqResult {
  checkArgs(w, N, K, codes0, lut0, E, isOut, f, rounds);
  const { perm, h, u } = f;
  const codes = new Uint8Array(N * K), lut = new Float32Array(N * E), q = new Float32Array(N * K);
  const wr = new Float64Array(K), out = new Uint8Array(K), work = new Float64Array(K), g = new Float64Array(K);
  const m = new Float64Array(E * E), b = new Float64Array(E), tmp = new Float64Array(E), d = new Float64Array(K);
  const cur: RowState = { codes: new Uint8Array(K), t: new Float64Array(E), q: new Float64Array(K) };
  const best: RowState = { codes: new Uint8Array(K), t: new Float64Array(E), q: new Float64Array(K) };
  const err = (): number => {
    for (let k = 0; k < K; k++) d[k] = wr[k] - cur.q[k];
    return quadForm(d, h, K);
  };
  const keep = (): void => { best.codes.set(cur.codes); best.t.set(cur.t); best.q.set(cur.q); };
  let before = 0, after = 0;
  for (let n = 0; n < N; n++) {
    const row = n * K;
    for (let i = 0; i < K; i++) {
      const k = perm[i];
      wr[i] = w[row + k];
      out[i] = isOut[row + k];
      cur.codes[i] = codes0[row + k];
    }
    for (let e = 0; e < E; e++) cur.t[e] = lut0[n * E + e];
    for (let i = 0; i < K; i++) cur.q[i] = out[i] ? wr[i] : cur.t[cur.codes[i]];
    const e0 = err();
    before += e0;
    optimizeOutliers(wr, out, h, K, cur);
    let bestErr = err();
    keep();
    for (let r = 0; r < rounds; r++) {
      gptqRow(wr, out, cur.t, E, u, K, cur, work);
      // the refit can only lower the error of the GPTQ state: only the refitted state is scored
      refitRow(wr, out, E, h, K, cur, g, m, b, tmp);
      const e1 = err();
      if (e1 < bestErr) { bestErr = e1; keep(); }
    }
    after += bestErr;
    for (let i = 0; i < K; i++) {
      const k = perm[i];
      codes[row + k] = best.codes[i];
      q[row + k] = best.q[i];
    }
    for (let e = 0; e < E; e++) lut[n * E + e] = best.t[e];
  }
  return { codes, lut, q, errorBefore: before, errorAfter: after };
}
