/**
 * Calibration statistics for the SqueezeLLM quantizer without gradients: the mean squared input
 * of every input channel of every decoder linear and of the lm_head (a Fisher-free sensitivity proxy: under a
 * diagonal approximation of E[x xᵀ], the output error of a weight error δ on column k is
 * E[x_k²] δ²), gathered by running our own forward over the calibration windows; optionally
 * the full second moment E[x xᵀ] per linear for error compensation (gptq.ts).
 */
import { loadModel } from '../model/model';
import { setLinearObserver, LinearSite } from '../model/llama';
import { loadPplData, perplexity } from '../runtime/ppl';
import { Tensor } from '../tensor';
import { matmul } from '../ops/gemm';

const SITES: Record<LinearSite, string[]> = {
  qkv: ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'],
  o: ['self_attn.o_proj'],
  gu: ['mlp.gate_proj', 'mlp.up_proj'],
  down: ['mlp.down_proj'],
  head: ['lm_head'],
};

/**
 * `model.layers.<i>.<linear>` -> (mean x_k² over the calibration tokens)^power [K]. The windows are
 * read as ppl reads them (`window`: their length, loadPplData).
 */
export async function activationStats(modelDir: string, calibFile: string, windows?: number, power = 1,
  cov?: Map<string, Float64Array>, window?: number): Promise<Map<string, Float32Array>> {
  // With `cov`: also the second-moment matrix E[x xᵀ] [K,K] per linear, over every token.
  const hs = new Map<string, { h: Float64Array; rows: number }>();
  const model = await loadModel(modelDir, { device: 'cpu', maxBatch: 1, maxContext: window });
  const sums = new Map<string, { s: Float64Array; rows: number }>();
  const pending: Promise<void>[] = [];
  setLinearObserver((layer, site, x) => {
    const [M, K] = x.shape;
    const key = `${layer}:${site}`;
    // On the CPU a read takes the contents as of the call (queued behind the ops that wrote x,
    // ahead of the later ones that reuse its buffer), so this is exactly this linear's input.
    pending.push(x.toFloat32().then((a) => {
      let e = sums.get(key);
      if (!e) sums.set(key, (e = { s: new Float64Array(K), rows: 0 }));
      for (let m = 0; m < M; m++) for (let k = 0; k < K; k++) e.s[k] += a[m * K + k] * a[m * K + k];
      e.rows += M;
      if (!cov) return;
      let c = hs.get(key);
      if (!c) hs.set(key, (c = { h: new Float64Array(K * K), rows: 0 }));
      // xᵀ x through the native matmul (y = a · bᵀ with a = b = xᵀ [K, M]), fp32 per window.
      const xt = new Float32Array(K * M);
      for (let m = 0; m < M; m++) for (let k = 0; k < K; k++) xt[k * M + m] = a[m * K + k];
      const tx = Tensor.from(xt, [K, M]), ty = Tensor.empty([K, K]);
      try {
        matmul(ty, tx, tx);
        return ty.toFloat32().then((y) => {
          for (let i = 0; i < K * K; i++) c!.h[i] += y[i];
          c!.rows += M;
        });
      } finally {
        tx.dispose();
        ty.dispose();
      }
    }));
  });
  try {
    const d = loadPplData(model, calibFile, { windows, window });
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
      const name = site === 'head' ? l : `model.layers.${layer}.${l}`;  // the lm_head's input: the final norm's output
      out.set(name, mean);
      if (c) cov!.set(name, c.h);
    }
  }
  return out;
}
