/**
 * LoRA adapters in PEFT's folder format (adapter_config.json + adapter_model.safetensors), read
 * and checked against a model's config, and packed per decoder linear site the way the adapter
 * pool stores them (runtime/lora-pool.ts).
 *
 * Each targeted linear W (out x in) gains scale * B A, A: r x in, B: out x r, scale = alpha / r
 * (alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern override r and alpha per module).
 * The decoder's fused sites (q|k|v, gate|up) take their targets' A rows stacked and their B
 * columns block-diagonal: the site's rank is the sum of its targets' ranks, and each target's
 * scale is folded into its B rows, so one batched op per site applies any mix of targets.
 */
import * as fs from 'fs';
import * as path from 'path';
import { SqueezeError } from '../errors';
import { ModelConfig } from './config';
import { SafetensorsFile } from './safetensors';

/** The decoder's linear sites, in forward order. */
export type LoraSite = 'qkv' | 'o' | 'gu' | 'down';
export const LORA_SITES: LoraSite[] = ['qkv', 'o', 'gu', 'down'];

/** A PEFT target module and where it sits in the decoder: site, and its output rows there. */
interface Target {
  module: string;
  site: LoraSite;
  /** First output row in the site's fused output, and how many. */
  outOffset: number;
  out: number;
  in: number;
}

/** The targets of a model, by PEFT module name (q_proj ... down_proj). */
export function loraTargets(cfg: ModelConfig): Target[] {
  const H = cfg.hiddenSize, D = cfg.headDim, q = cfg.numHeads * D, kv = cfg.numKvHeads * D, I = cfg.intermediateSize;
  return [
    { module: 'q_proj', site: 'qkv', outOffset: 0, out: q, in: H },
    { module: 'k_proj', site: 'qkv', outOffset: q, out: kv, in: H },
    { module: 'v_proj', site: 'qkv', outOffset: q + kv, out: kv, in: H },
    { module: 'o_proj', site: 'o', outOffset: 0, out: H, in: q },
    { module: 'gate_proj', site: 'gu', outOffset: 0, out: I, in: H },
    { module: 'up_proj', site: 'gu', outOffset: I, out: I, in: H },
    { module: 'down_proj', site: 'down', outOffset: 0, out: H, in: I },
  ];
}

/** Input and (fused) output width of each site. */
export function siteDims(cfg: ModelConfig): Record<LoraSite, { K: number; N: number }> {
  const H = cfg.hiddenSize, D = cfg.headDim, I = cfg.intermediateSize;
  return {
    qkv: { K: H, N: (cfg.numHeads + 2 * cfg.numKvHeads) * D },
    o: { K: cfg.numHeads * D, N: H },
    gu: { K: H, N: 2 * I },
    down: { K: I, N: H },
  };
}

/** One layer's share of an adapter at one site: A rows [rank, K] and scaled B^T rows [rank, N], fp32. */
export interface LoraSiteWeights {
  rank: number;
  a: Float32Array;
  bt: Float32Array;
}

/** An adapter read from disk: per layer, per site (absent: the adapter leaves that site alone). */
export interface LoraAdapter {
  name: string;
  /** The folder it came from (or '' when built in memory). */
  source: string;
  /** Rank of each targeted module (after rank_pattern; the largest where a pattern names single layers), by module name. */
  ranks: Record<string, number>;
  /** Scale of each targeted module (alpha / r, or alpha / sqrt(r) with rsLoRA; where patterns differ by layer, the first layer's). */
  scales: Record<string, number>;
  layers: Array<Partial<Record<LoraSite, LoraSiteWeights>>>;
  /** The largest site rank over layers and sites (what a pool slot must hold). */
  maxSiteRank: number;
  /** Bytes of fp32 weights held on the host. */
  bytes: number;
}

function formatError(file: string, msg: string): SqueezeError {
  return new SqueezeError('ERR_FORMAT', `${file}: ${msg}`);
}

/**
 * The value of a PEFT pattern map (rank_pattern, alpha_pattern) for a module: as PEFT does, the
 * first key (in the file's order) that matches the end of the module's full name, as a literal
 * or as a regular expression `(.*\.)?KEY$`.
 */
function patternValue(map: unknown, fullName: string, module: string): number | undefined {
  if (!map || typeof map !== 'object') return undefined;
  for (const [k, v] of Object.entries(map as Record<string, unknown>)) {
    if (typeof v !== 'number') continue;
    if (k === module || fullName === k || fullName.endsWith('.' + k)) return v;
    try {
      if (new RegExp(`^(.*\\.)?(${k})$`).test(fullName)) return v;
    } catch {
      // not a regular expression: only the literal matches above apply
    }
  }
  return undefined;
}

/**
 * Reads a PEFT LoRA folder for a model with config `cfg`. Everything is checked before any
 * weight is kept: the adapter type and options we do not implement (DoRA, biases, fan_in_fan_out,
 * modules_to_save, embedding or lm_head targets) are ERR_UNSUPPORTED; missing, misshapen or
 * unexpected tensors, and shapes that do not fit the model (an adapter made for another model)
 * are ERR_FORMAT naming the tensor and file. It yields to the event loop between tensors, so a
 * server that loads an adapter keeps streaming meanwhile. `weights: false` checks everything but
 * reads no weight data (ranks and shapes from the headers: what sizing a pool needs).
 */
export async function readLoraAdapter(dir: string, cfg: ModelConfig, name = path.basename(path.resolve(dir)),
  opts: { weights?: boolean } = {}): Promise<LoraAdapter> {
  const withWeights = opts.weights ?? true;
  const cfgFile = path.join(dir, 'adapter_config.json');
  if (!fs.existsSync(cfgFile)) throw new SqueezeError('ERR_FORMAT', `${dir}: no adapter_config.json (a PEFT LoRA folder is expected)`);
  let ac: Record<string, unknown>;
  try {
    ac = JSON.parse(fs.readFileSync(cfgFile, 'utf8'));
  } catch (e) {
    throw formatError(cfgFile, (e as Error).message);
  }
  const unsupported = (what: string) => new SqueezeError('ERR_UNSUPPORTED', `${cfgFile}: ${what}`);
  if (ac.peft_type !== undefined && ac.peft_type !== 'LORA') throw unsupported(`peft_type '${String(ac.peft_type)}' (only LORA)`);
  if (ac.use_dora === true) throw unsupported('DoRA adapters (use_dora) are not supported');
  if (ac.fan_in_fan_out === true) throw unsupported('fan_in_fan_out is for Conv1D models, not LLaMA linears');
  if (ac.bias !== undefined && ac.bias !== 'none') throw unsupported(`bias '${String(ac.bias)}' (only 'none')`);
  if (ac.lora_bias === true) throw unsupported('lora_bias is not supported');
  if (Array.isArray(ac.modules_to_save) && ac.modules_to_save.length) throw unsupported(`modules_to_save (${ac.modules_to_save.join(', ')}) is not supported`);
  if (ac.layer_replication) throw unsupported('layer_replication is not supported');
  const r0 = ac.r, alpha0 = ac.lora_alpha ?? ac.r;
  if (typeof r0 !== 'number' || !Number.isInteger(r0) || r0 < 1) throw formatError(cfgFile, `'r' must be a positive integer, got ${String(r0)}`);
  if (typeof alpha0 !== 'number' || !Number.isFinite(alpha0)) throw formatError(cfgFile, `'lora_alpha' must be a number, got ${String(alpha0)}`);
  const rslora = ac.use_rslora === true;
  const onlyLayers = Array.isArray(ac.layers_to_transform) ? new Set(ac.layers_to_transform as number[])
    : typeof ac.layers_to_transform === 'number' ? new Set([ac.layers_to_transform]) : undefined;

  const weightsFile = path.join(dir, 'adapter_model.safetensors');
  if (!fs.existsSync(weightsFile)) {
    if (fs.existsSync(path.join(dir, 'adapter_model.bin')))
      throw new SqueezeError('ERR_UNSUPPORTED', `${dir}: adapter_model.bin is a pickle; save the adapter with safetensors (PEFT's default)`);
    throw new SqueezeError('ERR_FORMAT', `${dir}: no adapter_model.safetensors`);
  }
  const st = SafetensorsFile.open(weightsFile);
  try {
    const targets = new Map(loraTargets(cfg).map((t) => [t.module, t]));
    // base_model.model.model.layers.{l}.{self_attn|mlp}.{module}.lora_{A|B}[.adapter].weight
    const re = /^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_(A|B)(?:\.[^.]+)?\.weight$/;
    const found = new Map<string, { l: number; module: string; A?: string; B?: string }>();
    for (const n of st.names()) {
      const m = re.exec(n);
      if (!m) {
        if (/lora_embedding|embed_tokens|lm_head/.test(n)) throw new SqueezeError('ERR_UNSUPPORTED', `${weightsFile}: tensor '${n}': LoRA on embeddings or lm_head is not supported`);
        throw formatError(weightsFile, `unexpected tensor '${n}' (LoRA A/B weights of the decoder's linears are expected)`);
      }
      const l = Number(m[1]), module = m[3];
      const t = targets.get(module);
      if (!t) throw formatError(weightsFile, `tensor '${n}': '${module}' is not a linear of this model (${[...targets.keys()].join(', ')})`);
      if (l >= cfg.numLayers) throw formatError(weightsFile, `tensor '${n}': layer ${l}, the model has ${cfg.numLayers}`);
      const part = `${m[2]}.${module}`;
      if ((m[2] === 'mlp') !== (t.site === 'gu' || t.site === 'down')) throw formatError(weightsFile, `tensor '${n}': '${module}' under '${m[2]}'`);
      const key = `${l}.${part}`;
      const rec = found.get(key) ?? { l, module };
      if (m[4] === 'A') rec.A = n;
      else rec.B = n;
      found.set(key, rec);
    }
    if (found.size === 0) throw formatError(weightsFile, 'no LoRA weights in it');
    const ranks: Record<string, number> = {}, scales: Record<string, number> = {};
    const perLayer: Array<Array<{ t: Target; rank: number; scale: number; A: Float32Array; B: Float32Array }>> = Array.from({ length: cfg.numLayers }, () => []);
    for (const rec of found.values()) {
      const t = targets.get(rec.module)!;
      const prefix = `layer ${rec.l} ${rec.module}`;
      if (!rec.A || !rec.B) throw formatError(weightsFile, `${prefix}: lora_${rec.A ? 'B' : 'A'} is missing`);
      if (onlyLayers && !onlyLayers.has(rec.l)) throw formatError(weightsFile, `${prefix}: layer ${rec.l} is not in layers_to_transform`);
      const ea = st.entry(rec.A), eb = st.entry(rec.B);
      const full = `model.layers.${rec.l}.${t.site === 'gu' || t.site === 'down' ? 'mlp' : 'self_attn'}.${rec.module}`;
      const rank = patternValue(ac.rank_pattern, full, rec.module) ?? r0;
      const alpha = patternValue(ac.alpha_pattern, full, rec.module) ?? alpha0;
      if (ea.shape.length !== 2 || ea.shape[0] !== rank || ea.shape[1] !== t.in)
        throw formatError(weightsFile, `tensor '${rec.A}' is [${ea.shape}], expected [${rank}, ${t.in}] (rank ${rank}, the model's ${rec.module} input)`);
      if (eb.shape.length !== 2 || eb.shape[0] !== t.out || eb.shape[1] !== rank)
        throw formatError(weightsFile, `tensor '${rec.B}' is [${eb.shape}], expected [${t.out}, ${rank}] (the model's ${rec.module} output, rank ${rank})`);
      for (const [name, e] of [[rec.A, ea], [rec.B, eb]] as const)
        if (!['F32', 'F16', 'BF16'].includes(e.dtype)) throw formatError(weightsFile, `tensor '${name}' has dtype ${e.dtype}; LoRA weights must be F32, F16 or BF16`);
      const scale = rslora ? alpha / Math.sqrt(rank) : alpha / rank;
      // for reporting (patterns may name single layers): the largest rank, the first scale seen
      ranks[rec.module] = Math.max(ranks[rec.module] ?? 0, rank);
      scales[rec.module] ??= scale;
      if (!withWeights) {
        perLayer[rec.l].push({ t, rank, scale, A: new Float32Array(0), B: new Float32Array(0) });
        continue;
      }
      const A = st.readFloat32(rec.A), B = st.readFloat32(rec.B);
      await new Promise<void>((r) => setImmediate(r));
      perLayer[rec.l].push({ t, rank, scale, A, B });
    }
    const dims = siteDims(cfg);
    let maxSiteRank = 0, bytes = 0;
    const layers = perLayer.map((mods) => {
      const out: Partial<Record<LoraSite, LoraSiteWeights>> = {};
      for (const site of LORA_SITES) {
        const ms = mods.filter((m) => m.t.site === site).sort((x, y) => x.t.outOffset - y.t.outOffset);
        if (!ms.length) continue;
        const { K, N } = dims[site];
        const rank = ms.reduce((s, m) => s + m.rank, 0);
        const a = new Float32Array(withWeights ? rank * K : 0), bt = new Float32Array(withWeights ? rank * N : 0);
        let r = 0;
        for (const m of withWeights ? ms : []) {
          a.set(m.A, r * K);
          // B is [out, rank] row-major: B^T row j holds column j of B, scaled, at the target's output offset
          for (let j = 0; j < m.rank; j++) {
            const row = (r + j) * N + m.t.outOffset;
            for (let o = 0; o < m.t.out; o++) bt[row + o] = m.B[o * m.rank + j] * m.scale;
          }
          r += m.rank;
        }
        out[site] = { rank, a, bt };
        maxSiteRank = Math.max(maxSiteRank, rank);
        bytes += (a.length + bt.length) * 4;
      }
      return out;
    });
    return { name, source: path.resolve(dir), ranks, scales, layers, maxSiteRank, bytes };
  } finally {
    st.close();
  }
}
