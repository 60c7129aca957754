/**
 * `squeezelm convert FILE.pt --model BASE --out DIR`: turns an upstream SqueezeLLM PyTorch
 * checkpoint into our interchange-format model folder. The checkpoint is read with the
 * restricted pickle reader (nothing in it is executed). Per linear it holds `<p>.qweight`,
 * `<p>.lookup_table`, optionally the CSR outliers `<p>.rows/.cols/.vals` and dense rows
 * `<p>.full_rows` [K, topX] with `<p>.full_row_indices` [topX] (added on top of the LUT and sparse
 * parts by the upstream kernels). Dense rows are folded into the CSR: every column of such a row
 * becomes an outlier stored as (effective weight − the row's centroid nearest zero), with its code
 * set to that centroid, so dense + sparse reproduces the upstream product exactly. `startrows`
 * (a load-balancing hint) is dropped. BASE supplies config, tokenizer and every tensor the
 * checkpoint lacks.
 */
import * as fs from 'fs';
import * as path from 'path';
import { SqueezeError } from '../errors';
import { Checkpoint, WriteTensor, writeSafetensors } from '../model/safetensors';
import { f16BitsToFloat32, bf16BitsToFloat32 } from '../util/half';
import { TorchCheckpoint } from './pickle';
import {
  SqueezeLinear, TensorReader, packCodes, readSqueezeLinear, squeezeMetadata, squeezeTensors, unpackCodes,
} from './squeezellm';

const QUANT_SUFFIXES = ['qweight', 'lookup_table', 'rows', 'cols', 'vals', 'full_rows', 'full_row_indices', 'startrows'];

function floats(file: string, name: string, r: { dtype: string; data: ArrayBufferView }): Float32Array {
  if (r.dtype === 'F32') return r.data as Float32Array;
  if (r.dtype === 'F16') return f16BitsToFloat32(r.data as Uint16Array);
  if (r.dtype === 'BF16') return bf16BitsToFloat32(r.data as Uint16Array);
  throw new SqueezeError('ERR_FORMAT', `${file}: ${name}: expected F16/BF16/F32, got ${r.dtype}`);
}

/**
 * Folds upstream dense rows into the CSR part. full [K, topX] (column j = the dense contribution
 * of output row idx[j]); returns a new linear whose dense + sparse equals LUT + CSR + full.
 */
export function foldFullRows(l: SqueezeLinear, full: Float32Array, idx: Int32Array, what: string): SqueezeLinear {
  const { N, K, bits } = l, E = 1 << bits, topX = idx.length;
  if (full.length !== K * topX) throw new SqueezeError('ERR_FORMAT', `${what}.full_rows: ${full.length} values, expected ${K} x ${topX}`);
  const slot = new Int32Array(N).fill(-1);
  for (let j = 0; j < topX; j++) {
    const n = idx[j];
    if (n < 0 || n >= N) throw new SqueezeError('ERR_FORMAT', `${what}.full_row_indices[${j}] = ${n} is outside [0, ${N})`);
    if (slot[n] >= 0) throw new SqueezeError('ERR_FORMAT', `${what}.full_row_indices: row ${n} appears twice`);
    slot[n] = j;
  }
  const codes = unpackCodes(l.qweight, N, K, bits);
  const rows = new Int32Array(N + 1), cols: number[] = [], vals: number[] = [];
  const sparseRow = new Float32Array(K);
  for (let n = 0; n < N; n++) {
    const j = slot[n];
    const r0 = l.rows ? l.rows[n] : 0, r1 = l.rows ? l.rows[n + 1] : 0;
    if (j < 0) {
      for (let t = r0; t < r1; t++) { cols.push(l.cols![t]); vals.push(l.vals![t]); }
    } else {
      let z = 0;
      for (let e = 1; e < E; e++) if (Math.abs(l.lut[n * E + e]) < Math.abs(l.lut[n * E + z])) z = e;
      sparseRow.fill(0);
      for (let t = r0; t < r1; t++) sparseRow[l.cols![t]] += l.vals![t];
      for (let k = 0; k < K; k++) {
        const eff = l.lut[n * E + codes[n * K + k]] + sparseRow[k] + full[k * topX + j];
        codes[n * K + k] = z;
        cols.push(k);
        vals.push(eff - l.lut[n * E + z]);
      }
    }
    rows[n + 1] = cols.length;
  }
  return {
    N, K, bits, qweight: packCodes(codes, N, K, bits), lut: l.lut,
    rows, cols: Int32Array.from(cols), vals: Float32Array.from(vals),
  };
}

export interface ConvertOptions {
  /** Hugging Face folder with config.json, tokenizer and the unquantized tensors. */
  model: string;
  out: string;
  onProgress?: (done: number, total: number, name: string) => void;
}

export interface ConvertResult {
  linears: number;
  outliers: number;
  foldedRows: number;
  fromCheckpoint: number;
  fromBase: number;
  dropped: string[];
}

/** Converts an upstream SqueezeLLM .pt checkpoint into a model folder (see the file comment). */
export async function convertCheckpoint(ptFile: string, o: ConvertOptions): Promise<ConvertResult> {
  const cfgPath = path.join(o.model, 'config.json');
  let cfg: Record<string, unknown>;
  try { cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8')); } catch (e) {
    throw new SqueezeError('ERR_FORMAT', `${cfgPath}: ${(e as Error).message}`);
  }
  const pt = TorchCheckpoint.open(ptFile);
  let base: Checkpoint | undefined;
  const tensors: Record<string, WriteTensor> = {};
  const res: ConvertResult = { linears: 0, outliers: 0, foldedRows: 0, fromCheckpoint: 0, fromBase: 0, dropped: [] };
  const bitsSeen = new Set<number>();
  const dtypes = { lut: new Set<string>(), vals: new Set<string>() };
  let total = 0;
  try {
    base = Checkpoint.open(o.model);
    const names = pt.names();
    const prefixes = names.filter((n) => n.endsWith('.qweight')).map((n) => n.slice(0, -'.qweight'.length));
    if (!prefixes.length) throw new SqueezeError('ERR_FORMAT', `${ptFile}: no '<linear>.qweight' tensors: not a SqueezeLLM checkpoint`);
    const qset = new Set(prefixes);
    const reader: TensorReader = { has: (n) => pt.has(n), read: (n) => pt.read(n) };
    for (const prefix of prefixes) {
      const wname = `${prefix}.weight`;
      if (!base.has(wname)) throw new SqueezeError('ERR_FORMAT', `${o.model}: no tensor '${wname}' for the quantized linear '${prefix}' of ${ptFile}`);
      const [N, K] = base.entry(wname).shape;
      if (!pt.has(`${prefix}.lookup_table`)) throw new SqueezeError('ERR_FORMAT', `${ptFile}: '${prefix}.qweight' without '${prefix}.lookup_table'`);
      let l = readSqueezeLinear(reader, prefix, K);
      if (l.N !== N) throw new SqueezeError('ERR_SHAPE', `${ptFile}: '${prefix}' has ${l.N} output rows, ${wname} in ${o.model} has ${N}`);
      const lutDtype = pt.read(`${prefix}.lookup_table`).dtype === 'F16' ? 'f16' : 'f32';
      let valDtype: 'f16' | 'f32' = 'f32';
      if (pt.has(`${prefix}.vals`) && pt.read(`${prefix}.vals`).dtype === 'F16') valDtype = 'f16';
      const fr = `${prefix}.full_rows`, fi = `${prefix}.full_row_indices`;
      if (pt.has(fr) !== pt.has(fi)) throw new SqueezeError('ERR_FORMAT', `${ptFile}: '${fr}' and '${fi}' come together`);
      if (pt.has(fr)) {
        const f = pt.read(fr), ix = pt.read(fi);
        if (ix.dtype !== 'I32' && ix.dtype !== 'I64') throw new SqueezeError('ERR_FORMAT', `${ptFile}: ${fi}: expected an integer tensor, got ${ix.dtype}`);
        const idx = ix.dtype === 'I32' ? (ix.data as Int32Array) : Int32Array.from(ix.data as BigInt64Array, (v) => Number(v));
        if (f.shape.length !== 2 || f.shape[0] !== K || f.shape[1] !== idx.length)
          throw new SqueezeError('ERR_FORMAT', `${ptFile}: ${fr} is [${f.shape}], expected [${K}, ${idx.length}]`);
        if (idx.length > 0) {
          l = foldFullRows(l, floats(ptFile, fr, f), idx, `${ptFile}: ${prefix}`);
          res.foldedRows += idx.length;
          // dense rows hold fp16/fp32 values: keep them exactly
          if (f.dtype !== 'F16') valDtype = 'f32';
        }
      }
      Object.assign(tensors, squeezeTensors(prefix, l, lutDtype, valDtype));
      dtypes.lut.add(lutDtype);
      if (l.cols) dtypes.vals.add(valDtype);
      bitsSeen.add(l.bits);
      res.linears++;
      res.outliers += l.cols?.length ?? 0;
      total += l.N * l.K;
      o.onProgress?.(res.linears, prefixes.length, prefix);
    }
    // Everything else: the checkpoint's tensor where it has one (same shape), the base's otherwise.
    for (const name of base.names()) {
      const dot = name.lastIndexOf('.');
      if (name.endsWith('.weight') && qset.has(name.slice(0, dot))) continue;
      if (pt.has(name)) {
        const r = pt.read(name), e = base.entry(name);
        if (r.shape.join(',') !== e.shape.join(','))
          throw new SqueezeError('ERR_SHAPE', `${ptFile}: '${name}' is [${r.shape}], ${o.model} has [${e.shape}]`);
        tensors[name] = { dtype: r.dtype, shape: r.shape, data: r.data };
        res.fromCheckpoint++;
      } else {
        const r = base.read(name);
        tensors[name] = { dtype: r.dtype, shape: r.shape, data: r.data };
        res.fromBase++;
      }
    }
    for (const name of names) {
      const dot = name.lastIndexOf('.');
      const isQuant = qset.has(name.slice(0, dot)) && QUANT_SUFFIXES.includes(name.slice(dot + 1));
      if (!isQuant && !base.has(name)) res.dropped.push(name);
    }
  } finally {
    pt.close();
    base?.close();
  }
  fs.mkdirSync(o.out, { recursive: true });
  const bits = Math.max(...bitsSeen);
  writeSafetensors(path.join(o.out, 'model.safetensors'), tensors, squeezeMetadata({
    bits, lut_dtype: dtypes.lut.has('f32') ? 'f32' : 'f16', outlier_dtype: dtypes.vals.has('f32') ? 'f32' : 'f16', outlier_share: total ? res.outliers / total : 0,
    source: path.basename(ptFile),
  }));
  cfg.quantization_config = {
    quant_method: 'squeezellm', bits, outlier_share: total ? res.outliers / total : 0, source: 'convert',
  };
  fs.writeFileSync(path.join(o.out, 'config.json'), JSON.stringify(cfg, null, 2));
  for (const f of fs.readdirSync(o.model))
    if (/^(tokenizer.*|special_tokens_map\.json|generation_config\.json|.*\.model)$/.test(f))
      fs.copyFileSync(path.join(o.model, f), path.join(o.out, f));
  return res;
}

/** `squeezelm convert FILE.pt --model BASE --out DIR`. */
export async function convertCommand(argv: string[]): Promise<void> {
  const pos: string[] = [];
  const opt: Record<string, string> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const k = eq > 0 ? a.slice(2, eq) : a.slice(2);
      if (k !== 'model' && k !== 'out') throw new SqueezeError('ERR_ARG', `convert: unknown option --${k}`);
      if (eq > 0) opt[k] = a.slice(eq + 1);
      else {
        if (i + 1 >= argv.length) throw new SqueezeError('ERR_ARG', `--${k} needs a value`);
        opt[k] = argv[++i];
      }
    } else pos.push(a);
  }
  if (pos.length !== 1 || !opt.model || !opt.out)
    throw new SqueezeError('ERR_ARG', 'usage: squeezelm convert FILE.pt --model BASE --out DIR');
  const t0 = Date.now();
  const r = await convertCheckpoint(pos[0], {
    model: opt.model, out: opt.out,
    onProgress: (d, t, n) => process.stderr.write(`\r[${d}/${t}] ${n}`.padEnd(60)),
  });
  process.stderr.write(`\nconverted ${r.linears} linears (${r.outliers} outliers, ${r.foldedRows} dense rows folded; ` +
    `${r.fromCheckpoint} tensors from the checkpoint, ${r.fromBase} from the base` +
    `${r.dropped.length ? `, ${r.dropped.length} unused dropped` : ''}) in ${((Date.now() - t0) / 1000).toFixed(1)} s -> ${opt.out}\n`);
}
