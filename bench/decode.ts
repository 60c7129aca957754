/**
 * Decoder benchmark at LLaMA-2-7B shapes with random fp16 weights made on the GPU:
 * decode tokens/s at batch 1 (graphs on and off), 8 and 32, against the bandwidth floor
 * (weight bytes / device copy bandwidth measured in the same run), and prefill of a
 * 2048-token prompt in TFLOP/s against cuBLAS's fp16 GEMM at 2048x4096x4096.
 */
import { Tensor } from '../ts/tensor';
import { native } from '../ts/native';
import { resolveDevice, synchronize } from '../ts/device';
import * as ops from '../ts/ops';
import { createRandomModel, Model } from '../ts/model/model';

export const LLAMA2_7B = {
  model_type: 'llama',
  hidden_size: 4096,
  intermediate_size: 11008,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 32,
  vocab_size: 32000,
  max_position_embeddings: 4096,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  torch_dtype: 'float16',
  tie_word_embeddings: false,
};

export interface DecodeBenchOptions {
  device?: string;
  /** Device-to-device copy bandwidth in bytes/s, when the caller measured it already. */
  copyBandwidth?: number;
  /** A model config to use instead of LLaMA-2-7B (e.g. a smaller one for a quick check). */
  config?: Record<string, unknown>;
  /** Decode batch sizes (default [1, 8, 32]). */
  batches?: number[];
  /** Prefill prompt length (default 2048). */
  prefillTokens?: number;
  /** Tokens timed per decode measurement (default 64). */
  decodeTokens?: number;
  log?: (line: string) => void;
}

export interface DecodeRow {
  name: string;
  batch?: number;
  graphs?: boolean;
  tokensPerSecond?: number;
  msPerStep?: number;
  /** Fraction of the bandwidth floor (batch-1 style: every step reads every weight once). */
  fractionOfFloor?: number;
  tflops?: number;
  ratioToCublas?: number;
  seconds?: number;
}

export interface DecodeBenchResult {
  suite: 'decode';
  device: string;
  config: Record<string, unknown>;
  weightBytes: number;
  copyBandwidth: number;
  /** Tokens/s at batch 1 if every step only read the weights at copy bandwidth. */
  floorTokensPerSecond: number;
  cublasTflops?: number;
  rows: DecodeRow[];
}

async function timeEvents(device: string, iters: number, fn: () => void): Promise<number> {
  const n = native();
  fn();
  await synchronize(device);
  const a = n.createEvent(device), b = n.createEvent(device);
  try {
    a.record();
    for (let i = 0; i < iters; i++) fn();
    b.record();
    await synchronize(device);
    return n.elapsedMs(a, b) / iters;
  } finally {
    a.dispose();
    b.dispose();
  }
}

/** Device-to-device copy bandwidth (read + write bytes per second) over 1 GiB buffers. */
export async function copyBandwidth(device: string): Promise<number> {
  const n = 1 << 29;
  const a = Tensor.empty([n], { dtype: 'f16', device }), b = Tensor.empty([n], { dtype: 'f16', device });
  try {
    ops.fill(a, 1);
    const ms = await timeEvents(device, 10, () => ops.copy(b, a));
    return (2 * a.byteLength) / (ms / 1000);
  } finally {
    a.dispose();
    b.dispose();
  }
}

/** cuBLAS fp16 GEMM rate at M x N x K (TFLOP/s), or undefined where cuBLAS is absent. */
export async function cublasTflops(device: string, M = 2048, N = 4096, K = 4096): Promise<number | undefined> {
  if (!ops.cublasAvailable()) return undefined;
  const x = Tensor.empty([M, K], { dtype: 'f16', device });
  const w = Tensor.empty([N, K], { dtype: 'f16', device });
  const y = Tensor.empty([M, N], { dtype: 'f16', device });
  try {
    ops.fillRandom(x, 1, 0, 1);
    ops.fillRandom(w, 2, 0, 0.02);
    const ms = await timeEvents(device, 20, () => ops.cublasMatmul(y, x, w));
    return (2 * M * N * K) / (ms / 1000) / 1e12;
  } finally {
    x.dispose();
    w.dispose();
    y.dispose();
  }
}

/** Seconds per decode step at batch B: the difference of two generation lengths. */
async function decodeStep(model: Model, B: number, tokens: number): Promise<number> {
  const prompt = Array.from({ length: 32 }, (_, i) => (i * 7919 + 11) % model.config.vocabSize);
  const run = async (n: number) => {
    const reqs = Array.from({ length: B }, (_, b) => ({ ids: prompt.map((t) => (t + b) % model.config.vocabSize), maxTokens: n }));
    const t0 = performance.now();
    const res = await model.generateBatch(reqs);
    const s = (performance.now() - t0) / 1000;
    for (const r of res) if (r.error) throw r.error;
    return s;
  };
  await run(4); // warm: workspaces, graph capture
  const short = await run(8);
  const long = await run(8 + tokens);
  return (long - short) / tokens;
}

export async function benchDecode(opts: DecodeBenchOptions = {}): Promise<DecodeBenchResult> {
  const device = resolveDevice(opts.device ?? 'cuda');
  if (device === 'cpu') throw new Error('benchDecode runs on a CUDA device');
  const log = opts.log ?? (() => undefined);
  const config = opts.config ?? LLAMA2_7B;
  const batches = opts.batches ?? [1, 8, 32];
  const T = opts.prefillTokens ?? 2048;
  const steps = opts.decodeTokens ?? 64;
  const bw = opts.copyBandwidth ?? (await copyBandwidth(device));
  log(`copy bandwidth ${(bw / 1e9).toFixed(0)} GB/s`);
  const maxB = Math.max(...batches);
  const decodeCtx = 32 + 8 + steps + 16;
  const pageSize = 16;
  const pages = Math.max(Math.ceil(T / pageSize) + 1, maxB * Math.ceil(decodeCtx / pageSize));
  const model = await createRandomModel(config, {
    device, dtype: 'f16', seed: 1234, maxBatch: maxB, maxContext: Math.max(T, decodeCtx), kvPages: pages, pageSize,
  });
  const rows: DecodeRow[] = [];
  try {
    // Bytes a decode step must read: every matrix once (the embedding is a row lookup).
    const c = model.config;
    const weightBytes = 2 * (model.parameters - c.vocabSize * c.hiddenSize * (c.tieWordEmbeddings ? 0 : 1));
    const floor = bw / weightBytes;
    log(`weights ${(weightBytes / 1e9).toFixed(2)} GB, floor ${floor.toFixed(1)} tokens/s at batch 1`);
    for (const B of batches) {
      for (const graphs of B === 1 ? [true, false] : [true]) {
        model.graphs = graphs;
        const s = await decodeStep(model, B, steps);
        const row: DecodeRow = {
          name: `decode b${B}${graphs ? '' : ' (no graphs)'}`,
          batch: B,
          graphs,
          tokensPerSecond: B / s,
          msPerStep: s * 1000,
          fractionOfFloor: 1 / s / floor,
        };
        rows.push(row);
        log(`${row.name}: ${row.tokensPerSecond!.toFixed(1)} tokens/s, ${row.msPerStep!.toFixed(2)} ms/step, ${(100 * row.fractionOfFloor!).toFixed(0)}% of floor`);
      }
    }
    model.graphs = true;
    // Prefill: one sequence of T tokens, logits of the last row only.
    const dec = model.decoder;
    const ids = Int32Array.from({ length: T }, (_, i) => (i * 31 + 7) % c.vocabSize);
    const ws = dec.workspace(T, 1, false);
    let ms = Infinity;
    try {
      for (let rep = 0; rep < 4; rep++) {
        const seq = dec.cache.createSequence();
        try {
          dec.cache.grow(seq, T);
          dec.write(ws, dec.inputs([seq], [ids], T));
          await synchronize(device);
          const t0 = performance.now();
          dec.forward(ws, T, T);
          await synchronize(device);
          if (rep > 0) ms = Math.min(ms, performance.now() - t0);
        } finally {
          dec.cache.free(seq);
        }
      }
    } finally {
      ws.dispose();
    }
    const layerParams = model.parameters - c.vocabSize * c.hiddenSize * (c.tieWordEmbeddings ? 1 : 2) - c.hiddenSize;
    const flops = 2 * layerParams * T + 2 * c.hiddenSize * c.vocabSize + c.numLayers * c.numHeads * 2 * T * T * c.headDim;
    const tflops = flops / (ms / 1000) / 1e12;
    const cub = await cublasTflops(device);
    rows.push({ name: `prefill ${T}`, seconds: ms / 1000, tflops, ratioToCublas: cub ? tflops / cub : undefined });
    log(`prefill ${T}: ${ms.toFixed(1)} ms, ${tflops.toFixed(1)} TFLOP/s${cub ? `, cuBLAS GEMM ${cub.toFixed(1)} TFLOP/s (${((100 * tflops) / cub).toFixed(0)}%)` : ''}`);
    return { suite: 'decode', device, config, weightBytes, copyBandwidth: bw, floorTokensPerSecond: floor, cublasTflops: cub, rows };
  } finally {
    await model.dispose();
  }
}

if (require.main === module) {
  benchDecode({ log: (l) => console.log(l) })
    .then((r) => console.log(JSON.stringify(r)))
    .catch((e) => {
      console.error(e);
      process.exitCode = 1;
    });
}
