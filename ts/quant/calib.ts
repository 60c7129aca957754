/**
 * Calibration statistics for the SqueezeLLM quantizer without gradients: the mean squared input
 * of every input channel of every decoder linear (a Fisher-free sensitivity proxy: under a
 * diagonal approximation of E[x xᵀ], the output error of a weight error δ on column k is
 * E[x_k²] δ²), gathered by running our own forward over a few calibration windows.
 */
import { loadModel } from '../model/model';
import { setLinearObserver, LinearSite } from '../model/llama';
import { loadPplData, perplexity } from '../runtime/ppl';

const SITES: Record<LinearSite, string[]> = {
  qkv: ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'],
  o: ['self_attn.o_proj'],
  gu: ['mlp.gate_proj', 'mlp.up_proj'],
  down: ['mlp.down_proj'],
};

/** `model.layers.<i>.<linear>` -> (mean x_k² over the calibration tokens)^power [K]. */
export async function activationStats(modelDir: string, calibFile: string, windows = 8, power = 1,
  cov?: Map<string, Float64Array>): Promise<Map<string, Float32Array>> {
  // With `cov`: also the second-moment matrix E[x xᵀ] [K,K] per linear, from every 8th token.
  const hs = new Map<string, { h: Float64Array; rows: number }>();
  const model = await loadModel(modelDir, { device: 'cpu', maxBatch: 1 });
  const sums = new Map<string, { s: Float64Array; rows: number }>();
  const pending: Promise<void>[] = [];
  setLinearObserver((layer, site, x) => {
    const [M, K] = x.shape;
    const key = `${layer}:${site}`;
    // The copy is ordered after the ops that wrote x, so the snapshot is this linear's input.
    pending.push(x.toFloat32().then((a) => {
      let e = sums.get(key);
      if (!e) sums.set(key, (e = { s: new Float64Array(K), rows: 0 }));
      for (let m = 0; m < M; m++) for (let k = 0; k < K; k++) e.s[k] += a[m * K + k] * a[m * K + k];
      e.rows += M;
      if (!cov) return;
      let c = hs.get(key);
      if (!c) hs.set(key, (c = { h: new Float64Array(K * K), rows: 0 }));
      for (let m = 0; m < M; m += 8) {
        const o = m * K;
        for (let i = 0; i < K; i++) {
          const xi = a[o + i];
          if (xi === 0) continue;
          const hr = i * K;
          for (let j = 0; j < K; j++) c.h[hr + j] += xi * a[o + j];
        }
        c.rows++;
      }
    }));
  });
  try {
    const d = loadPplData(model, calibFile, { windows });
    await perplexity(model, d, { batch: 1 });
    await Promise.all(pending);
  } finally {
    setLinearObserver(null);
    await model.dispose();
  }
  const out = new Map<string, Float32Array>();
  for (const [key, e] of sums) {
    const [layer, site] = key.split(':') as [string, LinearSite];
    const mean = Float32Array.from(e.s, (v) => Math.pow(v / Math.max(1, e.rows), power));
    const c = hs.get(key);
    if (c) for (let i = 0; i < c.h.length; i++) c.h[i] /= Math.max(1, c.rows);
    for (const l of SITES[site]) {
      out.set(`model.layers.${layer}.${l}`, mean);
      if (c) cov!.set(`model.layers.${layer}.${l}`, c.h);
    }
  }
  return out;
}

/** Lower Cholesky factor of a symmetric positive definite a [n,n] (row-major), in place copy. */
function cholesky(a: Float64Array, n: number): Float64Array {
  const l = new Float64Array(n * n);
  for (let i = 0; i < n; i++)
    for (let j = 0; j <= i; j++) {
      let s = a[i * n + j];
      for (let k = 0; k < j; k++) s -= l[i * n + k] * l[j * n + k];
      l[i * n + j] = i === j ? Math.sqrt(Math.max(s, 1e-12)) : s / l[j * n + j];
    }
  return l;
}

/**
 * Upper factor U of H⁻¹ = Uᵀ U for a damped second-moment matrix H [K,K] (GPTQ's order of
 * updates): column k's rounding error, divided by U[k,k], is spread over the later columns with
 * row k of U. Dead channels (zero diagonal) get a unit diagonal.
 */
export function gptqFactor(h: Float64Array, K: number, damp = 0.01): Float64Array {
  const a = Float64Array.from(h);
  let mean = 0;
  for (let k = 0; k < K; k++) mean += a[k * K + k];
  mean /= K;
  for (let k = 0; k < K; k++) {
    if (a[k * K + k] === 0) a[k * K + k] = 1;
    a[k * K + k] += damp * mean;
  }
  const l = cholesky(a, K);
  // inv(L) (lower), then H⁻¹ = inv(L)ᵀ inv(L)
  const li = new Float64Array(K * K);
  for (let j = 0; j < K; j++) {
    li[j * K + j] = 1 / l[j * K + j];
    for (let i = j + 1; i < K; i++) {
      let s = 0;
      for (let k = j; k < i; k++) s -= l[i * K + k] * li[k * K + j];
      li[i * K + j] = s / l[i * K + i];
    }
  }
  const hinv = new Float64Array(K * K);
  for (let i = 0; i < K; i++)
    for (let j = 0; j <= i; j++) {
      let s = 0;
      for (let k = i; k < K; k++) s += li[k * K + i] * li[k * K + j];
      hinv[i * K + j] = s;
      hinv[j * K + i] = s;
    }
  // H⁻¹ = L2 L2ᵀ with L2 lower; U = L2ᵀ would give Uᵀ U = L2 L2ᵀ. GPTQ needs the upper factor
  // of the Cholesky of H⁻¹ taken as H⁻¹ = Uᵀ U: U = chol_upper, i.e. U = transpose(chol_lower).
  const l2 = cholesky(hinv, K);
  const u = new Float64Array(K * K);
  for (let i = 0; i < K; i++) for (let j = i; j < K; j++) u[i * K + j] = l2[j * K + i];
  return u;
}

/**
 * GPTQ-style error compensation with a fixed non-uniform table per row: columns are coded in
 * order (nearest centroid), and each column's error is pushed onto the not yet coded columns.
 * `w` [N,K] is updated in place (outliers keep their updated exact value); returns the codes.
 */
export function gptqCodes(w: Float32Array, N: number, K: number, lut: Float32Array, E: number, isOut: Uint8Array,
  u: Float64Array): Uint8Array {
  const codes = new Uint8Array(N * K);
  const wd = Float64Array.from(w);
  for (let n = 0; n < N; n++) {
    const row = n * K, l = n * E;
    for (let k = 0; k < K; k++) {
      const v = wd[row + k];
      let err = 0;
      if (!isOut[row + k]) {
        let best = 0, bd = Math.abs(v - lut[l]);
        for (let e = 1; e < E; e++) {
          const d = Math.abs(v - lut[l + e]);
          if (d < bd) { bd = d; best = e; }
        }
        codes[row + k] = best;
        err = (v - lut[l + best]) / u[k * K + k];
      }
      if (err !== 0) for (let j = k + 1; j < K; j++) wd[row + j] -= err * u[k * K + j];
    }
  }
  for (let i = 0; i < N * K; i++) w[i] = wd[i];
  return codes;
}
