/**
 * Model configuration: config.json (llama, mistral, qwen2) normalised, with the rotary
 * inverse frequencies computed the way transformers computes them (float32 arithmetic).
 */
import * as fs from 'fs';
import * as path from 'path';
import { SqueezeError } from '../errors';

export type RopeType = 'default' | 'linear' | 'llama3';

export interface RopeConfig {
  type: RopeType;
  theta: number;
  factor?: number;
  lowFreqFactor?: number;
  highFreqFactor?: number;
  originalMaxPositionEmbeddings?: number;
}

export interface ModelConfig {
  modelType: 'llama' | 'mistral' | 'qwen2';
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  rmsNormEps: number;
  maxPositionEmbeddings: number;
  /** From tie_word_embeddings; the loader also ties when lm_head.weight is absent. */
  tieWordEmbeddings: boolean;
  /** q/k/v projections carry a bias (llama attention_bias; always for qwen2). */
  qkvBias: boolean;
  /** o_proj carries a bias (llama attention_bias). */
  oBias: boolean;
  /** gate/up/down carry biases (llama mlp_bias). */
  mlpBias: boolean;
  rope: RopeConfig;
  /** Rotary inverse frequencies, [headDim / 2]. */
  invFreq: Float32Array;
  /** The checkpoint's dtype as declared (torch_dtype / dtype). */
  dtype: 'f16' | 'bf16' | 'f32';
  bosTokenId?: number;
  eosTokenIds: number[];
  /** Mistral's sliding window, where one is set (the context is capped to it). */
  slidingWindow?: number;
  /** The config.json object as read. */
  raw: Record<string, unknown>;
}

const SUPPORTED = ['llama', 'mistral', 'qwen2'];

function bad(src: string, msg: string): SqueezeError {
  return new SqueezeError('ERR_FORMAT', `${src}: ${msg}`);
}

function int(j: Record<string, unknown>, key: string, src: string, dflt?: number): number {
  const v = j[key] ?? dflt;
  if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) throw bad(src, `'${key}' must be a positive integer, got ${JSON.stringify(j[key])}`);
  return v;
}

function num(v: unknown, key: string, src: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) throw bad(src, `'${key}' must be a positive number, got ${JSON.stringify(v)}`);
  return v;
}

const f = Math.fround;

/**
 * inv_freq as transformers computes it: 1 / base^(arange(0, dim, 2) / dim) in float32,
 * then the scaling rule of the rope type.
 */
export function computeInvFreq(headDim: number, rope: RopeConfig): Float32Array {
  const half = headDim >> 1;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const e = f(f(2 * i) / headDim);
    inv[i] = f(1 / f(Math.pow(rope.theta, e)));
  }
  if (rope.type === 'linear') {
    for (let i = 0; i < half; i++) inv[i] = f(inv[i] / rope.factor!);
  } else if (rope.type === 'llama3') {
    const factor = rope.factor!, lo = rope.lowFreqFactor!, hi = rope.highFreqFactor!;
    const old = rope.originalMaxPositionEmbeddings!;
    const lowWavelen = old / lo, highWavelen = old / hi;
    for (let i = 0; i < half; i++) {
      const x = inv[i];
      const wavelen = f(f(2 * Math.PI) / x);
      let y = wavelen > lowWavelen ? f(x / factor) : x;
      const medium = !(wavelen < highWavelen) && !(wavelen > lowWavelen);
      if (medium) {
        const smooth = f(f(f(old / wavelen) - lo) / (hi - lo));
        y = f(f(f(f(1 - smooth) * y) / factor) + f(smooth * y));
      }
      inv[i] = y;
    }
  }
  return inv;
}

function parseRope(j: Record<string, unknown>, src: string): RopeConfig {
  const params = (j.rope_parameters ?? null) as Record<string, unknown> | null;
  const scaling = (j.rope_scaling ?? null) as Record<string, unknown> | null;
  const theta = num(j.rope_theta ?? params?.rope_theta ?? 10000, 'rope_theta', src);
  const s = scaling ?? params ?? {};
  if (typeof s !== 'object') throw bad(src, 'rope_scaling must be an object');
  const type = String(s.rope_type ?? s.type ?? 'default');
  switch (type) {
    case 'default':
      return { type: 'default', theta };
    case 'linear':
      return { type: 'linear', theta, factor: num(s.factor, 'rope factor', src) };
    case 'llama3':
      return {
        type: 'llama3',
        theta,
        factor: num(s.factor, 'rope factor', src),
        lowFreqFactor: num(s.low_freq_factor, 'low_freq_factor', src),
        highFreqFactor: num(s.high_freq_factor, 'high_freq_factor', src),
        originalMaxPositionEmbeddings: num(s.original_max_position_embeddings, 'original_max_position_embeddings', src),
      };
    default:
      throw new SqueezeError('ERR_UNSUPPORTED', `${src}: rope scaling type '${type}' is not supported (default, linear, llama3)`);
  }
}

function parseDtype(v: unknown): 'f16' | 'bf16' | 'f32' {
  switch (v) {
    case 'bfloat16': return 'bf16';
    case 'float32': return 'f32';
    default: return 'f16';
  }
}

function ids(v: unknown): number[] {
  if (typeof v === 'number') return [v];
  if (Array.isArray(v)) return v.filter((x) => typeof x === 'number');
  return [];
}

/** Normalises a parsed config.json; `src` names it in messages. */
export function parseConfig(j: Record<string, unknown>, src = 'config.json', generation?: Record<string, unknown>): ModelConfig {
  if (!j || typeof j !== 'object') throw bad(src, 'not a JSON object');
  const mt = j.model_type;
  if (typeof mt !== 'string' || !SUPPORTED.includes(mt)) {
    const arch = Array.isArray(j.architectures) ? ` (${j.architectures.join(', ')})` : '';
    throw new SqueezeError('ERR_UNSUPPORTED', `${src}: model_type '${String(mt)}'${arch} is not supported (llama, mistral, qwen2)`);
  }
  const act = j.hidden_act ?? j.hidden_activation ?? 'silu';
  if (act !== 'silu') throw new SqueezeError('ERR_UNSUPPORTED', `${src}: hidden_act '${String(act)}' is not supported (silu)`);
  const hidden = int(j, 'hidden_size', src);
  const heads = int(j, 'num_attention_heads', src);
  const kvHeads = int(j, 'num_key_value_heads', src, heads);
  if (heads % kvHeads !== 0) throw bad(src, `num_attention_heads ${heads} is not a multiple of num_key_value_heads ${kvHeads}`);
  const headDim = j.head_dim == null ? hidden / heads : int(j, 'head_dim', src);
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) throw bad(src, `head_dim ${headDim} must be an even integer`);
  if (typeof j.partial_rotary_factor === 'number' && j.partial_rotary_factor !== 1)
    throw new SqueezeError('ERR_UNSUPPORTED', `${src}: partial_rotary_factor ${j.partial_rotary_factor} is not supported`);
  const rope = parseRope(j, src);
  const attnBias = j.attention_bias === true;
  const qwen = mt === 'qwen2';
  const eps = num(j.rms_norm_eps ?? 1e-6, 'rms_norm_eps', src);
  let slidingWindow: number | undefined;
  const sw = j.sliding_window;
  if (typeof sw === 'number' && sw > 0 && (mt === 'mistral' || (qwen && j.use_sliding_window === true))) slidingWindow = sw;
  const eos = ids(generation?.eos_token_id).length ? ids(generation?.eos_token_id) : ids(j.eos_token_id);
  return {
    modelType: mt as ModelConfig['modelType'],
    vocabSize: int(j, 'vocab_size', src),
    hiddenSize: hidden,
    intermediateSize: int(j, 'intermediate_size', src),
    numLayers: int(j, 'num_hidden_layers', src),
    numHeads: heads,
    numKvHeads: kvHeads,
    headDim,
    rmsNormEps: eps,
    maxPositionEmbeddings: int(j, 'max_position_embeddings', src, 2048),
    tieWordEmbeddings: j.tie_word_embeddings === true,
    qkvBias: qwen || attnBias,
    oBias: !qwen && attnBias,
    mlpBias: !qwen && j.mlp_bias === true,
    rope,
    invFreq: computeInvFreq(headDim, rope),
    dtype: parseDtype(j.torch_dtype ?? j.dtype),
    bosTokenId: typeof j.bos_token_id === 'number' ? j.bos_token_id : undefined,
    eosTokenIds: eos,
    slidingWindow,
    raw: j,
  };
}

/** Reads DIR/config.json (and generation_config.json where present). */
export function loadConfig(dir: string): ModelConfig {
  const file = path.join(dir, 'config.json');
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new SqueezeError('ERR_FORMAT', `${file}: ${(e as Error).message}`);
  }
  let gen: Record<string, unknown> | undefined;
  try {
    gen = JSON.parse(fs.readFileSync(path.join(dir, 'generation_config.json'), 'utf8'));
  } catch {
    gen = undefined;
  }
  return parseConfig(j, file, gen);
}

/** Whether a checkpoint's lm_head is its embedding matrix: tie_word_embeddings, or no lm_head.weight stored. */
export function lmHeadTied(tieWordEmbeddings: boolean, hasLmHeadWeight: boolean): boolean {
  return tieWordEmbeddings || !hasLmHeadWeight;
}

/** Parameter count of the dense model the config describes. */
export function parameterCount(c: ModelConfig, tied = c.tieWordEmbeddings): number {
  const H = c.hiddenSize, D = c.headDim, I = c.intermediateSize;
  const qkv = H * (c.numHeads + 2 * c.numKvHeads) * D + (c.qkvBias ? (c.numHeads + 2 * c.numKvHeads) * D : 0);
  const o = c.numHeads * D * H + (c.oBias ? H : 0);
  const mlp = 3 * H * I + (c.mlpBias ? 2 * I + H : 0);
  const layer = qkv + o + mlp + 2 * H;
  return c.numLayers * layer + c.vocabSize * H * (tied ? 1 : 2) + H;
}
