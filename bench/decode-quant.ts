/**
 * The "decodeq" suite: batch-1 decode at LLaMA-2-7B shapes with SqueezeLLM dense-and-sparse
 * linears against fp16 decode, in one process. Random fp16 weights for the fp16 model; for each
 * bit width a model made by createRandomModel's `quantize` (every q/k/v/o/gate/up/down matrix
 * made on the GPU, quantized there with k-means, 0.45% outliers by magnitude since random weights
 * have no sensitivity, fused q|k|v and gate|up; embeddings and lm_head fp16). Each model is freed
 * before the next is made.
 *
 * Rows: the fp16 step; per bit width the quantization's wall time (weights made, read back,
 * outliers, k-means, packing, upload) and the decode step (graph-replayed, as bench/decode.ts
 * times it) with its speed-up over the fp16 step of the same run, end-to-end tokens/s in the note;
 * then the same step on the GEMV kernels that carry every epilogue, with the quantized projections'
 * fused epilogues off (RMSNorm, RoPE/append, then also siluMul, as their own kernels; at 3 bits the
 * RMSNorm is a kernel of its own by default, so that row fuses it instead), and with the
 * lm_head quantized too (`quantize --lm-head`; a random matrix of the same shape).
 * Bytes = the weights a step reads (quantized linears + fp16 lm_head and norms; the KV read is
 * left out), so `of copy BW` is the fraction of the weights-only bandwidth floor. Also the prefill
 * of one prompt (default 2048 tokens; plain launches, as the runtime runs prefill) per model, and
 * for the quantized ones the same prefill with the tiled LUT GEMM instead of the dense weight copy
 * (SQUEEZELM_LUT_DENSE_MIN_M=0; csrc/kernels/lut_gemm/dense_path.cuh) in the note.
 */
import { synchronize } from '../ts/device';
import { createRandomModel, Model } from '../ts/model/model';
import { parseConfig } from '../ts/model/config';
import { BenchContext, BenchResult, Timing, row, runSuiteMain, timeCuda, wallRow } from './harness';
import { randomSqueezeLinear } from '../ts/model/weights';
import { uploadSqueezeLinear } from '../ts/quant/squeezellm';
import { LLAMA2_7B, decodeModelOptions, endToEndStep, fillRandomKv, stepWeightBytes, weightBytes, withDecodeStep } from './decode';

const SUITE = 'decodeq';

export interface DecodeQuantOptions {
  /** A model config instead of LLaMA-2-7B (quick: LLaMA-2-7B shapes with 4 layers). */
  config?: Record<string, unknown>;
  /** Bit widths, in order (default [4, 3]). */
  bits?: Array<3 | 4>;
  /** Outlier share of each matrix (default 0.0045). */
  outliers?: number;
  /** Context of the timed step (default 512). */
  decodeContext?: number;
  /** Tokens per end-to-end measurement (default 64; quick 16). */
  decodeTokens?: number;
  /** Prompt length of the prefill rows (default 2048; quick 256; 0: none). */
  prefillTokens?: number;
  /**
   * Seconds the suite may take (default 540): a bit width is skipped, with a row saying so, when
   * the last one's quantization and measurement would not fit in what is left.
   */
  budgetSeconds?: number;
}

/** Targets of the end-to-end acceptance (batch-1 step over fp16's, quantization time on an H100). */
const TARGET_SPEEDUP: Record<number, number> = { 4: 2.6, 3: 3.0 };
const TARGET_QUANT_S = 300;

/** Bytes and weights of the decoder's linears (dense [N, K] tensors or quantized modules). */
function linearStats(model: Model): { bytes: number; weights: number } {
  let bytes = 0, weights = 0;
  for (const l of model.decoder.w.layers)
    for (const m of [l.wqkv, l.wo, l.wgu, l.wdown]) {
      bytes += weightBytes(m);
      weights += 'N' in m ? m.N * m.K : m.shape[0] * m.shape[1];
    }
  return { bytes, weights };
}

const gb = (b: number) => `${(b / 1e9).toFixed(2)} GB`;

export async function benchDecodeQuant(ctx: BenchContext, opts: DecodeQuantOptions = {}): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const start = performance.now();
  const elapsed = () => (performance.now() - start) / 1000;
  const device = ctx.device, log = ctx.log;
  const config = opts.config ?? (ctx.quick ? { ...LLAMA2_7B, num_hidden_layers: 4 } : LLAMA2_7B);
  const cfg = parseConfig(config, 'config');
  const full = !opts.config && !ctx.quick;
  const outliers = opts.outliers ?? 0.0045;
  const ctxLen = opts.decodeContext ?? 512;
  const steps = opts.decodeTokens ?? (ctx.quick ? 16 : 64);
  const budget = opts.budgetSeconds ?? 540;
  const prefillT = opts.prefillTokens ?? (ctx.quick ? 256 : 2048);
  const modelOpts = { device, dtype: 'f16' as const, seed: 1234, ...decodeModelOptions(1, ctxLen, steps, prefillT) };
  const shape = `${cfg.numLayers} layers, hidden ${cfg.hiddenSize}, intermediate ${cfg.intermediateSize}`;
  const rows: BenchResult[] = [];

  /** The batch-1 step (graphs) and end-to-end tokens/s of a model; its weight bytes. */
  const measure = async (m: Model): Promise<{ t: Timing; tps: number; bytes: number }> => {
    fillRandomKv(m);
    const t = await withDecodeStep(ctx, m, 1, ctxLen, (step) => step());
    const tps = 1 / (await endToEndStep(m, 1, steps));
    return { t, tps, bytes: stepWeightBytes(m) };
  };

  /** One prompt of prefillT tokens through the decoder (logits of its last row), plain launches. */
  const prefill = async (m: Model): Promise<Timing> => {
    const dec = m.decoder, V = m.config.vocabSize;
    const ids = Int32Array.from({ length: prefillT }, (_, i) => (i * 31 + 7) % V);
    const ws = dec.workspace(prefillT, 1, false);
    const seq = dec.cache.createSequence();
    try {
      dec.cache.grow(seq, prefillT);
      dec.write(ws, dec.inputs([seq], [ids], prefillT));
      return await timeCuda({ device, warmup: 1, iters: 1, repeats: ctx.quick ? 3 : 5, noGraph: true, fn: () => dec.forward(ws, prefillT, prefillT) });
    } finally {
      dec.cache.free(seq);
      ws.dispose();
    }
  };
  let basePrefill: Timing | null = null;
  const prefillRow = async (m: Model, label: string, quantized: boolean): Promise<void> => {
    if (prefillT <= 0) return;
    const t = await prefill(m);
    let note = '';
    if (quantized) {
      process.env.SQUEEZELM_LUT_DENSE_MIN_M = '0';
      try {
        const tiled = await prefill(m);
        note = `tiled LUT GEMM instead of the dense weight copy: ${(tiled.plain.median / 1000).toFixed(1)} ms (${(tiled.plain.median / t.plain.median).toFixed(2)}x this row's time)`;
      } finally {
        delete process.env.SQUEEZELM_LUT_DENSE_MIN_M;
      }
    } else {
      basePrefill = t;
    }
    const r = row(ctx, SUITE, `${label} prefill ${prefillT}`, t, quantized && basePrefill ? { baseline: 'fp16 prefill', base: basePrefill, note } : { note });
    rows.push(r);
    log(`decodeq ${label} prefill ${prefillT}: ${(r.timeUs / 1000).toFixed(1)} ms${r.speedup ? `, ${r.speedup.toFixed(2)}x fp16` : ''}${note ? `; ${note}` : ''}`);
  };

  // (a) fp16.
  let base: Timing, baseTps: number;
  {
    const m = await createRandomModel(config, modelOpts);
    try {
      const r0 = await measure(m);
      base = r0.t;
      baseTps = r0.tps;
      let note = `${baseTps.toFixed(1)} tokens/s end to end; weights read per step ${gb(r0.bytes)}; ${shape}`;
      if (m.stats.captureError) note += `; scheduler could not capture: ${m.stats.captureError}`;
      const r = row(ctx, SUITE, `fp16 step b1 ctx ${ctxLen}`, base, { bytes: r0.bytes, note });
      rows.push(r);
      log(`decodeq fp16: ${r.timeUs.toFixed(0)} us/step (${r.timing}), ${baseTps.toFixed(1)} tokens/s end to end`);
      await prefillRow(m, 'fp16', false);
    } finally {
      await m.dispose();
    }
  }

  // (b) each bit width: quantize, then the same measurements.
  let lastSeconds = 0;
  for (const bits of opts.bits ?? [4, 3]) {
    const label = `${bits}-bit D+S`;
    if (lastSeconds > 0 && elapsed() + 1.1 * lastSeconds > budget) {
      const msg = `skipped: ${elapsed().toFixed(0)} s spent and the last width took ${lastSeconds.toFixed(0)} s (budget ${budget} s)`;
      log(`decodeq ${label}: ${msg}`);
      rows.push(wallRow(SUITE, `${label} quantize`, NaN, msg));
      continue;
    }
    const t0 = performance.now();
    let nnz = 0, total = 0, linears = 0, logged = 0;
    let seconds = { make: 0, quantize: 0, upload: 0 };
    const every = Math.max(1, Math.ceil(cfg.numLayers / 4));
    const m = await createRandomModel(config, {
      ...modelOpts,
      quantize: {
        bits, outliers,
        onLinear: (_, l) => {
          linears++;
          nnz += l.cols?.length ?? 0;
          total += l.N * l.K;
        },
        onProgress: (p) => {
          seconds = p.seconds;
          if (p.layersDone !== logged && (p.layersDone % every === 0 || p.layersDone === p.layers)) {
            logged = p.layersDone;
            log(`decodeq ${label}: ${p.layersDone}/${p.layers} layers quantized, ${((performance.now() - t0) / 1000).toFixed(1)} s`);
          }
        },
      },
    });
    try {
      await synchronize(device); // the uploads' device work counts too
      const qs = (performance.now() - t0) / 1000;
      const split = `make ${seconds.make.toFixed(1)} s, quantize ${seconds.quantize.toFixed(1)} s, upload ${seconds.upload.toFixed(1)} s`;
      let qnote = `${qs.toFixed(1)} s: ${linears} linears, k-means on ${device}, ${(100 * nnz / total).toFixed(3)}% outliers by magnitude; ${split}`;
      if (full) qnote += `; target <= ${TARGET_QUANT_S} s (H100)`;
      rows.push(wallRow(SUITE, `${label} quantize`, qs, qnote));
      log(`decodeq ${label}: quantized in ${qs.toFixed(1)} s (${split})`);

      const r0 = await measure(m);
      const lin = linearStats(m);
      let note = `${r0.tps.toFixed(1)} tokens/s end to end, ${(r0.tps / baseTps).toFixed(2)}x fp16's ${baseTps.toFixed(1)}; ` +
        `quantized linears ${gb(lin.bytes)} (${((8 * lin.bytes) / lin.weights).toFixed(2)} bits/weight), weights read per step ${gb(r0.bytes)}`;
      if (full && TARGET_SPEEDUP[bits]) note += `; target >= ${TARGET_SPEEDUP[bits]}x`;
      if (m.stats.captureError) note += `; scheduler could not capture: ${m.stats.captureError}`;
      const r = row(ctx, SUITE, `${label} step b1 ctx ${ctxLen}`, r0.t, { bytes: r0.bytes, baseline: 'fp16 step', base, note });
      rows.push(r);
      log(`decodeq ${label}: ${r.timeUs.toFixed(0)} us/step (${r.timing}), ${r.speedup?.toFixed(2)}x fp16; ${note}`);
      // The same step, in the same process, on the all-epilogue kernels; without the next-projection
      // prefetch (4 bits); and with the quantized projections' fusions off: the two RMSNorms
      // as their own kernels (each adding the block's output to the residual stream), then RoPE and the
      // cache append as well (q|k|v stored paired, its store epilogue), then siluMul too.
      const dec = m.decoder;
      const apart: Array<[string, () => void]> = [
        // Every GEMV of the step on the kernels that carry all epilogues (csrc/kernels/lut_gemm:
        // launch_gemv_decode), where the default gives each launch kernels with its own epilogue only.
        ['all-epilogue GEMV kernels', () => { process.env.SQUEEZELM_LUT_EPI_KERNELS = '0'; }],
        // No projection naming the next one (decoder.prefetchLut: its first codes requested into L2; the
        // 3-bit GEMVs ignore the hint, so 4 bits only)
        ...(bits === 4 ? [['no next-projection prefetch', () => { dec.prefetchLut = false; }] as [string, () => void]] : []),
        ['RMSNorm apart', () => { dec.fuseLutNorm = false; }],
        ['RMSNorm and RoPE/append apart', () => { dec.fuseLutNorm = false; dec.fuseLutRope = false; }],
        ['RMSNorm, RoPE/append and siluMul apart', () => { dec.fuseLutNorm = false; dec.fuseLutRope = false; dec.fuseLutSilu = false; }],
      ];
      for (const [what, set] of apart) {
        set();
        try {
          const t = await withDecodeStep(ctx, m, 1, ctxLen, (step) => step());
          const a = row(ctx, SUITE, `${label} step b1 ctx ${ctxLen}, ${what}`, t, {
            bytes: r0.bytes, baseline: 'fp16 step', base,
            note: `the fused step above took ${r.timeUs.toFixed(0)} us`,
          });
          rows.push(a);
          log(`decodeq ${label}, ${what}: ${a.timeUs.toFixed(0)} us/step`);
        } finally {
          delete process.env.SQUEEZELM_LUT_EPI_KERNELS;
          dec.fuseLutNorm = true;
          dec.fuseLutRope = true;
          dec.fuseLutSilu = true;
          dec.prefetchLut = true;
        }
      }
      // The same step with the lm_head quantized too (quantize --lm-head; the default keeps it fp16):
      // a random [vocab, hidden] matrix of this width, 0.45% outliers, in place of the fp16 one.
      {
        const w = dec.w, dense = w.lmHead;
        const head = uploadSqueezeLinear(await randomSqueezeLinear(cfg.vocabSize, cfg.hiddenSize, { device, seed: 4321, bits, outliers }),
          device, 'f16');
        w.lmHead = head;
        try {
          const t = await withDecodeStep(ctx, m, 1, ctxLen, (step) => step());
          const hb = stepWeightBytes(m);
          const a = row(ctx, SUITE, `${label} step b1 ctx ${ctxLen}, lm_head quantized too`, t, {
            bytes: hb, baseline: 'fp16 step', base,
            note: `--lm-head: weights read per step ${gb(hb)}; the step above (fp16 lm_head, the default) took ${r.timeUs.toFixed(0)} us`,
          });
          rows.push(a);
          log(`decodeq ${label}, lm_head quantized too: ${a.timeUs.toFixed(0)} us/step, ${a.speedup?.toFixed(2)}x fp16`);
        } finally {
          w.lmHead = dense;
          head.dispose();
        }
      }
      await prefillRow(m, label, true);
    } finally {
      await m.dispose();
    }
    lastSeconds = (performance.now() - t0) / 1000;
  }
  return rows;
}

if (require.main === module) runSuiteMain((ctx) => benchDecodeQuant(ctx));
