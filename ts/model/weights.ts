/**
 * Decoder weights on one device: read from a checkpoint (shapes checked against the
 * config, q|k|v and gate|up each fused into one matrix) or made at random on the device.
 * CPU keeps the matrices as stored (f16 / bf16 / f32) and runs f32 activations over them;
 * CUDA converts everything to the activation dtype (f16 or bf16).
 */
import { SqueezeError } from '../errors';
import { DType, Tensor } from '../tensor';
import * as ops from '../ops';
import { ModelConfig, lmHeadTied } from './config';
import { Checkpoint, toDType } from './safetensors';
import {
  SLICE_BYTES, SqueezeLinear, SqueezeLinearModule, concatSqueezeLinears, groupQuantized, loadQuantizedLinear, quantizeLinear, readSlice,
  uploadSqueezeLinear,
} from '../quant/squeezellm';

/** A linear's weight: a dense [out, in] matrix or a SqueezeLLM dense-and-sparse module. */
export type LinearWeight = Tensor | SqueezeLinearModule;

export interface LayerWeights {
  ln1: Tensor;
  /** q rows, then k rows, then v rows: [(Hq + 2 Hkv) D, H]; one matmul gives packed q|k|v. */
  wqkv: LinearWeight;
  bqkv?: Tensor;
  wo: LinearWeight;
  bo?: Tensor;
  ln2: Tensor;
  /** gate rows then up rows: [2I, H]. */
  wgu: LinearWeight;
  bgu?: Tensor;
  wdown: LinearWeight;
  bdown?: Tensor;
}

export interface ModelWeights {
  embed: Tensor;
  layers: LayerWeights[];
  norm: Tensor;
  /**
   * The output projection: embed itself when the embeddings are tied; a SqueezeLLM module when the
   * checkpoint holds `lm_head.qweight` (quantize --lm-head), the embeddings then staying dense.
   */
  lmHead: LinearWeight;
  tied: boolean;
  /** The dtype the matrices hold on the device. */
  dtype: DType;
  bytes: number;
}

export interface LoadProgress {
  loadedBytes: number;
  totalBytes: number;
}

export interface WeightOptions {
  device: string;
  /** Activation dtype: f32 (cpu), f16 or bf16 (cuda). */
  act: DType;
  onProgress?: (p: LoadProgress) => void;
}

/**
 * The half a quantized linear's rows are stored paired at on CUDA (csrc/cpu/lut_gemm.h, "Paired
 * rows"), so that the decode step's next small op runs in the projection's epilogue: gate|up at the
 * intermediate size (gate row j beside up row j: siluMul), q|k|v at half the head dim (each head's
 * rotation pair: RoPE and the cache append). 0 (not paired; the plain ops run) for o and down, on the
 * CPU, and where the half is not a multiple of 8.
 */
export function linearPairHalf(site: 'wqkv' | 'wo' | 'wgu' | 'wdown', cfg: ModelConfig, device: string): number {
  const half = site === 'wgu' ? cfg.intermediateSize : site === 'wqkv' ? cfg.headDim / 2 : 0;
  return device !== 'cpu' && Number.isInteger(half) && half > 0 && half % 8 === 0 ? half : 0;
}

export function disposeWeights(w: ModelWeights): void {
  // tensors and quantized modules alike; a tied lm_head is the embedding, disposed once
  type Owned = { dispose(): void };
  const seen = new Set<Owned>();
  const d = (t?: Owned) => {
    if (t && !seen.has(t)) {
      seen.add(t);
      t.dispose();
    }
  };
  d(w.embed);
  d(w.norm);
  d(w.lmHead);
  for (const l of w.layers) for (const t of Object.values(l)) d(t as Owned | undefined);
}

/** Names of one layer's tensors in a Hugging Face checkpoint. */
function layerName(i: number, s: string): string {
  return `model.layers.${i}.${s}`;
}

const tick = () => new Promise<void>((r) => setImmediate(r));

export async function loadWeights(ck: Checkpoint, cfg: ModelConfig, o: WeightOptions): Promise<ModelWeights> {
  const cpu = o.device === 'cpu';
  const H = cfg.hiddenSize, D = cfg.headDim, I = cfg.intermediateSize, V = cfg.vocabSize;
  // A quantized lm_head (`lm_head.qweight`) is never tied: the quantizer keeps the embeddings dense.
  const headQuantized = ck.has('lm_head.qweight');
  const tied = !headQuantized && lmHeadTied(cfg.tieWordEmbeddings, ck.has('lm_head.weight'));
  const names = ['model.embed_tokens.weight', 'model.norm.weight'];
  if (!tied && !headQuantized) names.push('lm_head.weight');
  for (let i = 0; i < cfg.numLayers; i++) {
    // SqueezeLLM linears (`<p>.qweight`) are checked by their own reader. q|k|v and gate|up run as
    // one fused linear each: quantized whole or not at all, checked here before any bytes move.
    const dense = (p: string) => !ck.has(`${p}.qweight`);
    groupQuantized(ck, ['q', 'k', 'v'].map((p) => layerName(i, `self_attn.${p}_proj`)), ck.describe());
    groupQuantized(ck, ['gate', 'up'].map((p) => layerName(i, `mlp.${p}_proj`)), ck.describe());
    for (const p of ['q', 'k', 'v', 'o']) if (dense(layerName(i, `self_attn.${p}_proj`))) names.push(layerName(i, `self_attn.${p}_proj.weight`));
    for (const p of ['gate', 'up', 'down']) if (dense(layerName(i, `mlp.${p}_proj`))) names.push(layerName(i, `mlp.${p}_proj.weight`));
    names.push(layerName(i, 'input_layernorm.weight'), layerName(i, 'post_attention_layernorm.weight'));
    if (cfg.qkvBias) for (const p of ['q', 'k', 'v']) names.push(layerName(i, `self_attn.${p}_proj.bias`));
    if (cfg.oBias) names.push(layerName(i, 'self_attn.o_proj.bias'));
    if (cfg.mlpBias) for (const p of ['gate', 'up', 'down']) names.push(layerName(i, `mlp.${p}_proj.bias`));
  }
  // Check presence, dtype and shape of everything before moving any bytes.
  let totalBytes = 0;
  const storedDtype = new Set<string>();
  for (const n of names) {
    const e = ck.entry(n);
    if (!toDType(e.dtype) || !['F16', 'BF16', 'F32'].includes(e.dtype))
      throw new SqueezeError('ERR_FORMAT', `${e.file}: tensor '${n}' has dtype ${e.dtype}, expected F16, BF16 or F32`);
    if (e.shape.length === 2) storedDtype.add(e.dtype);
    totalBytes += e.end - e.begin;
  }
  const expect = (n: string, shape: number[]) => {
    if (n.endsWith('.weight') && ck.has(`${n.slice(0, -'.weight'.length)}.qweight`)) return;
    const e = ck.entry(n);
    if (e.shape.length !== shape.length || e.shape.some((s, i) => s !== shape[i]))
      throw new SqueezeError('ERR_FORMAT', `${e.file}: tensor '${n}' has shape [${e.shape.join(', ')}], config says [${shape.join(', ')}]`);
  };
  expect('model.embed_tokens.weight', [V, H]);
  expect('model.norm.weight', [H]);
  if (!tied && !headQuantized) expect('lm_head.weight', [V, H]);
  for (let i = 0; i < cfg.numLayers; i++) {
    expect(layerName(i, 'self_attn.q_proj.weight'), [cfg.numHeads * D, H]);
    expect(layerName(i, 'self_attn.k_proj.weight'), [cfg.numKvHeads * D, H]);
    expect(layerName(i, 'self_attn.v_proj.weight'), [cfg.numKvHeads * D, H]);
    expect(layerName(i, 'self_attn.o_proj.weight'), [H, cfg.numHeads * D]);
    expect(layerName(i, 'mlp.gate_proj.weight'), [I, H]);
    expect(layerName(i, 'mlp.up_proj.weight'), [I, H]);
    expect(layerName(i, 'mlp.down_proj.weight'), [H, I]);
    expect(layerName(i, 'input_layernorm.weight'), [H]);
    expect(layerName(i, 'post_attention_layernorm.weight'), [H]);
    if (cfg.qkvBias) {
      expect(layerName(i, 'self_attn.q_proj.bias'), [cfg.numHeads * D]);
      expect(layerName(i, 'self_attn.k_proj.bias'), [cfg.numKvHeads * D]);
      expect(layerName(i, 'self_attn.v_proj.bias'), [cfg.numKvHeads * D]);
    }
    if (cfg.oBias) expect(layerName(i, 'self_attn.o_proj.bias'), [H]);
    if (cfg.mlpBias) {
      expect(layerName(i, 'mlp.gate_proj.bias'), [I]);
      expect(layerName(i, 'mlp.up_proj.bias'), [I]);
      expect(layerName(i, 'mlp.down_proj.bias'), [H]);
    }
  }
  // CPU: matrices as stored when the checkpoint has one float dtype; else f32.
  const matDtype: DType = cpu ? (storedDtype.size === 1 ? toDType([...storedDtype][0])! : 'f32') : o.act;
  let loaded = 0;
  const made: Tensor[] = [];
  const report = () => o.onProgress?.({ loadedBytes: loaded, totalBytes });

  /** Uploads host data of safetensors dtype `st` as `want` on the device. */
  const upload = (st: string, data: ArrayBufferView, shape: number[], want: DType): Tensor => {
    const have = toDType(st)!;
    const t = Tensor.from(data, shape, { dtype: have, device: o.device });
    if (have === want) return t;
    const c = Tensor.empty(shape, { dtype: want, device: o.device });
    ops.cast(c, t);
    t.dispose();
    return c;
  };
  const load = async (n: string, vector = false): Promise<Tensor> => {
    const { dtype, shape, data } = ck.read(n);
    const t = upload(dtype, data, shape, vector && cpu ? 'f32' : matDtype);
    made.push(t);
    loaded += data.byteLength;
    report();
    await tick();
    return t;
  };
  /** Concatenates tensors along dim 0 on the host (same stored dtype) and uploads them. */
  const loadCat = async (ns: string[], vector = false): Promise<Tensor> => {
    const parts = ns.map((n) => ck.read(n));
    const st = parts[0].dtype;
    if (parts.some((p) => p.dtype !== st))
      throw new SqueezeError('ERR_FORMAT', `${ck.describe()}: tensors ${ns.join(', ')} differ in dtype`);
    const bytes = parts.reduce((a, p) => a + p.data.byteLength, 0);
    const buf = new Uint8Array(new ArrayBuffer(bytes));
    let off = 0;
    for (const p of parts) {
      buf.set(new Uint8Array(p.data.buffer, p.data.byteOffset, p.data.byteLength), off);
      off += p.data.byteLength;
    }
    const shape = [parts.reduce((a, p) => a + p.shape[0], 0), ...parts[0].shape.slice(1)];
    const el = st === 'F32' ? new Float32Array(buf.buffer) : new Uint16Array(buf.buffer);
    const t = upload(st, el, shape, vector && cpu ? 'f32' : matDtype);
    made.push(t);
    loaded += bytes;
    report();
    await tick();
    return t;
  };

  /** A SqueezeLLM linear (or fused group) when the checkpoint holds `<prefix>.qweight`s. */
  const quant = (prefixes: string[], K: number, N: number, pairHalf = 0): SqueezeLinearModule | undefined => {
    const m = loadQuantizedLinear(ck, prefixes, K, o.device, cpu ? 'f32' : o.act, { pairHalf });
    if (!m) return undefined;
    modules.push(m);
    if (m.N !== N) throw new SqueezeError('ERR_FORMAT', `${ck.describe()}: ${prefixes.join(' + ')} have ${m.N} outputs, config says ${N}`);
    loaded += m.bytes;
    return m;
  };
  const modules: SqueezeLinearModule[] = [];

  try {
    report();
    const embed = await load('model.embed_tokens.weight');
    const layers: LayerWeights[] = [];
    for (let i = 0; i < cfg.numLayers; i++) {
      const n = (s: string) => layerName(i, s);
      const l: LayerWeights = {
        ln1: await load(n('input_layernorm.weight'), true),
        wqkv: quant(['q', 'k', 'v'].map((p) => n(`self_attn.${p}_proj`)), H, (cfg.numHeads + 2 * cfg.numKvHeads) * D,
          linearPairHalf('wqkv', cfg, o.device))
          ?? await loadCat(['q', 'k', 'v'].map((p) => n(`self_attn.${p}_proj.weight`))),
        wo: quant([n('self_attn.o_proj')], cfg.numHeads * D, H) ?? await load(n('self_attn.o_proj.weight')),
        ln2: await load(n('post_attention_layernorm.weight'), true),
        wgu: quant([n('mlp.gate_proj'), n('mlp.up_proj')], H, 2 * I, linearPairHalf('wgu', cfg, o.device))
          ?? await loadCat([n('mlp.gate_proj.weight'), n('mlp.up_proj.weight')]),
        wdown: quant([n('mlp.down_proj')], I, H) ?? await load(n('mlp.down_proj.weight')),
      };
      if (cfg.qkvBias) l.bqkv = await loadCat(['q', 'k', 'v'].map((p) => n(`self_attn.${p}_proj.bias`)), true);
      if (cfg.oBias) l.bo = await load(n('self_attn.o_proj.bias'), true);
      if (cfg.mlpBias) {
        l.bgu = await loadCat([n('mlp.gate_proj.bias'), n('mlp.up_proj.bias')], true);
        l.bdown = await load(n('mlp.down_proj.bias'), true);
      }
      layers.push(l);
    }
    const norm = await load('model.norm.weight', true);
    const lmHead = tied ? embed : quant(['lm_head'], H, V) ?? await load('lm_head.weight');
    return { embed, layers, norm, lmHead, tied, dtype: matDtype,
      bytes: made.reduce((a, t) => a + t.byteLength, 0) + modules.reduce((a, m) => a + m.bytes, 0) };
  } catch (e) {
    made.forEach((t) => t.dispose());
    modules.forEach((m) => m.dispose());
    throw e;
  }
}

/**
 * The tensors of a random model, made on the device in seed order (each fill takes the next
 * seed): normal(0, std) matrices in the weight dtype, norm weights of ones and biases in the
 * vector dtype (f32 on the CPU). Every tensor made is kept, so a failure frees them all.
 */
class RandomTensors {
  readonly made: Tensor[] = [];
  readonly std: number;
  private seed: number;
  private readonly vecDtype: DType;
  constructor(private readonly o: { device: string; dtype: DType; seed?: number; std?: number }) {
    this.seed = (o.seed ?? 1) >>> 0;
    this.std = o.std ?? 0.02;
    this.vecDtype = o.device === 'cpu' ? 'f32' : o.dtype;
  }
  nextSeed(): number {
    return this.seed++;
  }
  private keep(shape: number[], dtype: DType): Tensor {
    const t = Tensor.empty(shape, { dtype, device: this.o.device });
    this.made.push(t);
    return t;
  }
  matrix(shape: number[]): Tensor {
    const t = this.keep(shape, this.o.dtype);
    ops.fillRandom(t, this.nextSeed(), 0, this.std);
    return t;
  }
  ones(n: number): Tensor {
    const t = this.keep([n], this.vecDtype);
    ops.fill(t, 1);
    return t;
  }
  bias(n: number): Tensor {
    const t = this.keep([n], this.vecDtype);
    ops.fillRandom(t, this.nextSeed(), 0, this.std);
    return t;
  }
  get bytes(): number {
    return this.made.reduce((a, t) => a + t.byteLength, 0);
  }
  dispose(): void {
    this.made.forEach((t) => t.dispose());
  }
}

/**
 * Random weights made on the device (normal, std 0.02; norms 1): for benchmarks at real
 * shapes without a checkpoint.
 */
export function randomWeights(cfg: ModelConfig, o: { device: string; dtype: DType; seed?: number; std?: number }): ModelWeights {
  const H = cfg.hiddenSize, D = cfg.headDim, I = cfg.intermediateSize, V = cfg.vocabSize;
  const r = new RandomTensors(o);
  const rand = (shape: number[]) => r.matrix(shape), ones = (n: number) => r.ones(n), bias = (n: number) => r.bias(n);
  try {
    const embed = rand([V, H]);
    const layers: LayerWeights[] = [];
    for (let i = 0; i < cfg.numLayers; i++) {
      const l: LayerWeights = {
        ln1: ones(H),
        wqkv: rand([(cfg.numHeads + 2 * cfg.numKvHeads) * D, H]),
        wo: rand([H, cfg.numHeads * D]),
        ln2: ones(H),
        wgu: rand([2 * I, H]),
        wdown: rand([H, I]),
      };
      if (cfg.qkvBias) l.bqkv = bias((cfg.numHeads + 2 * cfg.numKvHeads) * D);
      if (cfg.oBias) l.bo = bias(H);
      if (cfg.mlpBias) {
        l.bgu = bias(2 * I);
        l.bdown = bias(H);
      }
      layers.push(l);
    }
    const norm = ones(H);
    const lmHead = cfg.tieWordEmbeddings ? embed : rand([V, H]);
    return { embed, layers, norm, lmHead, tied: cfg.tieWordEmbeddings, dtype: o.dtype, bytes: r.bytes };
  } catch (e) {
    r.dispose();
    throw e;
  }
}

/**
 * A random normal(0, std) [N, K] matrix made on the device in f32, read back and quantized on its
 * own (k-means on the device, dense-and-sparse with magnitude outliers), then freed. `host`: a
 * buffer of at least N K floats to reuse; `seconds` gains the time making and quantizing took.
 */
export async function randomSqueezeLinear(N: number, K: number, o: {
  device: string; seed: number; std?: number; bits: 3 | 4; outliers?: number; iters?: number; host?: Float32Array;
  seconds?: { make: number; quantize: number };
}): Promise<SqueezeLinear> {
  const since = (t0: number) => (performance.now() - t0) / 1000;
  let t0 = performance.now();
  const src = Tensor.empty([N, K], { dtype: 'f32', device: o.device });
  try {
    ops.fillRandom(src, o.seed, 0, o.std ?? 0.02);
    const w = await readF32(src, o.host && o.host.length >= N * K ? o.host : new Float32Array(N * K));
    if (o.seconds) o.seconds.make += since(t0);
    t0 = performance.now();
    const q = await quantizeLinear(w, N, K, { bits: o.bits, outliers: o.outliers ?? 0.0045, iters: o.iters, device: o.device, deviceWeight: src });
    if (o.seconds) o.seconds.quantize += since(t0);
    return q;
  } finally {
    src.dispose();
  }
}

/** SqueezeLLM quantization of a random model's decoder linears (createRandomModel's `quantize`). */
export interface RandomQuantizeOptions {
  bits: 3 | 4;
  /**
   * Share of each matrix kept exact in the sparse part (default 0.0045, i.e. 0.45%), picked by
   * magnitude: random weights come with no sensitivity, so there are no sensitive outliers.
   */
  outliers?: number;
  /** k-means iterations (default 30). */
  iters?: number;
  /**
   * Quantize the lm_head too (a random [vocab, hidden] matrix of its own, the embeddings staying
   * dense and untied), as `squeezelm quantize --lm-head` does for a checkpoint. Default false.
   */
  lmHead?: boolean;
  /** Called after each linear is quantized (and, where that completes a fused group, uploaded). */
  onProgress?: (p: RandomQuantizeProgress) => void;
  /**
   * Called with each quantized linear's host arrays before upload, named as in a checkpoint
   * (`model.layers.3.mlp.up_proj`), e.g. to keep them (squeezeTensors writes them out).
   */
  onLinear?: (name: string, linear: SqueezeLinear) => void;
}

export interface RandomQuantizeProgress {
  /** Layers whose linears are all quantized and on the device. */
  layersDone: number;
  layers: number;
  linearsDone: number;
  linears: number;
  /** The linear just quantized. */
  name: string;
  /**
   * Host wall time so far, in seconds: making the random weights and reading them back
   * (`make`), quantizing (`quantize`: outliers, k-means on the model's device, packing), and
   * fusing and uploading the modules (`upload`).
   */
  seconds: { make: number; quantize: number; upload: number };
}

/** t's f32 values into dst, read back in slices (no host copy of the whole matrix besides dst). */
async function readF32(t: Tensor, dst: Float32Array): Promise<Float32Array> {
  const n = t.numel, slice = SLICE_BYTES >> 2;
  for (let off = 0; off < n; off += slice) dst.set((await readSlice(t, off, Math.min(slice, n - off))) as Float32Array, off);
  return dst.subarray(0, n);
}

/**
 * Random weights (as randomWeights: normal, std 0.02; norms 1) whose decoder linears are
 * SqueezeLLM-quantized in process: every q, k, v, o, gate, up and down matrix is made on the
 * device in f32, read back, quantized on its own with quantizeLinear (k-means on the device,
 * dense-and-sparse with magnitude outliers) and freed; q|k|v and gate|up are fused as the loader
 * fuses a quantized checkpoint's. Embeddings and lm_head stay dense in `dtype`. Deterministic for
 * a seed; the matrices are not those randomWeights makes for the same seed.
 */
export async function randomQuantizedWeights(cfg: ModelConfig, o: {
  device: string; dtype: DType; act: DType; seed?: number; std?: number; quantize: RandomQuantizeOptions;
}): Promise<ModelWeights> {
  const qo = o.quantize;
  if (qo.bits !== 3 && qo.bits !== 4) throw new SqueezeError('ERR_UNSUPPORTED', `quantize.bits must be 3 or 4, got ${qo.bits}`);
  const outliers = qo.outliers ?? 0.0045;
  if (!(outliers >= 0 && outliers < 1)) throw new SqueezeError('ERR_ARG', `quantize.outliers must be a share in [0, 1), got ${outliers}`);
  const H = cfg.hiddenSize, D = cfg.headDim, I = cfg.intermediateSize, V = cfg.vocabSize;
  const cpu = o.device === 'cpu';
  const r = new RandomTensors(o);
  const rand = (shape: number[]) => r.matrix(shape), ones = (n: number) => r.ones(n), bias = (n: number) => r.bias(n);
  const modules: SqueezeLinearModule[] = [];
  // One linear per group member, fused like a quantized checkpoint's q|k|v and gate|up.
  const groups: Array<{ site: 'wqkv' | 'wo' | 'wgu' | 'wdown'; parts: Array<[string, number, number]> }> = [
    { site: 'wqkv', parts: [['self_attn.q_proj', cfg.numHeads * D, H], ['self_attn.k_proj', cfg.numKvHeads * D, H], ['self_attn.v_proj', cfg.numKvHeads * D, H]] },
    { site: 'wo', parts: [['self_attn.o_proj', H, cfg.numHeads * D]] },
    { site: 'wgu', parts: [['mlp.gate_proj', I, H], ['mlp.up_proj', I, H]] },
    { site: 'wdown', parts: [['mlp.down_proj', H, I]] },
  ];
  const linears = cfg.numLayers * 7 + (qo.lmHead ? 1 : 0);
  const host = new Float32Array(Math.max(...groups.flatMap((g) => g.parts.map(([, N, K]) => N * K)), qo.lmHead ? V * H : 0));
  const seconds = { make: 0, quantize: 0, upload: 0 };
  let linearsDone = 0;
  const since = (t0: number) => (performance.now() - t0) / 1000;
  const quantizeRandom = (N: number, K: number): Promise<SqueezeLinear> =>
    randomSqueezeLinear(N, K, { device: o.device, seed: r.nextSeed(), std: r.std, bits: qo.bits, outliers, iters: qo.iters, host, seconds });
  try {
    const embed = rand([V, H]);
    const layers: LayerWeights[] = [];
    for (let i = 0; i < cfg.numLayers; i++) {
      const l: Partial<LayerWeights> = { ln1: ones(H), ln2: ones(H) };
      for (const g of groups) {
        const quantized: SqueezeLinear[] = [];
        for (let p = 0; p < g.parts.length; p++) {
          const [name, N, K] = g.parts[p];
          const q = await quantizeRandom(N, K);
          const full = layerName(i, name);
          qo.onLinear?.(full, q);
          quantized.push(q);
          linearsDone++;
          if (p === g.parts.length - 1) {
            const t0 = performance.now();
            const m = uploadSqueezeLinear(concatSqueezeLinears(quantized), o.device, cpu ? 'f32' : o.act,
              { pairHalf: linearPairHalf(g.site, cfg, o.device) });
            modules.push(m);
            l[g.site] = m;
            seconds.upload += since(t0);
          }
          qo.onProgress?.({
            layersDone: i + (g.site === 'wdown' && p === g.parts.length - 1 ? 1 : 0), layers: cfg.numLayers,
            linearsDone, linears, name: full, seconds: { ...seconds },
          });
        }
      }
      // Biases stay dense beside the quantized linears (the decoder adds them after the product).
      if (cfg.qkvBias) l.bqkv = bias((cfg.numHeads + 2 * cfg.numKvHeads) * D);
      if (cfg.oBias) l.bo = bias(H);
      if (cfg.mlpBias) {
        l.bgu = bias(2 * I);
        l.bdown = bias(H);
      }
      layers.push(l as LayerWeights);
    }
    const norm = ones(H);
    let lmHead: LinearWeight;
    if (qo.lmHead) {
      const q = await quantizeRandom(V, H);
      qo.onLinear?.('lm_head', q);
      const t0 = performance.now();
      const m = uploadSqueezeLinear(q, o.device, cpu ? 'f32' : o.act);
      modules.push(m);
      lmHead = m;
      seconds.upload += since(t0);
      linearsDone++;
      qo.onProgress?.({ layersDone: cfg.numLayers, layers: cfg.numLayers, linearsDone, linears, name: 'lm_head', seconds: { ...seconds } });
    } else {
      lmHead = cfg.tieWordEmbeddings ? embed : rand([V, H]);
    }
    return { embed, layers, norm, lmHead, tied: cfg.tieWordEmbeddings && !qo.lmHead, dtype: o.dtype,
      bytes: r.bytes + modules.reduce((a, m) => a + m.bytes, 0) };
  } catch (e) {
    r.dispose();
    modules.forEach((m) => m.dispose());
    throw e;
  }
}
