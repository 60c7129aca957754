/**
 * The KV quantizer's calibration samples, one layer at a time.
 *
 * calibrate-kv fits each layer from that layer's keys and values over every calibration window.
 * Kept for all layers at once they outgrow a host: LLaMA-2-7B (32 layers, 32 kv heads x 128) over
 * 16 windows of 2048 tokens holds 1.1 GB of fp32 keys and values per layer, 34 GB in all. So the
 * decoder walks the windows one layer at a time instead: layer l runs alone from the residual
 * stream that layer l - 1 left (residualStates, the walk of the outlier-slot measurement), the
 * projection observer keeps that layer's keys and values, and the stream after it is
 * kept for layer l + 1. A walk over every layer costs one forward pass without logits; what it
 * holds is one layer's samples and one residual stream per batch of windows.
 */
import { SqueezeError } from '../errors';
import { Tensor } from '../tensor';
import type { Model } from '../model/model';
import { ResidualState, setLayerWindow, setProjectionObserver } from '../model/llama';
import { clone } from '../ops/basic';
import { residualStates } from './kvquant-allocate';
import { rotateRows } from './gradients';

/** One layer's samples over every calibration window, positions below the sink left out. */
export interface LayerSamples {
  /** [tokens, kvHeads*D], tokens in window order: keys before RoPE (after it for postRope). */
  keys: Float32Array;
  /** [tokens, kvHeads*D]: values. */
  values: Float32Array;
  /**
   * Per key channel (h, c) [kvHeads*D]: the sum over the samples' tokens and over kv head h's query
   * heads of the mean squared query component of c's RoPE pair (the key codebook's sensitivity).
   */
  queryEnergy: Float64Array;
  tokens: number;
}

export interface LayerSamplerOptions {
  /** Windows per forward pass. */
  batch: number;
  /** Positions below it are not sampled (the cache keeps them in fp16). */
  sink: number;
  /** Rotate the keys by their positions (the post-RoPE ablation). */
  postRope?: boolean;
}

/**
 * The contents of `t` as they are at this point of the stream: a stream-ordered copy into a
 * fresh tensor (later ops may overwrite `t` before a read of `t` itself runs), then read.
 */
export async function snapshot(t: Tensor): Promise<Float32Array | Int32Array> {
  const c = clone(t);
  try {
    return t.dtype === 'i32' ? ((await c.toArray()) as Int32Array) : await c.toFloat32();
  } finally {
    c.dispose();
  }
}

/** Walks `model` over `windows` layer by layer; layer(l) must be asked for in order 0, 1, 2, ... */
export class LayerSampler {
  private states: ResidualState[] | undefined;
  private nextLayer = 0;

  constructor(private readonly model: Model, private readonly windows: Int32Array[], private readonly o: LayerSamplerOptions) {
    if (!windows.length) throw new SqueezeError('ERR_ARG', 'LayerSampler: no windows');
    if (!(Number.isInteger(o.batch) && o.batch >= 1)) throw new SqueezeError('ERR_ARG', `LayerSampler: batch must be a positive integer, got ${o.batch}`);
    if (!(Number.isInteger(o.sink) && o.sink >= 0)) throw new SqueezeError('ERR_ARG', `LayerSampler: sink must be a non-negative integer, got ${o.sink}`);
  }

  /** Layer l's samples; the residual stream moves past layer l. */
  async layer(l: number): Promise<LayerSamples> {
    const cfg = this.model.config, L = cfg.numLayers;
    if (l !== this.nextLayer || l >= L) throw new SqueezeError('ERR_INTERNAL', `LayerSampler: layer ${l} asked for; the walk is at layer ${this.nextLayer} of ${L}`);
    const H = cfg.numKvHeads, D = cfg.headDim, Hq = cfg.numHeads, HD = H * D, half = D / 2, G = Hq / H;
    const { batch, sink } = this.o, windows = this.windows, last = l + 1 === L;
    const parts: Array<{ k: Float32Array; v: Float32Array }> = [];
    const energy = new Float64Array(HD);
    // one batch's projections into samples (run in batch order: the sums come out the same every run)
    const take = (a: Float32Array | Int32Array, pos: Int32Array, T: number, W: number): { k: Float32Array; v: Float32Array } => {
      let n = 0;
      for (let t = 0; t < T; t++) if (pos[t] >= sink) n++;
      const k = new Float32Array(n * HD), v = new Float32Array(n * HD);
      let r = 0;
      for (let t = 0; t < T; t++) {
        if (pos[t] < sink) continue;
        k.set(a.subarray(t * W + Hq * D, t * W + (Hq + H) * D), r * HD);
        for (let hq = 0; hq < Hq; hq++) {
          const h = Math.floor(hq / G), o = t * W + hq * D;
          for (let i = 0; i < half; i++) {
            const e = 0.5 * (a[o + i] * a[o + i] + a[o + i + half] * a[o + i + half]);
            energy[h * D + i] += e;
            energy[h * D + i + half] += e;
          }
        }
        v.set(a.subarray(t * W + (Hq + H) * D, t * W + (Hq + 2 * H) * D), r * HD);
        if (this.o.postRope) rotateRows(k.subarray(r * HD, (r + 1) * HD), [pos[t]], H, D, cfg.invFreq);
        r++;
      }
      return { k, v };
    };
    let chain: Promise<void> = Promise.resolve();
    let b = 0; // the batch of the next observation: one per batch, since only layer l runs
    const observe = (layer: number, qkv: Tensor, positions: Tensor): void => {
      if (layer !== l) return;
      const at = b++, T = qkv.shape[0], W = qkv.shape[1];
      const snap = Promise.all([snapshot(qkv), snapshot(positions)]);
      snap.catch(() => undefined); // a failed read surfaces through the chain, never unhandled
      chain = chain.then(() => snap).then(([a, p]) => { parts[at] = take(a, p as Int32Array, T, W); });
    };
    let next: ResidualState[] | undefined;
    setProjectionObserver(observe);
    try {
      if (!last) next = await residualStates(this.model, windows, l, this.states, batch);
      else {
        // the last layer leaves no stream to keep: it runs on to the (unread) logits
        for (let i = 0, j = 0; i < windows.length; i += batch, j++) {
          setLayerWindow({ from: l, to: L, restore: this.states?.[j] });
          await this.model.prefillOnly(windows.slice(i, i + batch));
        }
      }
      await chain;
    } catch (e) {
      drop(next);
      throw e;
    } finally {
      setProjectionObserver(null);
      setLayerWindow(null);
    }
    drop(this.states);
    this.states = next;
    this.nextLayer = l + 1;
    const tokens = parts.reduce((a, x) => a + x.k.length / HD, 0);
    return { keys: cat(parts.map((x) => x.k)), values: cat(parts.map((x) => x.v)), queryEnergy: energy, tokens };
  }

  /** Lets go of the saved residual streams. */
  dispose(): void {
    drop(this.states);
    this.states = undefined;
  }
}

function drop(states: ResidualState[] | undefined): void {
  for (const s of states ?? []) {
    s.x.dispose();
    s.mlp.dispose();
  }
}

export function cat(parts: Float32Array[]): Float32Array {
  if (parts.length === 1) return parts[0];
  const out = new Float32Array(parts.reduce((a, x) => a + x.length, 0));
  let off = 0;
  for (const x of parts) { out.set(x, off); off += x.length; }
  return out;
}
