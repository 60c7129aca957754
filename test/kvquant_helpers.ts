/** Shared setup of the KVQuant suites: random caches, calibration, and JS oracles. */
import { Tensor } from '../ts/tensor';
import { KvqCache, KvqLayerCalibration, kvqAppend } from '../ts/ops/kvquant';
import { f16ToFloat, floatToF16 } from '../ts/util/half';
import { randn, rng } from './gpu';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;
const f = Math.fround;

export interface Setup {
  cache: KvqCache;
  cal: KvqLayerCalibration;
  calHost: { lo: Float32Array; hi: Float32Array; kcb: Float32Array; vcb: Float32Array };
  pageTable: Tensor;
  seqLens: Tensor;
  cuQ: Tensor;
  lens: number[];
  /** Host copies (fp16-rounded) of every appended row per sequence: [L, H, D]. */
  keys: Float32Array[];
  values: Float32Array[];
  H: number;
  D: number;
  pageSize: number;
  maxPages: number;
}

export function codebook(bits: number, r: () => number): Float32Array {
  const n = 1 << bits;
  const cb = new Float32Array(n);
  for (let i = 0; i < n; i++) cb[i] = -1 + (2 * i) / (n - 1) + (i > 0 && i < n - 1 ? (r() - 0.5) * (0.5 / n) : 0);
  return cb.sort();
}

export function roundF16(a: Float32Array): Float32Array {
  return a.map((x) => f16ToFloat(floatToF16(x)));
}

/** Builds a cache of `lens` tokens per sequence, appended in two steps (prefill, then one decode row each). */
export function buildCache(o: { bits: number; H: number; D: number; lens: number[]; nk: number; nv: number; sink: number; pageSize: number; seed: number; device?: string; dtype?: 'f16' | 'bf16' | 'f32' }): Setup {
  const r = rng(o.seed);
  const { H, D, pageSize } = o;
  const device = o.device ?? 'cpu';
  const B = o.lens.length;
  const maxPages = Math.max(...o.lens.map((l) => Math.ceil(l / pageSize)));
  const pages = B * maxPages + 1;
  const cache = new KvqCache({ pages, pageSize, kvHeads: H, headDim: D, bits: o.bits, keyOutliers: o.nk, valueOutliers: o.nv, sink: o.sink, maxSeqs: B, device });
  for (const t of [cache.kCodes, cache.vCodes, cache.meta]) t.write(new Uint8Array(t.numel));
  for (const t of [cache.sinkK, cache.sinkV]) t.write(new Uint16Array(t.numel));
  // calibration: bounds around a per-channel offset; some entries will fall outside
  const lo = new Float32Array(H * D), hi = new Float32Array(H * D), off = new Float32Array(H * D);
  for (let i = 0; i < H * D; i++) { off[i] = (r() - 0.5) * 2; lo[i] = off[i] - 1.5 - r(); hi[i] = off[i] + 1.5 + r(); }
  const kcb = codebook(o.bits, r), vcb = codebook(o.bits, r);
  const cal: KvqLayerCalibration = {
    keyLo: Tensor.from(lo, [H * D], { device }), keyHi: Tensor.from(hi, [H * D], { device }),
    keyCodebook: Tensor.from(kcb, [kcb.length], { device }), valueCodebook: Tensor.from(vcb, [vcb.length], { device }),
  };
  // shuffled physical pages
  const perm = Array.from({ length: pages }, (_, i) => i);
  for (let i = pages - 1; i > 0; i--) { const j = Math.floor(r() * (i + 1)); [perm[i], perm[j]] = [perm[j], perm[i]]; }
  const pt = new Int32Array(B * maxPages);
  for (let i = 0; i < B * maxPages; i++) pt[i] = perm[i];
  const pageTable = Tensor.from(pt, [B, maxPages], { device });
  const keys: Float32Array[] = [], values: Float32Array[] = [];
  for (let b = 0; b < B; b++) {
    const L = o.lens[b];
    const k = randn(L * H * D, r);
    for (let i = 0; i < k.length; i++) k[i] = k[i] + off[i % (H * D)];
    for (let i = 0; i < k.length; i += 37) k[i] *= 3;  // outliers beyond the bounds
    const v = randn(L * H * D, r);
    for (let i = 0; i < v.length; i += 53) v[i] *= 8;
    keys.push(roundF16(k));
    values.push(roundF16(v));
  }
  const dtype = o.dtype ?? 'f16';
  const step = (rows: number[][], after: number[]) => {
    const cu = [0];
    for (const rr of rows) cu.push(cu[cu.length - 1] + rr[1] - rr[0]);
    const N = cu[B];
    const kk = new Float32Array(N * H * D), vv = new Float32Array(N * H * D);
    rows.forEach(([s, e], b) => {
      kk.set(keys[b].subarray(s * H * D, e * H * D), cu[b] * H * D);
      vv.set(values[b].subarray(s * H * D, e * H * D), cu[b] * H * D);
    });
    const kt = Tensor.from(kk, [N, H, D], { dtype, device }), vt = Tensor.from(vv, [N, H, D], { dtype, device });
    const lt = Tensor.from(Int32Array.from(after), [B], { device }), ct = Tensor.from(Int32Array.from(cu), [B + 1], { device });
    kvqAppend(cache, cal, kt, vt, pageTable, lt, ct);
  };
  const pre = o.lens.map((l) => Math.max(0, l - 1));
  step(pre.map((p) => [0, p]), pre);
  step(o.lens.map((l, b) => [pre[b], l]), o.lens);
  return {
    cache, cal, calHost: { lo, hi, kcb, vcb }, pageTable,
    seqLens: Tensor.from(Int32Array.from(o.lens), [B], { device }),
    cuQ: Tensor.from(Int32Array.from(o.lens.map((_, i) => i).concat([B])), [B + 1], { device }),
    lens: o.lens, keys, values, H, D, pageSize, maxPages,
  };
}

function normalize(x: number, lo: number, hi: number): number {
  if (!(hi > lo)) return 0;
  return f(f(f(2 * f(x - lo)) / f(hi - lo)) - 1);
}
function nearest(x: number, cb: Float32Array): number {
  let best = 0, bd = Math.abs(f(x - cb[0]));
  for (let j = 1; j < cb.length; j++) { const d = Math.abs(f(x - cb[j])); if (d < bd) { bd = d; best = j; } }
  return best;
}
function dequant(lo: number, hi: number, c: number): number {
  return f(lo + f(f(hi - lo) * f(0.5 * f(c + 1))));
}
function topN(score: number[], n: number): number[] {
  const idx = score.map((_, i) => i).sort((a, b) => (score[b] - score[a]) || (a - b));
  return idx.slice(0, n);
}

/** Independent JS model of quantize-then-unpack for one token-head vector. */
export function oracleRoundTrip(s: Setup, k: Float32Array, v: Float32Array, h: number, nk: number, nv: number): { k: Float32Array; v: Float32Array } {
  const D = s.D, { lo, hi } = s.calHost;
  // codebook entries are used at fp16 precision (kvquant_layout.h)
  const kcb = roundF16(Float32Array.from(s.calHost.kcb)), vcb = roundF16(Float32Array.from(s.calHost.vcb));
  const ko = new Float32Array(D), vo = new Float32Array(D);
  const xs = Array.from(k, (x, c) => normalize(x, lo[h * D + c], hi[h * D + c]));
  for (let c = 0; c < D; c++) ko[c] = dequant(lo[h * D + c], hi[h * D + c], kcb[nearest(xs[c], kcb)]);
  // key outlier slots: the channels that lose most in their code, in the key's own units
  const loss = Array.from(k, (x, c) => Math.abs(f(x - ko[c])));
  for (const c of topN(loss, nk)) ko[c] = k[c];
  const vout = topN(Array.from(v, Math.abs), nv);
  let mn = Infinity, mx = -Infinity;
  for (let c = 0; c < D; c++) if (!vout.includes(c)) { mn = Math.min(mn, v[c]); mx = Math.max(mx, v[c]); }
  const vlo = f16ToFloat(floatToF16(mn)), vhi = f16ToFloat(floatToF16(mx));
  for (let c = 0; c < D; c++) vo[c] = dequant(vlo, vhi, vcb[nearest(normalize(v[c], vlo, vhi), vcb)]);
  for (const c of vout) vo[c] = v[c];
  return { k: ko, v: vo };
}

/** Attention of one query row (already rotated, [Hq, D]) over dequantized pre-RoPE keys [L, H, D]. */
export function oracleAttention(q: Float32Array, keys: Float32Array, vals: Float32Array, L: number, H: number, Hq: number, D: number, invFreq: Float32Array, scale: number): Float32Array {
  const out = new Float32Array(Hq * D), g = Hq / H, half = D / 2;
  const kr = new Float64Array(L * H * D);
  for (let t = 0; t < L; t++)
    for (let h = 0; h < H; h++)
      for (let i = 0; i < half; i++) {
        const ang = f(t * invFreq[i]), c = Math.cos(ang), sn = Math.sin(ang);
        const a = keys[(t * H + h) * D + i], b = keys[(t * H + h) * D + i + half];
        kr[(t * H + h) * D + i] = a * c - b * sn;
        kr[(t * H + h) * D + i + half] = b * c + a * sn;
      }
  for (let hq = 0; hq < Hq; hq++) {
    const h = Math.floor(hq / g);
    const sc = new Float64Array(L);
    let m = -Infinity;
    for (let t = 0; t < L; t++) {
      let s = 0;
      for (let i = 0; i < D; i++) s += q[hq * D + i] * kr[(t * H + h) * D + i];
      sc[t] = s * scale;
      m = Math.max(m, sc[t]);
    }
    let l = 0;
    const acc = new Float64Array(D);
    for (let t = 0; t < L; t++) {
      const p = Math.exp(sc[t] - m);
      l += p;
      for (let i = 0; i < D; i++) acc[i] += p * vals[(t * H + h) * D + i];
    }
    for (let i = 0; i < D; i++) out[hq * D + i] = acc[i] / l;
  }
  return out;
}

export function invFreqFor(D: number, theta = 10000): Float32Array {
  const a = new Float32Array(D / 2);
  for (let i = 0; i < D / 2; i++) a[i] = 1 / Math.pow(theta, (2 * i) / D);
  return a;
}
