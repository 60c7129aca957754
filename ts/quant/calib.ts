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
export async function activationStats(modelDir: string, calibFile: string, windows = 8, power = 1): Promise<Map<string, Float32Array>> {
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
    for (const l of SITES[site]) out.set(`model.layers.${layer}.${l}`, mean);
  }
  return out;
}
