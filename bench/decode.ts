/**
 * Decoder benchmark at LLaMA-2-7B shapes with random fp16 weights made on the GPU:
 * decode steps at batch 1 (graphs on and off), 8 and 32 against the bandwidth floor
 * (weight bytes / device copy bandwidth measured in the same run), and prefill of a
 * 2048-token prompt in TFLOP/s against cuBLAS's fp16 GEMM at 2048x4096x4096.
 */
import { Tensor } from '../ts/tensor';
import * as ops from '../ts/ops';
import { createRandomModel, Model } from '../ts/model/model';
import { BenchContext, BenchResult, Timing, row, runSuiteMain, timeCuda } from './harness';

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

/** A LLaMA-3-8B-shaped GQA model (32 query / 8 kv heads), for the decode-gqa suite. */
export const LLAMA3_8B_SHAPE = {
  ...LLAMA2_7B,
  intermediate_size: 14336,
  num_key_value_heads: 8,
  vocab_size: 128256,
  max_position_embeddings: 8192,
  rope_theta: 500000,
};

export interface DecodeBenchOptions {
  /** A model config to use instead of LLaMA-2-7B (e.g. a smaller one for a quick check). */
  config?: Record<string, unknown>;
  /** Decode batch sizes (default [1, 8, 32]; quick: [1, 8]). */
  batches?: number[];
  /** Prefill prompt length (default 2048). */
  prefillTokens?: number;
  /** Context each sequence has when a decode step is timed (default 512). */
  decodeContext?: number;
  /** Tokens per end-to-end generation measurement (default 64). */
  decodeTokens?: number;
}

const SUITE = 'decode';

/**
 * Seconds per decode step at batch B end to end (scheduler, sampling, readback): the difference
 * of two generation lengths after a prompt of promptLen tokens (contexts promptLen + 8 on).
 */
export async function endToEndStep(model: Model, B: number, tokens: number, promptLen = 32): Promise<number> {
  const V = model.config.vocabSize;
  const prompt = Array.from({ length: promptLen }, (_, i) => (i * 7919 + 11) % V);
  const run = async (n: number) => {
    const reqs = Array.from({ length: B }, (_, b) => ({ ids: prompt.map((t) => (t + b) % V), maxTokens: n }));
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

/**
 * KV pool and context for decode measurements: steps of up to `maxB` sequences at `ctxLen`,
 * end-to-end runs of `steps` tokens after a 32-token prompt, and a prefill of `prefillTokens`.
 */
export function decodeModelOptions(maxB: number, ctxLen: number, steps: number, prefillTokens = 0):
  { maxBatch: number; maxContext: number; kvPages: number; pageSize: number } {
  const pageSize = 16;
  const maxContext = Math.max(prefillTokens, ctxLen + 1, 32 + 8 + steps + 16);
  const kvPages = Math.max(Math.ceil(prefillTokens / pageSize) + 1, maxB * Math.ceil((ctxLen + 1) / pageSize));
  return { maxBatch: maxB, maxContext, kvPages, pageSize };
}

/** Random KV contents (never time zeros or garbage). */
export function fillRandomKv(model: Model): void {
  const cache = model.decoder.cache;
  cache.k.forEach((t, i) => ops.fillRandom(t, 100 + i, 0, 1));
  cache.v.forEach((t, i) => ops.fillRandom(t, 200 + i, 0, 1));
}

/** Device bytes of a weight: a dense tensor or a quantized module (absent: 0). */
export function weightBytes(x?: Tensor | { bytes: number }): number {
  return !x ? 0 : x instanceof Tensor ? x.byteLength : x.bytes;
}

/**
 * Bytes a decode step reads of the weights: every layer's matrices (dense or quantized: codes,
 * tables, outliers), norms and biases, the final norm and lm_head (the embedding is a row lookup).
 */
export function stepWeightBytes(model: Model): number {
  const w = model.decoder.w;
  let bytes = w.norm.byteLength + weightBytes(w.lmHead);
  for (const l of w.layers)
    for (const x of [l.ln1, l.ln2, l.wqkv, l.wo, l.wgu, l.wdown, l.bqkv, l.bo, l.bgu, l.bdown]) bytes += weightBytes(x);
  return bytes;
}

/**
 * One decode step of B sequences at context ctxLen (every layer, lm_head and sampling), set up in
 * a decode workspace of the model's decoder; `body` gets `step`, which times it (plain launches
 * and graph replay) under the settings of the moment, so it may be called again after flipping
 * one. The sequences and workspace are freed afterwards.
 */
export async function withDecodeStep<T>(ctx: BenchContext, model: Model, B: number, ctxLen: number,
  body: (step: () => Promise<Timing>) => Promise<T>): Promise<T> {
  const device = ctx.device!;
  const dec = model.decoder, V = model.config.vocabSize;
  const seqs: number[] = [];
  const ws = dec.decodeWorkspace(B, dec.cache.maxContext);
  try {
    for (let b = 0; b < B; b++) {
      const s = dec.cache.createSequence();
      seqs.push(s);
      dec.cache.grow(s, ctxLen + 1);
    }
    const tok = Array.from({ length: B }, (_, b) => [(b * 131 + 17) % V]);
    dec.write(ws, dec.inputs(seqs, tok, B));
    ws.temperature.write(new Float32Array(B));
    ws.topK.write(new Int32Array(B));
    ws.topP.write(new Float32Array(B).fill(1));
    ws.rng.write(new Uint32Array(2 * B));
    return await body(() => timeCuda({
      device, warmup: 3, iters: 10, repeats: ctx.quick ? 5 : 15,
      fn: () => {
        dec.forward(ws, 1, dec.cache.maxContext);
        dec.sample(ws);
      },
    }));
  } finally {
    seqs.forEach((s) => dec.cache.free(s));
    ws.dispose();
  }
}

/**
 * The decode suite for bench/run.ts: LLaMA-2-7B shapes, random fp16 weights made on the
 * GPU. Rows: one decode step (every layer, lm_head and sampling) at batch 1/8/32 with
 * graph-replayed and plain timings, bytes = weights + KV read (of copy BW = fraction of the
 * bandwidth floor), end-to-end tokens/s in the note (batch 1: also without graphs and at
 * contexts around the timed one); at batch 1 the same step with one setting flipped (no PDL,
 * no PDL in the graph, the separate RoPE/append kernel, the plain op sequence, the CUDA-core
 * attention kernel); prefill of a 2048-token prompt in TFLOP/s against
 * cuBLAS's fp16 GEMM 2048x4096x4096 measured in the same run.
 */
export async function benchDecode(ctx: BenchContext, opts: DecodeBenchOptions = {}): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const device = ctx.device;
  const log = ctx.log;
  const config = opts.config ?? LLAMA2_7B;
  const batches = opts.batches ?? (ctx.quick ? [1, 8] : [1, 8, 32]);
  const T = opts.prefillTokens ?? 2048;
  const ctxLen = opts.decodeContext ?? 512;
  const steps = opts.decodeTokens ?? (ctx.quick ? 16 : 64);
  const maxB = Math.max(...batches);
  const model = await createRandomModel(config, { device, dtype: 'f16', seed: 1234, ...decodeModelOptions(maxB, ctxLen, steps, T) });
  const rows: BenchResult[] = [];
  try {
    const c = model.config;
    const dec = model.decoder;
    fillRandomKv(model);
    // Bytes a decode step must read: every matrix once (the embedding is a row lookup).
    const stepBytes = stepWeightBytes(model);
    const kvPerToken = 2 * c.numLayers * c.numKvHeads * c.headDim * 2;
    const floorTps = (ctx.copyBandwidthGBs * 1e9) / stepBytes;
    log(`decode: weights ${(stepBytes / 1e9).toFixed(2)} GB; batch-1 floor ${floorTps.toFixed(1)} tokens/s at ${ctx.copyBandwidthGBs.toFixed(0)} GB/s`);
    for (const B of batches) {
      // B = 1 also times the step with one setting flipped (A/B in the same process).
      const variants: Array<{ name: string; note: string; env?: Record<string, string>; flip?: (on: boolean) => void }> = [
        { name: 'without PDL', note: 'ordinary launches (SQUEEZELM_NO_PDL=1)', env: { SQUEEZELM_NO_PDL: '1' } },
        { name: 'without PDL in the graph', note: 'no early launch in captured graphs (SQUEEZELM_GRAPH_PDL=0)', env: { SQUEEZELM_GRAPH_PDL: '0' } },
        { name: 'with the RoPE/append kernel', note: 'ropeAppend as its own kernel after the q|k|v projection (decoder.fuseRopeAppend = false)', flip: (on) => { dec.fuseRopeAppend = !on; } },
        { name: 'without fused GEMVs', note: 'plain norm/matmul/add/siluMul sequence (decoder.fuse = false)', flip: (on) => { dec.fuse = !on; } },
      ];
      const { t, flipped } = await withDecodeStep(ctx, model, B, ctxLen, async (step) => {
        const t = await step();
        const flipped: Array<[typeof variants[number], Timing]> = [];
        if (B === 1)
          for (const v of variants) {
            for (const [k, val] of Object.entries(v.env ?? {})) process.env[k] = val;
            v.flip?.(true);
            try {
              flipped.push([v, await step()]);
            } finally {
              for (const k of Object.keys(v.env ?? {})) delete process.env[k];
              v.flip?.(false);
            }
          }
        return { t, flipped };
      });
      let simt: Timing | null = null;
      if (B === 1) {
        // The same step with the CUDA-core decode attention kernel instead of the tensor-core one
        // (its own workspace: the two kernels plan different split counts).
        process.env.SQUEEZELM_ATTN_SIMT = '1';
        try {
          simt = await withDecodeStep(ctx, model, B, ctxLen, (step) => step());
        } catch (e) {
          log(`decode b1 with the CUDA-core attention kernel: ${(e as Error).message}`);
        } finally {
          delete process.env.SQUEEZELM_ATTN_SIMT;
        }
      }
      // End to end through the scheduler (its own sequences, short contexts).
      const e2eGraph = await endToEndStep(model, B, steps);
      let note = `${(B / e2eGraph).toFixed(1)} tokens/s end to end (contexts ${32 + 8}-${32 + 8 + steps})`;
      if (B === 1) {
        model.graphs = false;
        const e2ePlain = await endToEndStep(model, B, steps);
        model.graphs = true;
        // and around the context the step is timed at
        const p0 = Math.max(32, ctxLen - 8 - Math.floor(steps / 2));
        const e2eCtx = await endToEndStep(model, B, steps, p0);
        note += ` with graphs, ${(B / e2ePlain).toFixed(1)} without; ${(B / e2eCtx).toFixed(1)} with graphs at contexts ` +
          `${p0 + 8}-${p0 + 8 + steps}; floor ${floorTps.toFixed(1)}`;
      }
      if (model.stats.captureError) note += `; scheduler could not capture: ${model.stats.captureError}`;
      const bytes = stepBytes + B * ctxLen * kvPerToken;
      const r = row(ctx, SUITE, `step b${B} ctx ${ctxLen}`, t, { bytes, note });
      rows.push(r);
      for (const [v, tv] of flipped) rows.push(row(ctx, SUITE, `step b${B} ctx ${ctxLen} ${v.name}`, tv, { bytes, note: v.note }));
      if (simt) rows.push(row(ctx, SUITE, `step b${B} ctx ${ctxLen} with the CUDA-core attention kernel`, simt, { bytes, note: 'SQUEEZELM_ATTN_SIMT=1' }));
      log(`decode b${B}: ${r.timeUs.toFixed(0)} us/step (${r.timing}), plain ${r.plainUs?.toFixed(0)} us; ${note}`);
    }
    // Prefill: one sequence of T tokens, logits of the last row only.
    const ids = Int32Array.from({ length: T }, (_, i) => (i * 31 + 7) % c.vocabSize);
    const ws = dec.workspace(T, 1, false);
    const seq = dec.cache.createSequence();
    try {
      dec.cache.grow(seq, T);
      dec.write(ws, dec.inputs([seq], [ids], T));
      const t = await timeCuda({ device, warmup: 1, iters: 1, repeats: ctx.quick ? 3 : 7, noGraph: true, fn: () => dec.forward(ws, T, T) });
      const layerParams = model.parameters - c.vocabSize * c.hiddenSize * (c.tieWordEmbeddings ? 1 : 2) - c.hiddenSize;
      const flops = 2 * layerParams * T + 2 * c.hiddenSize * c.vocabSize + c.numLayers * c.numHeads * 2 * T * T * c.headDim;
      let gemm: Timing | null = null;
      if (ops.cublasAvailable()) {
        const x = Tensor.empty([2048, 4096], { dtype: 'f16', device });
        const w = Tensor.empty([4096, 4096], { dtype: 'f16', device });
        const y = Tensor.empty([2048, 4096], { dtype: 'f16', device });
        try {
          ops.fillRandom(x, 1, 0, 1);
          ops.fillRandom(w, 2, 0, 0.02);
          gemm = await timeCuda({ device, warmup: 3, iters: 20, repeats: ctx.quick ? 5 : 15, noGraph: true, fn: () => ops.cublasMatmul(y, x, w) });
        } finally {
          x.dispose();
          w.dispose();
          y.dispose();
        }
      }
      const r = row(ctx, SUITE, `prefill ${T}`, t, { flops });
      if (gemm) {
        const cub = (2 * 2048 * 4096 * 4096) / (gemm.plain.median * 1e-6) / 1e12;
        r.note = `${((100 * r.tflops!) / cub).toFixed(0)}% of cuBLAS fp16 GEMM 2048x4096x4096 (${cub.toFixed(1)} TFLOP/s)`;
        rows.push(r, row(ctx, SUITE, 'cuBLAS GEMM 2048x4096x4096', gemm, { flops: 2 * 2048 * 4096 * 4096 }));
      } else {
        r.note = 'cuBLAS not available';
        rows.push(r);
      }
      log(`prefill ${T}: ${(r.timeUs / 1000).toFixed(1)} ms, ${r.tflops!.toFixed(1)} TFLOP/s; ${r.note}`);
    } finally {
      dec.cache.free(seq);
      ws.dispose();
    }
    return rows;
  } finally {
    await model.dispose();
  }
}

if (require.main === module) runSuiteMain((ctx) => benchDecode(ctx));

/** The decode suite on the GQA shape (manual: run with --only decode-gqa). */
export async function benchDecodeGqa(ctx: BenchContext): Promise<BenchResult[]> {
  return benchDecode(ctx, { config: LLAMA3_8B_SHAPE, batches: [1, 8] });
}
