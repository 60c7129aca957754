/**
 * Loss gradients on the CPU, for the quantizers' sensitivities:
 * - the Fisher diagonal of every decoder linear's weight and of the lm_head (SqueezeLLM weights its k-means and picks
 *   its sensitive outliers by it): the mean over calibration windows of the squared gradient of
 *   the window's loss, which is what gradient tools write;
 * - each layer's pre-RoPE keys and values together with the gradient of the loss with respect to
 *   them (KVQuant weights every k-means sample of its codebooks by that sample's Fisher information,
 *   the squared gradient; `calibrate-kv --fisher` by its square root, kvquant-calibrate.ts).
 *
 * The forward pass here is a plain fp32 reference of the decoder (RMSNorm, GQA attention with
 * RoPE and a causal mask, SiLU-gated MLP, tied or separate lm_head) that keeps what the backward
 * pass needs; the products go through the native matmul (y = x·wᵀ), the rest are loops here. The
 * attention probabilities are recomputed in the backward pass instead of kept, so the memory per
 * window is a few activations per layer. It reads a dense checkpoint (f16/bf16/f32 linears) into
 * host memory in fp32 (twice: each weight and its transpose), so it suits models of a few hundred
 * million parameters; for larger ones use a Fisher file made elsewhere (`quantize --fisher`).
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { SqueezeError } from '../errors';
import { Tensor } from '../tensor';
import { matmul } from '../ops/gemm';
import { loadConfig, ModelConfig, parameterCount } from '../model/config';
import { Checkpoint, writeSafetensors } from '../model/safetensors';
import { loadModel } from '../model/model';
import { loadPplData } from '../runtime/ppl';

type F32 = Float32Array;

/** y[M,N] = x[M,K] · w[N,K]ᵀ through the native CPU matmul. */
async function mm(x: F32, M: number, K: number, w: F32, N: number): Promise<F32> {
  const tx = Tensor.from(x, [M, K]), tw = Tensor.from(w, [N, K]), ty = Tensor.empty([M, N]);
  try {
    matmul(ty, tx, tw);
    return await ty.toFloat32();
  } finally {
    tx.dispose();
    tw.dispose();
    ty.dispose();
  }
}

/** [R,C] -> [C,R]. */
function transpose(a: F32, R: number, C: number): F32 {
  const out = new Float32Array(R * C);
  for (let r = 0; r < R; r++) for (let c = 0; c < C; c++) out[c * R + r] = a[r * C + c];
  return out;
}

/** Columns [c0, c0 + n) of a [R, C] matrix, contiguous. */
function columns(a: F32, R: number, C: number, c0: number, n: number): F32 {
  const out = new Float32Array(R * n);
  for (let r = 0; r < R; r++) out.set(a.subarray(r * C + c0, r * C + c0 + n), r * n);
  return out;
}

function addInto(dst: F32, src: F32): void {
  for (let i = 0; i < dst.length; i++) dst[i] += src[i];
}

/** A linear's weight [N,K], its transpose [K,N] (for the input gradient) and bias. */
interface Linear {
  name: string;
  N: number;
  K: number;
  w: F32;
  wt: F32;
  b?: F32;
}

interface Layer {
  inNorm: F32;
  postNorm: F32;
  q: Linear;
  k: Linear;
  v: Linear;
  o: Linear;
  gate: Linear;
  up: Linear;
  down: Linear;
}

/** One layer's keys and values of a window (pre-RoPE, [T, Hkv*D]) with the loss gradient w.r.t. them. */
export interface KvGradients {
  keys: F32;
  values: F32;
  keyGrads: F32;
  valueGrads: F32;
}

export interface WindowGradients {
  /** Mean next-token negative log-likelihood of the window (positions 1..T-1). */
  loss: number;
  /** Per layer, when asked for. */
  kv?: KvGradients[];
  /** The window's weight gradients, when asked for. */
  weightGrads?: Map<string, F32>;
}

export interface BackpropOptions {
  /** Accumulate the squared weight gradients of the decoder linears (fisher()). */
  weights?: boolean;
  /** Return each layer's keys, values and their gradients. */
  kv?: boolean;
  /** Return the gradient of every decoder linear's weight (by name) for this window. */
  weightGrads?: boolean;
}

/** Reverse-mode gradients of the language-model loss of a dense checkpoint, fp32 on the CPU. */
export class Backprop {
  readonly config: ModelConfig;
  private readonly embed: F32;
  private readonly lmHead: F32;
  private readonly lmHeadT: F32;
  private readonly finalNorm: F32;
  private readonly layers: Layer[];
  private readonly sq = new Map<string, Float64Array>();
  private windows = 0;

  private constructor(cfg: ModelConfig, embed: F32, lmHead: F32, finalNorm: F32, layers: Layer[]) {
    this.config = cfg;
    this.embed = embed;
    this.lmHead = lmHead;
    this.lmHeadT = transpose(lmHead, cfg.vocabSize, cfg.hiddenSize);
    this.finalNorm = finalNorm;
    this.layers = layers;
  }

  /** Reads the config and the dense weights of a model folder. */
  static open(dir: string): Backprop {
    const cfg = loadConfig(dir);
    // fp32 weights and their transposes (the embedding once or twice), plus activations
    const need = parameterCount(cfg) * 8;
    if (need > os.totalmem() * 0.75)
      throw new SqueezeError('ERR_UNSUPPORTED', `${dir}: gradients on the CPU would hold ${(need / 2 ** 30).toFixed(1)} GiB of fp32 weights, `
        + `more than this machine's memory allows (${(os.totalmem() / 2 ** 30).toFixed(1)} GiB); make the Fisher file elsewhere`);
    const ck = Checkpoint.open(dir);
    try {
      if (ck.names().some((n) => /\.(lut|qweight)$/.test(n)))
        throw new SqueezeError('ERR_UNSUPPORTED', `${ck.describe()}: gradients need a dense checkpoint, this one has quantized linears`);
      const H = cfg.hiddenSize, D = cfg.headDim, I = cfg.intermediateSize;
      const read = (name: string, shape: number[]): F32 => {
        const e = ck.entry(name);
        if (!['F16', 'BF16', 'F32'].includes(e.dtype))
          throw new SqueezeError('ERR_DTYPE', `${ck.describe()}: '${name}' is ${e.dtype}; gradients need F16, BF16 or F32 weights`);
        if (e.shape.length !== shape.length || e.shape.some((s, i) => s !== shape[i]))
          throw new SqueezeError('ERR_FORMAT', `${ck.describe()}: '${name}' is [${e.shape}], expected [${shape}]`);
        return ck.readFloat32(name);
      };
      const linear = (name: string, N: number, K: number, bias: boolean): Linear => {
        const w = read(`${name}.weight`, [N, K]);
        return { name: `${name}.weight`, N, K, w, wt: transpose(w, N, K), b: bias ? read(`${name}.bias`, [N]) : undefined };
      };
      const embed = read('model.embed_tokens.weight', [cfg.vocabSize, H]);
      const lmHead = ck.has('lm_head.weight') && !cfg.tieWordEmbeddings ? read('lm_head.weight', [cfg.vocabSize, H]) : embed;
      const layers: Layer[] = [];
      for (let l = 0; l < cfg.numLayers; l++) {
        const p = `model.layers.${l}`;
        layers.push({
          inNorm: read(`${p}.input_layernorm.weight`, [H]),
          postNorm: read(`${p}.post_attention_layernorm.weight`, [H]),
          q: linear(`${p}.self_attn.q_proj`, cfg.numHeads * D, H, cfg.qkvBias),
          k: linear(`${p}.self_attn.k_proj`, cfg.numKvHeads * D, H, cfg.qkvBias),
          v: linear(`${p}.self_attn.v_proj`, cfg.numKvHeads * D, H, cfg.qkvBias),
          o: linear(`${p}.self_attn.o_proj`, H, cfg.numHeads * D, cfg.oBias),
          gate: linear(`${p}.mlp.gate_proj`, I, H, cfg.mlpBias),
          up: linear(`${p}.mlp.up_proj`, I, H, cfg.mlpBias),
          down: linear(`${p}.mlp.down_proj`, H, I, cfg.mlpBias),
        });
      }
      return new Backprop(cfg, embed, lmHead, read('model.norm.weight', [H]), layers);
    } finally {
      ck.close();
    }
  }

  /** The decoder linears, in the checkpoint's names (`model.layers.L.self_attn.q_proj.weight`, ...). */
  linearNames(): string[] {
    return this.layers.flatMap((l) => [l.q, l.k, l.v, l.o, l.gate, l.up, l.down].map((x) => x.name));
  }

  /**
   * Forward and backward over one window of token ids. With `weights` the squared gradient of
   * every decoder linear's weight is added to the running Fisher sums.
   */
  async window(ids: Int32Array, o: BackpropOptions = {}): Promise<WindowGradients> {
    const cfg = this.config, T = ids.length;
    if (T < 2) throw new SqueezeError('ERR_ARG', 'Backprop.window: a window needs at least 2 tokens');
    const H = cfg.hiddenSize, D = cfg.headDim, Hq = cfg.numHeads, Hkv = cfg.numKvHeads, I = cfg.intermediateSize, V = cfg.vocabSize;
    const G = Hq / Hkv, eps = cfg.rmsNormEps, scale = 1 / Math.sqrt(D);
    for (const id of ids) if (!(id >= 0 && id < V)) throw new SqueezeError('ERR_ARG', `Backprop.window: token id ${id} outside the vocabulary (${V})`);
    const pos = Array.from({ length: T }, (_, t) => t);
    const window = cfg.slidingWindow ?? Infinity;

    let x: F32 = new Float32Array(T * H);
    for (let t = 0; t < T; t++) x.set(this.embed.subarray(ids[t] * H, (ids[t] + 1) * H), t * H);
    interface Tape {
      x: F32; r1: F32; n1: F32; k: F32; v: F32; qr: F32; kr: F32; att: F32;
      x1: F32; r2: F32; n2: F32; g: F32; u: F32; a: F32;
    }
    const tapes: Tape[] = [];
    // Attention probabilities of one query head over its kv head's keys (both [T, D]): [T, T].
    const probs = async (Qh: F32, Kh: F32): Promise<F32> => softmaxCausal(await mm(Qh, T, D, Kh, T), T, scale, window);
    const linear = async (inp: F32, L: Linear): Promise<F32> => {
      const y = await mm(inp, T, L.K, L.w, L.N);
      if (L.b) for (let t = 0; t < T; t++) for (let n = 0; n < L.N; n++) y[t * L.N + n] += L.b[n];
      return y;
    };
    for (const L of this.layers) {
      const [n1, r1] = rmsNorm(x, T, H, L.inNorm, eps);
      const q = await linear(n1, L.q), k = await linear(n1, L.k), v = await linear(n1, L.v);
      const qr = rotateRows(q, pos, Hq, D, cfg.invFreq), kr = rotateRows(Float32Array.from(k), pos, Hkv, D, cfg.invFreq);
      const att = new Float32Array(T * Hq * D);
      for (let h = 0; h < Hkv; h++) {
        const Kh = columns(kr, T, Hkv * D, h * D, D), VhT = transpose(columns(v, T, Hkv * D, h * D, D), T, D);
        for (let hq = h * G; hq < (h + 1) * G; hq++) {
          const Oh = await mm(await probs(columns(qr, T, Hq * D, hq * D, D), Kh), T, T, VhT, D);
          for (let t = 0; t < T; t++) att.set(Oh.subarray(t * D, (t + 1) * D), t * Hq * D + hq * D);
        }
      }
      const x1 = await linear(att, L.o);
      addInto(x1, x);
      const [n2, r2] = rmsNorm(x1, T, H, L.postNorm, eps);
      const g = await linear(n2, L.gate), u = await linear(n2, L.up);
      const a = new Float32Array(T * I);
      for (let i = 0; i < a.length; i++) a[i] = silu(g[i]) * u[i];
      const x2 = await linear(a, L.down);
      addInto(x2, x1);
      tapes.push({ x, r1, n1, k, v, qr, kr, att, x1, r2, n2, g, u, a });
      x = x2;
    }
    const [nf, rf] = rmsNorm(x, T, H, this.finalNorm, eps);
    const logits = await mm(nf, T, H, this.lmHead, V);
    // loss = mean over t < T-1 of -log softmax(logits[t])[ids[t+1]]; dlogits = (softmax - onehot) / (T-1)
    let loss = 0;
    const inv = 1 / (T - 1);
    for (let t = 0; t < T; t++) {
      const row = logits.subarray(t * V, (t + 1) * V);
      if (t === T - 1) { row.fill(0); continue; }
      let mx = -Infinity;
      for (let j = 0; j < V; j++) mx = Math.max(mx, row[j]);
      let s = 0;
      for (let j = 0; j < V; j++) s += Math.exp(row[j] - mx);
      const target = ids[t + 1];
      loss += Math.log(s) + mx - row[target];
      for (let j = 0; j < V; j++) row[j] = (Math.exp(row[j] - mx) / s) * inv;
      row[target] -= inv;
    }
    loss *= inv;

    // Backward.
    const wantW = !!o.weights || !!o.weightGrads;
    const grads = o.weightGrads ? new Map<string, F32>() : undefined;
    const weightGrad = async (L: Pick<Linear, 'name' | 'N' | 'K'>, dy: F32, inp: F32): Promise<void> => {
      if (!wantW) return;
      const gw = await mm(transpose(dy, T, L.N), L.N, T, transpose(inp, T, L.K), L.K);
      grads?.set(L.name, gw);
      if (!o.weights) return;
      let acc = this.sq.get(L.name);
      if (!acc) this.sq.set(L.name, (acc = new Float64Array(L.N * L.K)));
      for (let i = 0; i < gw.length; i++) acc[i] += gw[i] * gw[i];
    };
    // The lm_head's own use of its weight (for a tied model, not the embedding lookup's): what
    // `quantize --lm-head --fisher` weighs the head by.
    await weightGrad({ name: 'lm_head.weight', N: V, K: H }, logits, nf);
    let dx = rmsNormBack(x, rf, this.finalNorm, await mm(logits, T, V, this.lmHeadT, H), T, H);
    const kv: KvGradients[] = [];
    for (let l = this.layers.length - 1; l >= 0; l--) {
      const L = this.layers[l], tp = tapes[l];
      // x2 = x1 + down(silu(gate(n2)) * up(n2))
      await weightGrad(L.down, dx, tp.a);
      const da = await mm(dx, T, H, L.down.wt, I);
      const dg = new Float32Array(T * I), du = new Float32Array(T * I);
      for (let i = 0; i < da.length; i++) {
        const gi = tp.g[i], sg = 1 / (1 + Math.exp(-gi));
        du[i] = da[i] * gi * sg;
        dg[i] = da[i] * tp.u[i] * sg * (1 + gi * (1 - sg));
      }
      await weightGrad(L.gate, dg, tp.n2);
      await weightGrad(L.up, du, tp.n2);
      const dn2 = await mm(dg, T, I, L.gate.wt, H);
      addInto(dn2, await mm(du, T, I, L.up.wt, H));
      const dx1 = rmsNormBack(tp.x1, tp.r2, L.postNorm, dn2, T, H);
      addInto(dx1, dx);
      // x1 = x + o(att)
      await weightGrad(L.o, dx1, tp.att);
      const datt = await mm(dx1, T, H, L.o.wt, Hq * D);
      const dqr = new Float32Array(T * Hq * D), dkr = new Float32Array(T * Hkv * D), dv = new Float32Array(T * Hkv * D);
      for (let h = 0; h < Hkv; h++) {
        const Kh = columns(tp.kr, T, Hkv * D, h * D, D), KhT = transpose(Kh, T, D), Vh = columns(tp.v, T, Hkv * D, h * D, D);
        for (let hq = h * G; hq < (h + 1) * G; hq++) {
          const Qh = columns(tp.qr, T, Hq * D, hq * D, D), dOh = columns(datt, T, Hq * D, hq * D, D);
          const P = await probs(Qh, Kh);  // recomputed, not kept from the forward pass (T x T per head)
          const dP = await mm(dOh, T, D, Vh, T);
          const dVh = await mm(transpose(P, T, T), T, T, transpose(dOh, T, D), D);
          // dS = P * (dP - sum_j P dP) * scale, row by row
          for (let t = 0; t < T; t++) {
            let s = 0;
            for (let j = 0; j <= t; j++) s += P[t * T + j] * dP[t * T + j];
            for (let j = 0; j < T; j++) dP[t * T + j] = j <= t ? P[t * T + j] * (dP[t * T + j] - s) * scale : 0;
          }
          const dQh = await mm(dP, T, T, KhT, D);
          const dKh = await mm(transpose(dP, T, T), T, T, transpose(Qh, T, D), D);
          for (let t = 0; t < T; t++)
            for (let c = 0; c < D; c++) {
              dqr[t * Hq * D + hq * D + c] = dQh[t * D + c];
              dkr[t * Hkv * D + h * D + c] += dKh[t * D + c];
              dv[t * Hkv * D + h * D + c] += dVh[t * D + c];
            }
        }
      }
      const dq = rotateRows(dqr, pos, Hq, D, cfg.invFreq, true), dk = rotateRows(dkr, pos, Hkv, D, cfg.invFreq, true);
      if (o.kv) kv[l] = { keys: tp.k, values: tp.v, keyGrads: dk, valueGrads: dv };
      await weightGrad(L.q, dq, tp.n1);
      await weightGrad(L.k, dk, tp.n1);
      await weightGrad(L.v, dv, tp.n1);
      const dn1 = await mm(dq, T, Hq * D, L.q.wt, H);
      addInto(dn1, await mm(dk, T, Hkv * D, L.k.wt, H));
      addInto(dn1, await mm(dv, T, Hkv * D, L.v.wt, H));
      const dxl = rmsNormBack(tp.x, tp.r1, L.inNorm, dn1, T, H);
      addInto(dxl, dx1);
      dx = dxl;
    }
    if (o.weights) this.windows++;
    return { loss, kv: o.kv ? kv : undefined, weightGrads: grads };
  }

  /**
   * The Fisher diagonal per decoder linear and of the lm_head (`lm_head.weight`, its use as the
   * output projection): squared weight gradients, mean over the windows so far.
   */
  fisher(): Map<string, { shape: [number, number]; data: F32 }> {
    const out = new Map<string, { shape: [number, number]; data: F32 }>();
    const mats: Array<Pick<Linear, 'name' | 'N' | 'K'>> = this.layers.flatMap((L) => [L.q, L.k, L.v, L.o, L.gate, L.up, L.down]);
    mats.push({ name: 'lm_head.weight', N: this.config.vocabSize, K: this.config.hiddenSize });
    for (const lin of mats) {
      const s = this.sq.get(lin.name);
      if (s) out.set(lin.name, { shape: [lin.N, lin.K], data: Float32Array.from(s, (v) => v / Math.max(1, this.windows)) });
    }
    return out;
  }
}

function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

/** y = x * r * w per row with r = 1/sqrt(mean(x²) + eps); returns [y, r]. */
function rmsNorm(x: F32, T: number, H: number, w: F32, eps: number): [F32, F32] {
  const y = new Float32Array(T * H), r = new Float32Array(T);
  for (let t = 0; t < T; t++) {
    let s = 0;
    for (let i = 0; i < H; i++) s += x[t * H + i] * x[t * H + i];
    const rt = 1 / Math.sqrt(s / H + eps);
    r[t] = rt;
    for (let i = 0; i < H; i++) y[t * H + i] = x[t * H + i] * rt * w[i];
  }
  return [y, r];
}

/** dx of rmsNorm: r (dy w) - x r³ Σ(dy w x) / H. */
function rmsNormBack(x: F32, r: F32, w: F32, dy: F32, T: number, H: number): F32 {
  const dx = new Float32Array(T * H);
  for (let t = 0; t < T; t++) {
    let s = 0;
    for (let i = 0; i < H; i++) s += dy[t * H + i] * w[i] * x[t * H + i];
    const rt = r[t], c = (rt * rt * rt * s) / H;
    for (let i = 0; i < H; i++) dx[t * H + i] = rt * dy[t * H + i] * w[i] - x[t * H + i] * c;
  }
  return dx;
}

/**
 * RoPE in place: each [heads*D] row r of x (a token at position pos[r]) rotated pair by pair
 * (x_i, x_{i+D/2}) by the position's angles, computed as the decoder's ops compute them (fp32
 * angle, then cos/sin rounded to fp32); `inverse` rotates back, which is also the backward pass of
 * a rotation (its transpose). Returns x.
 */
export function rotateRows(x: F32, pos: ArrayLike<number>, heads: number, D: number, invFreq: Float32Array, inverse = false): F32 {
  const half = D / 2, HD = heads * D, sg = inverse ? -1 : 1;
  for (let r = 0; r < pos.length; r++)
    for (let i = 0; i < half; i++) {
      const ang = Math.fround(pos[r] * invFreq[i]);
      const c = Math.fround(Math.cos(ang)), sn = sg * Math.fround(Math.sin(ang));
      for (let h = 0; h < heads; h++) {
        const o = r * HD + h * D, a = x[o + i], b = x[o + i + half];
        x[o + i] = a * c - b * sn;
        x[o + i + half] = b * c + a * sn;
      }
    }
  return x;
}

/** Row-wise softmax of scores * scale over keys j <= t (and t - j < window), in place; zero elsewhere. */
function softmaxCausal(S: F32, T: number, scale: number, window: number): F32 {
  for (let t = 0; t < T; t++) {
    const row = S.subarray(t * T, (t + 1) * T);
    const j0 = Math.max(0, t - window + 1);
    let mx = -Infinity;
    for (let j = j0; j <= t; j++) mx = Math.max(mx, row[j] * scale);
    let s = 0;
    for (let j = 0; j < T; j++) {
      const e = j >= j0 && j <= t ? Math.exp(row[j] * scale - mx) : 0;
      row[j] = e;
      s += e;
    }
    for (let j = j0; j <= t; j++) row[j] /= s;
  }
  return S;
}

export interface FisherOptions {
  /** Called after each window. */
  onProgress?: (done: number, total: number, loss: number) => void;
}

/**
 * The Fisher diagonal of every decoder linear and of the lm_head of the model in `dir` over `windows` (token ids):
 * written by `squeezelm fisher` in the checkpoint's tensor names, read by `quantize --fisher`.
 */
export async function computeFisher(dir: string, windows: Int32Array[], o: FisherOptions = {}): Promise<{ fisher: Map<string, { shape: [number, number]; data: F32 }>; loss: number }> {
  if (windows.length === 0) throw new SqueezeError('ERR_ARG', 'fisher: no calibration windows');
  const bp = Backprop.open(dir);
  let loss = 0;
  for (let i = 0; i < windows.length; i++) {
    const r = await bp.window(windows[i], { weights: true });
    loss += r.loss;
    o.onProgress?.(i + 1, windows.length, r.loss);
  }
  return { fisher: bp.fisher(), loss: loss / windows.length };
}

const USAGE = `usage: squeezelm fisher [--model DIR] --calib FILE --out FILE [--windows N] [--window L]
  The Fisher diagonal (mean squared loss gradient over the calibration windows) of every decoder
  linear and of the lm_head (its use as the output projection), fp32 on the CPU, in the checkpoint's tensor names: the file 'quantize --fisher' reads.
  FILE: a safetensors 'ids' [windows, L] file, or a text file cut into windows of L tokens
  (default 1024), as ppl reads it.`;

/** `squeezelm fisher ...` */
export async function fisherCommand(argv: string[], defaultModel: string): Promise<void> {
  const f: Record<string, string> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--help') { process.stdout.write(USAGE + '\n'); return; }
    const name = a.startsWith('--') ? a.slice(2) : '';
    if (!['model', 'calib', 'out', 'windows', 'window'].includes(name)) throw new SqueezeError('ERR_ARG', `fisher: unexpected argument '${a}'\n${USAGE}`);
    if (i + 1 >= argv.length) throw new SqueezeError('ERR_ARG', `--${name} needs a value`);
    f[name] = argv[++i];
  }
  const dir = f.model ?? defaultModel;
  if (!f.calib) throw new SqueezeError('ERR_ARG', `fisher: --calib FILE is required\n${USAGE}`);
  if (!f.out) throw new SqueezeError('ERR_ARG', `fisher: --out FILE is required\n${USAGE}`);
  if (!fs.existsSync(path.join(dir, 'config.json'))) throw new SqueezeError('ERR_ARG', `--model: ${dir} has no config.json`);
  const int = (name: string): number | undefined => {
    if (f[name] === undefined) return undefined;
    const n = Number(f[name]);
    if (!Number.isInteger(n) || n < 1) throw new SqueezeError('ERR_ARG', `--${name} must be a positive integer, got '${f[name]}'`);
    return n;
  };
  const max = int('windows'), window = int('window');
  // The windows as ppl and quantize --calib read them (ids, or text through the model's tokenizer).
  const model = await loadModel(dir, { device: 'cpu', maxBatch: 1 });
  let windows: Int32Array[];
  try {
    windows = loadPplData(model, f.calib, { windows: max, window }).windows;
  } finally {
    await model.dispose();
  }
  const t0 = Date.now();
  const { fisher, loss } = await computeFisher(dir, windows, {
    onProgress: (done, total) => {
      if (!process.stderr.isTTY && done !== total) return;
      const s = (Date.now() - t0) / 1000;
      process.stderr.write(`\rfisher: window ${done}/${total}, ${s.toFixed(0)} s, ~${((s / done) * (total - done)).toFixed(0)} s left${done === total ? '\n' : ''}`);
    },
  });
  const tensors: Record<string, { dtype: string; shape: number[]; data: ArrayBufferView }> = {};
  for (const [name, v] of fisher) tensors[name] = { dtype: 'f32', shape: v.shape, data: v.data };
  writeSafetensors(f.out, tensors, { format: 'squeezelm-fisher', windows: String(windows.length), loss: String(loss) });
  process.stdout.write(JSON.stringify({ out: f.out, linears: fisher.size, windows: windows.length, loss, seconds: (Date.now() - t0) / 1000 }) + '\n');
}
