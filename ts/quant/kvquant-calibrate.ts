/**
 * KVQuant calibration of a model: runs our forward over calibration windows one layer at a time,
 * collects that layer's keys (before RoPE, or after it for the post-RoPE ablation) and values from
 * the packed q|k|v projection (quant/kvquant-samples.ts), and fits the layer's quantizer
 * (quant/kvquant.ts LayerFitter) before the walk moves on: one layer's samples are held at a time.
 * Positions below `sink` are left out of the samples: the cache keeps them in fp16.
 * Also the `squeezelm calibrate-kv` command.
 */
import * as fs from 'fs';
import * as path from 'path';
import { SqueezeError } from '../errors';
import { loadModel, Model } from '../model/model';
import { loadPplData } from '../runtime/ppl';
import { quantizedBytesPerToken } from '../runtime/kvq-attention';
import { CalibrateOptions, KvqCalibration, LayerFitter, saveKvqCalibration } from './kvquant';
import { allocateSlots, measureSlotCosts, slotCandidates } from './kvquant-allocate';
import { kvqMetaBytes, outlierSlots } from '../ops/kvquant';
import { Backprop, rotateRows } from './gradients';
import { LayerSampler, cat } from './kvquant-samples';

export { snapshot } from './kvquant-samples';

export interface CalibrateKvOptions {
  bits: number;
  /** Outlier share (default 0.01). */
  outliers?: number;
  /** Share of each key channel's samples outside its bounds (default: half the outlier share). */
  keyClip?: number;
  /** fp16 sink tokens (default 4). */
  sink?: number;
  keyPerToken?: boolean;
  postRope?: boolean;
  codebook?: 'kmeans' | 'uniform';
  /**
   * Weight the key codebook's k-means by each key channel's sensitivity, the mean squared
   * query component that multiplies it (over its query heads and RoPE pair; default true).
   */
  sensitivity?: boolean;
  /**
   * Weight every k-means sample by its loss gradient instead: |g|, g the gradient of the window's
   * loss with respect to that key (before RoPE) or value, from this backward pass over the same
   * windows (CPU, fp32; the samples then come from its forward pass). KVQuant weights by the
   * Fisher information g^2 of each sample; on pycoder-mini its square root measured best (2 bits:
   * g^2 x scale^2, g^2, |g| x scale, |g|, |g|^0.5 compared in docs/kvquant.md).
   */
  fisher?: Backprop;
  /** Called after each window of the fisher pass. */
  onProgress?: (done: number, total: number) => void;
  /**
   * Outlier slots per layer: 'auto' (default) spends the metadata bytes of the uniform share
   * where the measured loss says they help most (quant/kvquant-allocate.ts); 'uniform' gives
   * every layer outlierSlots(outliers, headDim) for keys and for values. The ablations
   * (keyPerToken, postRope, uniform codebooks) and a zero share always use 'uniform'.
   */
  slots?: 'auto' | 'uniform';
  /** Calibration windows the allocation measures on (default 8: the first ones). */
  allocateWindows?: number;
  /** Called after each prefill of the allocation's measurement. */
  onAllocate?: (done: number, total: number) => void;
  /** Called as each layer's samples are in (not with fisher: its passes report through onProgress). */
  onSamples?: (done: number, total: number) => void;
  /** Windows per forward pass (default 4). */
  batch?: number;
  iterations?: number;
  maxSamples?: number;
}

/** Calibrates the KV quantizer of `model` on windows of token ids. */
export async function calibrateKv(model: Model, windows: Int32Array[], o: CalibrateKvOptions): Promise<KvqCalibration> {
  const cfg = model.config;
  const H = cfg.numKvHeads, D = cfg.headDim;
  const sink = o.sink ?? 4;
  if (!Number.isInteger(sink) || sink < 0) throw new SqueezeError('ERR_ARG', `calibrate-kv: sink must be a non-negative integer, got ${sink}`);
  if (model.kvCache.quantized) throw new SqueezeError('ERR_ARG', 'calibrate-kv: calibrate a model loaded with the unquantized cache');
  if (o.fisher) return calibrateKvFisher(model, windows, o, o.fisher);
  const L = cfg.numLayers;
  // each layer's query energy goes in as its samples are loaded (the key codebook's k-means weights)
  const keyWeights: Float32Array[] = [];
  const fit: CalibrateOptions = {
    bits: o.bits, outliers: o.outliers ?? 0.01, keyClip: o.keyClip, sink, kvHeads: H, headDim: D, keyPerToken: o.keyPerToken, postRope: o.postRope,
    codebook: o.codebook, iterations: o.iterations, maxSamples: o.maxSamples, keyWeights: o.sensitivity === false ? undefined : keyWeights,
  };
  const fitter = new LayerFitter(L, undefined, fit);
  const sampler = new LayerSampler(model, windows, { batch: o.batch ?? 4, sink, postRope: o.postRope });
  try {
    return await fitWithSlots(model, windows, fitter, o, {
      load: async (l) => {
        const s = await sampler.layer(l);
        if (s.tokens === 0) throw new SqueezeError('ERR_ARG', 'calibrate-kv: no tokens past the sink to calibrate on');
        keyWeights[l] = Float32Array.from(s.queryEnergy);
        fitter.load(l, s.keys, s.values);
        o.onSamples?.(l + 1, L);
      },
      unload: (l) => fitter.unload(l),
    });
  } finally {
    sampler.dispose();
  }
}

/** How fitWithSlots gets each layer's samples into the fitter (in layer order) and lets them go. */
interface SampleSource {
  load(l: number): Promise<void>;
  unload(l: number): void;
}

/** The calibration from `fitter`'s samples, with the outlier slots allocated per layer where o.slots asks for it. */
async function fitWithSlots(model: Model, windows: Int32Array[], fitter: LayerFitter, o: CalibrateKvOptions, io: SampleSource): Promise<KvqCalibration> {
  const fit = fitter.opts, L = fitter.layers;
  const n0 = outlierSlots(fit.outliers ?? 0.01, fit.headDim);
  const slots = o.slots ?? 'auto';
  if (slots !== 'auto' && slots !== 'uniform') throw new SqueezeError('ERR_ARG', `calibrate-kv: slots must be 'auto' or 'uniform', got '${slots}'`);
  const uniformSlots = async (): Promise<KvqCalibration> => {
    for (let l = 0; l < L; l++) {
      await io.load(l);
      fitter.layer(l, n0, n0);
      io.unload(l);
    }
    return fitter.calibration();
  };
  if (slots === 'uniform' || n0 === 0 || fit.keyPerToken || fit.postRope || fit.codebook === 'uniform') return uniformSlots();
  const nw = o.allocateWindows ?? 8;
  if (!(Number.isInteger(nw) && nw >= 1)) throw new SqueezeError('ERR_ARG', `calibrate-kv: allocateWindows must be a positive integer, got ${nw}`);
  const sink = fit.sink ?? 0;
  const measured = windows.filter((w) => w.length >= sink + 2).slice(0, nw);
  if (!measured.length) return uniformSlots();
  // each layer's key and value halves fitted once per slot count, for the measurement and the
  // result; the measurement walks the layers in order, loading each one's samples as it comes to it
  const costs = await measureSlotCosts(model, measured, (l, nk, nv) => fitter.layer(l, nk, nv), {
    bits: fit.bits, sink, candidates: slotCandidates(n0, fit.headDim), uniform: n0, batch: o.batch ?? 4, onProgress: o.onAllocate,
    beforeLayer: (l) => io.load(l), afterLayer: (l) => io.unload(l),
  });
  return fitter.calibration(allocateSlots(costs, L * kvqMetaBytes(n0, n0)));
}

/** calibrateKv with Fisher-weighted codebooks: samples and gradients from `bp`'s passes. */
async function calibrateKvFisher(model: Model, windows: Int32Array[], o: CalibrateKvOptions, bp: Backprop): Promise<KvqCalibration> {
  const cfg = model.config, b = bp.config;
  if (b.numLayers !== cfg.numLayers || b.numKvHeads !== cfg.numKvHeads || b.headDim !== cfg.headDim || b.hiddenSize !== cfg.hiddenSize)
    throw new SqueezeError('ERR_ARG', 'calibrate-kv: the gradient pass is for another model than the one calibrated');
  const H = cfg.numKvHeads, D = cfg.headDim, HD = H * D, sink = o.sink ?? 4, L = cfg.numLayers;
  const parts = Array.from({ length: L }, () => ({ k: [] as Float32Array[], v: [] as Float32Array[], gk: [] as Float32Array[], gv: [] as Float32Array[] }));
  for (let w = 0; w < windows.length; w++) {
    const ids = windows[w], T = ids.length;
    if (T <= sink) continue;
    const r = await bp.window(ids, { kv: true });
    const pos = Array.from({ length: T - sink }, (_, i) => sink + i);
    for (let l = 0; l < L; l++) {
      const g = r.kv![l], p = parts[l];
      const k = g.keys.slice(sink * HD), gk = g.keyGrads.slice(sink * HD);
      if (o.postRope) {  // samples and gradients of the rotated keys (a rotation keeps the gradient's length)
        rotateRows(k, pos, H, D, cfg.invFreq);
        rotateRows(gk, pos, H, D, cfg.invFreq);
      }
      // k-means weights |g|: the square root of each sample's Fisher information g^2 (see CalibrateKvOptions.fisher)
      const gv = g.valueGrads.slice(sink * HD);
      for (let i = 0; i < gk.length; i++) { gk[i] = Math.abs(gk[i]); gv[i] = Math.abs(gv[i]); }
      p.k.push(k);
      p.v.push(g.values.slice(sink * HD));
      p.gk.push(gk);
      p.gv.push(gv);
    }
    o.onProgress?.(w + 1, windows.length);
  }
  if (parts[0].k.length === 0) throw new SqueezeError('ERR_ARG', 'calibrate-kv: no tokens past the sink to calibrate on');
  // the backward passes made every layer's samples at once: the fitter holds them all
  const fitter = new LayerFitter(parts.map((p) => cat(p.k)), parts.map((p) => cat(p.v)), {
    bits: o.bits, outliers: o.outliers ?? 0.01, keyClip: o.keyClip, sink, kvHeads: H, headDim: D, keyPerToken: o.keyPerToken, postRope: o.postRope,
    codebook: o.codebook, iterations: o.iterations, maxSamples: o.maxSamples,
    sampleWeights: { keys: parts.map((p) => cat(p.gk)), values: parts.map((p) => cat(p.gv)) },
  });
  return fitWithSlots(model, windows, fitter, o, { load: async () => undefined, unload: () => undefined });
}

const USAGE = `usage: squeezelm calibrate-kv [--model DIR] --calib FILE --bits 2|3|4 --out FILE
         [--outliers PCT (default 1)] [--key-clip PCT (default: half of --outliers)] [--sink N (default 4)]
         [--windows N] [--window L] [--device D] [--fisher | --no-sensitivity]
         [--slots auto|uniform (default auto)] [--allocate-windows N (default 8)]
         [--key-per-token] [--post-rope] [--uniform]   (docs/kvquant.md)
  --calib FILE: ids [windows, length], or text cut into windows of --window L tokens
  (default 1024; --window also cuts ids rows), read as ppl reads them.
  --fisher weights each sample of the codebooks' k-means by the size of its loss gradient |g|
  (a backward pass on the CPU in fp32 over the calibration windows, for models that fit in
  host memory).
  --slots auto measures on the first --allocate-windows calibration windows what each layer's
  keys and values cost the loss at each number of outlier slots (one prefill per layer, kind and
  count) and spends the bytes of the uniform --outliers share where they help most; --slots
  uniform gives every layer the same slots.`;

/** `squeezelm calibrate-kv ...` */
export async function calibrateKvCommand(argv: string[], defaultModel: string): Promise<void> {
  const f: Record<string, string | boolean> = {};
  const BOOL = new Set(['key-per-token', 'post-rope', 'uniform', 'no-sensitivity', 'fisher', 'help']);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new SqueezeError('ERR_ARG', `calibrate-kv: unexpected argument '${a}'\n${USAGE}`);
    const name = a.slice(2);
    if (BOOL.has(name)) f[name] = true;
    else if (['model', 'calib', 'bits', 'out', 'outliers', 'key-clip', 'sink', 'windows', 'window', 'device', 'batch', 'slots', 'allocate-windows'].includes(name)) {
      if (i + 1 >= argv.length) throw new SqueezeError('ERR_ARG', `--${name} needs a value`);
      f[name] = argv[++i];
    } else throw new SqueezeError('ERR_ARG', `calibrate-kv: unknown option --${name}\n${USAGE}`);
  }
  if (f.help) { process.stdout.write(USAGE + '\n'); return; }
  const num = (name: string, d?: number): number | undefined => {
    const v = f[name];
    if (v === undefined) return d;
    const n = Number(v);
    if (typeof v !== 'string' || v.trim() === '' || !Number.isFinite(n)) throw new SqueezeError('ERR_ARG', `--${name} must be a number, got '${v}'`);
    return n;
  };
  const bits = num('bits');
  if (bits !== 2 && bits !== 3 && bits !== 4) throw new SqueezeError('ERR_ARG', `calibrate-kv: --bits must be 2, 3 or 4\n${USAGE}`);
  const calib = f.calib, out = f.out;
  if (typeof calib !== 'string') throw new SqueezeError('ERR_ARG', `calibrate-kv: --calib FILE is required\n${USAGE}`);
  if (typeof out !== 'string') throw new SqueezeError('ERR_ARG', `calibrate-kv: --out FILE is required\n${USAGE}`);
  const dir = typeof f.model === 'string' ? f.model : defaultModel;
  if (!fs.existsSync(path.join(dir, 'config.json'))) throw new SqueezeError('ERR_ARG', `--model: ${dir} has no config.json`);
  const pct = num('outliers', 1)!;
  if (!(pct >= 0 && pct < 50)) throw new SqueezeError('ERR_ARG', `--outliers is a percentage in [0, 50), got ${pct}`);
  const clip = num('key-clip', pct / 2)!;
  if (!(clip >= 0 && clip < 50)) throw new SqueezeError('ERR_ARG', `--key-clip is a percentage in [0, 50), got ${clip}`);
  const batch = num('batch', 4)!;
  const slots = f.slots ?? 'auto';
  if (slots !== 'auto' && slots !== 'uniform') throw new SqueezeError('ERR_ARG', `calibrate-kv: --slots must be auto or uniform, got '${slots}'`);
  const allocateWindows = num('allocate-windows', 8)!;
  if (!(Number.isInteger(allocateWindows) && allocateWindows >= 1)) throw new SqueezeError('ERR_ARG', `--allocate-windows must be a positive whole number, got ${allocateWindows}`);
  if (f.fisher && f['no-sensitivity']) throw new SqueezeError('ERR_ARG', 'calibrate-kv: --fisher and --no-sensitivity exclude each other');
  const bp = f.fisher ? Backprop.open(dir) : undefined;
  const window = num('window');
  if (window !== undefined && !(Number.isInteger(window) && window >= 2)) throw new SqueezeError('ERR_ARG', `--window must be a whole number of tokens >= 2, got ${window}`);
  const model = await loadModel(dir, { device: typeof f.device === 'string' ? f.device : 'auto', maxBatch: batch, maxContext: window });
  try {
    const data = loadPplData(model, calib, { windows: num('windows'), window });
    const t0 = performance.now();
    const cal = await calibrateKv(model, data.windows, {
      onSamples: (done, total) => {
        if (process.stderr.isTTY || done === total)
          process.stderr.write(`\rcalibrate-kv: samples of layer ${done}/${total}${done === total ? '\n' : ''}`);
      },
      bits, outliers: pct / 100, keyClip: clip / 100, sink: num('sink', 4), keyPerToken: !!f['key-per-token'], postRope: !!f['post-rope'],
      codebook: f.uniform ? 'uniform' : 'kmeans', batch, sensitivity: !f['no-sensitivity'], fisher: bp,
      onProgress: (done, total) => {
        if (process.stderr.isTTY || done === total)
          process.stderr.write(`\rcalibrate-kv: gradients of window ${done}/${total}${done === total ? '\n' : ''}`);
      },
      slots, allocateWindows,
      onAllocate: (done, total) => {
        if (process.stderr.isTTY || done === total)
          process.stderr.write(`\rcalibrate-kv: outlier slots, prefill ${done}/${total}${done === total ? '\n' : ''}`);
      },
    });
    saveKvqCalibration(out, cal);
    process.stdout.write(JSON.stringify({
      out, bits, outliers: cal.outliers, sink: cal.sink, layers: cal.layers.length, windows: data.windows.length,
      keyPerToken: !!cal.keyPerToken, postRope: !!cal.postRope, codebook: cal.codebook,
      sensitivity: cal.sensitivity, ...(cal.slots ? { keySlots: cal.slots.key, valueSlots: cal.slots.value } : {}),
      bytesPerToken: quantizedBytesPerToken(model.config, cal), seconds: (performance.now() - t0) / 1000,
    }) + '\n');
  } finally {
    await model.dispose();
  }
}
