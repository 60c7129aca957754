/**
 * Perplexity: windows of token ids scored as given (no BOS added), positions 1..L-1
 * predicted from the ones before; log-softmax in fp32 logits with fp64 sums on the host;
 * ppl = exp(mean of the per-window mean losses).
 */
import * as fs from 'fs';
import { SqueezeError } from '../errors';
import type { Model, SqueezeOptions } from '../model/model';
import { SafetensorsFile } from '../model/safetensors';
import { native } from '../native';

export interface PplData {
  windows: Int32Array[];
  length: number;
}

export interface PplOptions {
  /** Take the first N windows. */
  windows?: number;
  /** Window length: text files are cut into windows of it (default 1024), safetensors rows too (default: the row). */
  window?: number;
  /** Windows per prefill (default 1), or decoded together (decode). */
  batch?: number;
  /**
   * Decode-style: each window fed token by token (teacher-forced decode steps, `batch`
   * windows at once), so the model attends to its cache as generation does (a quantized
   * cache quantizes every key and value but the sink). Default: one prefill per window.
   */
  decode?: boolean;
  /** A LoRA adapter loaded with model.loadAdapter (absent: the base model). */
  adapter?: string;
  /**
   * Each window's first `tokens` tokens cached with model.cachePrefix (with `squeeze`: clustered),
   * the rest fed token by token over it; only those are scored. One window at a time, no adapter.
   */
  prefix?: { tokens: number; squeeze?: SqueezeOptions };
  onProgress?: (done: number, total: number) => void;
}

export interface PplResult {
  ppl: number;
  tokens: number;
  seconds: number;
  windows: number;
  device: string;
  /** Mean next-token loss of each window. */
  nll: number[];
  /** With `prefix.squeeze`: the clusters per kv head and how many each query attends (the first window's). */
  clusters?: number;
  topClusters?: number;
}

function isSafetensors(file: string): boolean {
  if (file.endsWith('.safetensors')) return true;
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(9);
    const n = fs.readSync(fd, b, 0, 9, 0);
    return n === 9 && b[8] === 0x7b && b.readBigUInt64LE(0) < BigInt(fs.fstatSync(fd).size);
  } finally {
    fs.closeSync(fd);
  }
}

/** Reads windows: a safetensors file with `ids` [windows, L] or a text file cut into windows. */
export function loadPplData(model: Model, file: string, opts: PplOptions = {}): PplData {
  if (!fs.existsSync(file)) throw new SqueezeError('ERR_ARG', `ppl: no file ${file}`);
  let windows: Int32Array[] = [];
  let L: number;
  if (isSafetensors(file)) {
    const st = SafetensorsFile.open(file);
    try {
      const e = st.entry('ids');
      if (e.shape.length !== 2) throw new SqueezeError('ERR_FORMAT', `${file}: tensor 'ids' must be [windows, length], got [${e.shape.join(', ')}]`);
      const ids = st.readInt32('ids');
      const row = e.shape[1];
      // opts.window cuts every row into consecutive windows of that many tokens (a row's tail
      // shorter than one window is left out), as a text file is cut
      L = opts.window ?? row;
      if (!Number.isInteger(L) || L < 2 || L > row)
        throw new SqueezeError('ERR_ARG', `ppl: window ${L} must be an integer in [2, ${row}], the length of ${file}'s windows`);
      for (let w = 0; w < e.shape[0]; w++)
        for (let s = 0; s + L <= row; s += L) windows.push(ids.subarray(w * row + s, w * row + s + L));
    } finally {
      st.close();
    }
  } else {
    if (!model.tokenizer) throw new SqueezeError('ERR_ARG', 'ppl: a text file needs a model with a tokenizer');
    L = opts.window ?? 1024;
    const ids = model.tokenizer.encode(fs.readFileSync(file, 'utf8'));
    for (let s = 0; s + L <= ids.length; s += L) windows.push(ids.subarray(s, s + L));
    if (!windows.length) throw new SqueezeError('ERR_ARG', `ppl: ${file} has ${ids.length} tokens, fewer than one window of ${L}`);
  }
  if (opts.windows !== undefined) {
    if (!Number.isInteger(opts.windows) || opts.windows < 1) throw new SqueezeError('ERR_ARG', `ppl: windows must be a positive integer`);
    windows = windows.slice(0, opts.windows);
  }
  if (L < 2) throw new SqueezeError('ERR_ARG', `ppl: windows of ${L} tokens predict nothing`);
  return { windows, length: L };
}

// Math.exp through a module binding: in a vm context (the test runner's sandbox) every lookup of
// the global Math goes through the context's interceptor, which slowed this loop many times there.
const exp = Math.exp;

/** -log softmax(logits[o .. o + V))[target]: one token's NLL, max-shifted. */
export function tokenNll(logits: Float32Array, o: number, V: number, target: number): number {
  let m = -Infinity;
  for (let v = 0; v < V; v++) if (logits[o + v] > m) m = logits[o + v];
  let s = 0;
  for (let v = 0; v < V; v++) s += exp(logits[o + v] - m);
  return m + Math.log(s) - logits[o + target];
}

/** Mean next-token NLL of one window from its logits [L, V]. */
export function windowNll(logits: Float32Array, ids: ArrayLike<number>, V: number): number {
  const L = ids.length;
  let sum = 0;
  for (let t = 0; t < L - 1; t++) sum += tokenNll(logits, t * V, V, ids[t + 1]);
  return sum / (L - 1);
}

/**
 * Per-row NLLs of logits [rows, V] (row r scored against targets[r]), natively on the host: the
 * arithmetic of tokenNll step for step (csrc/cpu/nll.cc), rows in parallel on a worker thread.
 */
export async function tokenNllRows(logits: Float32Array, V: number, targets: Int32Array): Promise<Float64Array> {
  return (await native().ops.tokenNll(logits, V, targets)) as Float64Array;
}

/** windowNll natively (tokenNllRows), the same sum in the same order. */
export async function windowNllNative(logits: Float32Array, ids: ArrayLike<number>, V: number): Promise<number> {
  const L = ids.length;
  const nll = await tokenNllRows(logits, V, Int32Array.from({ length: L - 1 }, (_, t) => ids[t + 1]));
  let sum = 0;
  for (let t = 0; t < L - 1; t++) sum += nll[t];
  return sum / (L - 1);
}

export async function perplexity(model: Model, data: PplData, opts: PplOptions = {}): Promise<PplResult> {
  const B = opts.batch ?? 1;
  if (!Number.isInteger(B) || B < 1) throw new SqueezeError('ERR_ARG', 'ppl: batch must be a positive integer');
  const P = opts.prefix?.tokens ?? 0;
  if (opts.prefix) {
    if (!Number.isInteger(P) || P < 1 || P > data.length - 2) throw new SqueezeError('ERR_ARG', `ppl: prefix tokens must be 1 .. ${data.length - 2} for windows of ${data.length}`);
    if (B !== 1 || opts.decode || opts.adapter !== undefined) throw new SqueezeError('ERR_ARG', 'ppl: a prefix takes one window at a time, decode-style, without an adapter');
  }
  const t0 = performance.now();
  const nll: number[] = [];
  const V = model.config.vocabSize;
  const total = data.windows.length;
  let clusters: number | undefined, topClusters: number | undefined;
  opts.onProgress?.(0, total);
  for (let i = 0; i < total; i += B) {
    if (opts.prefix) {
      const w = data.windows[i];
      const p = await model.cachePrefix(w.subarray(0, P), opts.prefix.squeeze ? { squeeze: opts.prefix.squeeze } : {});
      try {
        nll.push(...(await model.prefixNll(p, [w])));
        clusters ??= p.clusters;
        topClusters ??= p.topClusters;
      } finally {
        p.dispose();
      }
      opts.onProgress?.(nll.length, total);
      continue;
    }
    const chunk = data.windows.slice(i, i + B);
    if (opts.decode) {
      nll.push(...(await model.decodeNll(chunk, undefined, opts.adapter)));
    } else {
      const logits = await model.logitsBatch(chunk, { adapters: opts.adapter === undefined ? undefined : chunk.map(() => opts.adapter) });
      nll.push(...(await Promise.all(chunk.map((w, j) => windowNllNative(logits[j], w, V)))));
    }
    opts.onProgress?.(nll.length, total);
  }
  const mean = nll.reduce((a, b) => a + b, 0) / nll.length;
  return {
    ppl: Math.exp(mean),
    tokens: total * (data.length - 1 - P),
    seconds: (performance.now() - t0) / 1000,
    windows: total,
    device: model.device,
    nll,
    ...(clusters !== undefined ? { clusters, topClusters } : {}),
  };
}
