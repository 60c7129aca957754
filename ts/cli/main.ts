/**
 * The squeezelm command: generate, ppl, info, serve. Errors print `squeezelm: CODE message` and
 * exit with status 1.
 */
import * as fs from 'fs';
import * as path from 'path';
import { SqueezeError, isSqueezeError } from '../errors';
import { packageRoot } from '../native';
import { devices } from '../device';
import { loadModel, describeModel } from '../model/model';
import { loadPplData, perplexity } from '../runtime/ppl';
import { quantizeCommand } from '../quant/squeezellm';
import { convertCommand } from '../quant/convert';
import { calibrateKvCommand } from '../quant/kvquant-calibrate';
import { fisherCommand } from '../quant/gradients';
import { createServer } from '../server/server';
import { loadConfig } from '../model/config';
import { readLoraAdapter } from '../model/lora';

const HELP = `squeezelm: LLaMA-family inference on one NVIDIA GPU (or the CPU)

usage:
  squeezelm generate [--model DIR] --prompt TEXT [--max-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--seed S] [--device D] [--kv-bits 2|3|4 --kv-calib FILE]
                     [--lora DIR]
      streams the continuation of TEXT to stdout (the prompt is not echoed); --kv-bits/--kv-calib:
      a quantized KV cache (calibrate-kv); --lora: a PEFT LoRA adapter folder
  squeezelm quantize --model DIR --out DIR [--bits 3|4] [--outliers PCT] [--sensitive PCT]
                     [--calib FILE [--calib-windows N] [--calib-window L] [--calib-power P]] [--gptq [--gptq-rounds R] [--damp D]]
                     [--outlier-score weight|error] [--fisher FILE] [--rtn] [--lm-head] [--device cpu|cuda] [--no-resume]
      SqueezeLLM dense-and-sparse weights: per-row weighted k-means tables; --outliers PCT
      (default 0.45) and --sensitive PCT (default 0.05, with --calib or --fisher) are the
      percentages of each matrix kept exact; --calib FILE (ids [windows, length], or text cut
      into windows of --calib-window L tokens, default 1024) weighs the k-means by the mean
      squared input per channel (all windows unless --calib-windows);
      --gptq (needs --calib) adds error compensation with table refits under E[x xT]
      (R rounds, default 3; damping D x mean diagonal, default 0.01); --outlier-score error
      picks the sensitive outliers by their error after a first fit; --rtn: uniform baseline;
      --lm-head: the lm_head quantized too (default: kept as stored, like the embeddings).
      Each finished linear is kept in OUT/.squeezelm-partial until the model is written: run the
      same command again after an interruption and it goes on from there (--no-resume: start over)
  squeezelm fisher [--model DIR] --calib FILE --out FILE [--windows N] [--window L]
      the Fisher diagonal of every decoder linear and the lm_head (mean squared loss gradient over the
      calibration windows, ids or text as ppl reads them; fp32 on the CPU, for models that
      fit in memory) for quantize --fisher
  squeezelm convert FILE.pt --model DIR --out DIR (upstream SqueezeLLM checkpoint)
  squeezelm calibrate-kv [--model DIR] --calib FILE --bits 2|3|4 --out FILE [--outliers PCT]
                [--key-clip PCT] [--sink N] [--windows N] [--window L] [--fisher] [--no-sensitivity] [--key-per-token] [--post-rope] [--uniform]
      calibrates the KVQuant cache quantizer (safetensors; docs/kvquant.md)
  squeezelm ppl [--model DIR] --data FILE [--windows N] [--window L] [--device D]
                [--batch B] [--kv-bits 2|3|4 --kv-calib FILE | --kv-bits 16] [--decode]
                [--lora DIR] [--prefix-tokens P [--squeeze KEEP] [--clusters C]] [--progress] [--json]
      perplexity over FILE: a safetensors file with 'ids' [windows, length] int32, or a
      text file cut into windows of L tokens (default 1024; --window L also cuts each row of a
      safetensors file into windows of L); --windows N: the first N windows. One JSON line.
      --kv-bits/--kv-calib: a quantized KV cache; these runs (and --kv-bits 16, or --decode)
      feed each window token by token, B windows per step, as generation sees the cache;
      --lora: with a PEFT LoRA adapter; --prefix-tokens P: each window's first P tokens are cached
      as a prefix (with --squeeze KEEP, clustered: Squeezed Attention over KEEP of C clusters, default
      one per 16 tokens) and the rest of the window is scored token by token after it
  squeezelm serve [--model DIR] [--host H] [--port P] [--name NAME] [--device D] [--max-batch N]
                  [--max-context N] [--api-key KEY] [--cors ORIGIN] [--kv-bits 2|3|4 --kv-calib FILE]
                  [--lora [NAME=]DIR[,...] [--lora-slots N] [--lora-rank R]] [--allow-adapter-loading]
                  [--cache-prefix FILE [--squeeze KEEP]] [--quiet]
      an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models,
      /health; docs/server.md) on H:P (default 127.0.0.1:8080; port 0 picks a free one);
      concurrent requests are batched together; --api-key (or SQUEEZELM_API_KEY) requires
      'Authorization: Bearer KEY'; --lora serves PEFT LoRA adapters under their names (the
      request's "model"), --lora-slots of them resident on the device at once (default 4),
      --lora-rank rows each per layer and site (default: what the largest needs);
      --allow-adapter-loading lets clients load and unload adapters from this machine's folders
      (POST /v1/load_lora_adapter, /v1/unload_lora_adapter); --cache-prefix keeps the KV of FILE's
      text (a shared system prompt, say) so requests starting with its tokens skip its prefill;
      --squeeze KEEP also clusters its keys (Squeezed Attention): decode attends to that share of
      them (docs/squeezed.md);
      one log line per request on stderr
      unless --quiet; stops cleanly on SIGINT / SIGTERM
  squeezelm info [--model DIR] [--device D] [--kv-bits 2|3|4 --kv-calib FILE]
      config summary, parameter count, dtypes, quantized linears (bits, bytes), KV cache bytes
      per token, devices
  squeezelm --help

--model defaults to the embedded pycoder-mini; --device is auto (cuda when usable), cpu or cuda.`;

type Flags = Record<string, string | boolean>;

const BOOL = new Set(['json', 'progress', 'help', 'decode', 'quiet', 'allow-adapter-loading']);

function parse(argv: string[]): { cmd?: string; flags: Flags } {
  const flags: Flags = {};
  let cmd: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-h') flags.help = true;
    else if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq > 0 ? a.slice(2, eq) : a.slice(2);
      if (BOOL.has(name)) flags[name] = true;
      else if (eq > 0) flags[name] = a.slice(eq + 1);
      else {
        if (i + 1 >= argv.length) throw new SqueezeError('ERR_ARG', `--${name} needs a value`);
        flags[name] = argv[++i];
      }
    } else if (!cmd) cmd = a;
    else throw new SqueezeError('ERR_ARG', `unexpected argument '${a}'`);
  }
  return { cmd, flags };
}

function str(f: Flags, name: string): string | undefined {
  const v = f[name];
  return typeof v === 'string' ? v : undefined;
}

function numFlag(f: Flags, name: string, integer = false): number | undefined {
  const v = str(f, name);
  if (v === undefined) return undefined;
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || (integer && !Number.isInteger(n)))
    throw new SqueezeError('ERR_ARG', `--${name} must be ${integer ? 'an integer' : 'a number'}, got '${v}'`);
  return n;
}

function allow(f: Flags, names: string[]): void {
  for (const k of Object.keys(f)) if (!names.includes(k)) throw new SqueezeError('ERR_ARG', `unknown option --${k}`);
}

export function defaultModelDir(): string {
  return path.join(packageRoot(), 'models', 'pycoder-mini');
}

function modelDir(f: Flags): string {
  const d = str(f, 'model') ?? defaultModelDir();
  if (!fs.existsSync(path.join(d, 'config.json'))) throw new SqueezeError('ERR_ARG', `--model: ${d} has no config.json`);
  return d;
}

function progressBar(enabled: boolean, label: string): (done: number, total: number) => void {
  if (!enabled) return () => undefined;
  const t0 = Date.now();
  return (done, total) => {
    const w = 30;
    const fill = total ? Math.round((w * done) / total) : w;
    const s = ((Date.now() - t0) / 1000).toFixed(1);
    process.stderr.write(`\r${label} [${'#'.repeat(fill)}${'.'.repeat(w - fill)}] ${done}/${total} ${s}s`);
    if (done >= total) process.stderr.write('\n');
  };
}

/**
 * --kv-bits B [--kv-calib FILE]: the quantized KV cache option of loadModel (undefined for none or
 * --kv-bits 16); `bits` the --kv-bits value as given (16 included).
 */
function kvCacheFlags(f: Flags, cmd: string): { bits?: number; kvCache?: { bits: number; calibration: string } } {
  const bits = numFlag(f, 'kv-bits', true);
  const calibration = str(f, 'kv-calib');
  if (bits !== undefined && bits !== 16 && bits !== 2 && bits !== 3 && bits !== 4)
    throw new SqueezeError('ERR_ARG', `${cmd}: --kv-bits must be 2, 3, 4 or 16, got ${bits}`);
  if (bits !== undefined && bits !== 16 && !calibration) throw new SqueezeError('ERR_ARG', `${cmd}: --kv-bits 2|3|4 needs --kv-calib FILE`);
  if (calibration && (bits === undefined || bits === 16)) throw new SqueezeError('ERR_ARG', `${cmd}: --kv-calib needs --kv-bits 2|3|4`);
  return { bits, kvCache: calibration ? { bits: bits!, calibration } : undefined };
}

/**
 * --lora [NAME=]DIR[,[NAME=]DIR...]: adapter folders and their names (default: the folder's name).
 * Without --lora-rank the pool's rows per adapter fit the largest of these adapters.
 */
async function loraFlags(f: Flags, cmd: string): Promise<{ lora?: { maxAdapters?: number; maxRank?: number }; adapters: Array<{ name?: string; dir: string }> }> {
  const spec = str(f, 'lora');
  const slots = numFlag(f, 'lora-slots', true), rank = numFlag(f, 'lora-rank', true);
  if (!spec) {
    if (slots !== undefined || rank !== undefined) throw new SqueezeError('ERR_ARG', `${cmd}: --lora-slots / --lora-rank need --lora`);
    return { adapters: [] };
  }
  const adapters = spec.split(',').filter(Boolean).map((item) => {
    const eq = item.indexOf('=');
    return eq > 0 ? { name: item.slice(0, eq), dir: item.slice(eq + 1) } : { dir: item };
  });
  if (!adapters.length) throw new SqueezeError('ERR_ARG', `${cmd}: --lora needs at least one adapter folder`);
  let maxRank = rank;
  if (maxRank === undefined) {
    const cfg = loadConfig(modelDir(f));
    maxRank = 0;
    for (const a of adapters) maxRank = Math.max(maxRank, (await readLoraAdapter(a.dir, cfg, undefined, { weights: false })).maxSiteRank);
  }
  return { lora: { maxAdapters: slots, maxRank }, adapters };
}

async function cmdGenerate(f: Flags): Promise<void> {
  allow(f, ['model', 'prompt', 'max-tokens', 'temperature', 'top-k', 'top-p', 'seed', 'device', 'progress', 'kv-bits', 'kv-calib', 'lora', 'lora-rank']);
  const prompt = str(f, 'prompt');
  if (prompt === undefined) throw new SqueezeError('ERR_ARG', 'generate: --prompt TEXT is required');
  const { kvCache } = kvCacheFlags(f, 'generate');
  const { lora, adapters } = await loraFlags(f, 'generate');
  if (adapters.length > 1) throw new SqueezeError('ERR_ARG', 'generate: --lora takes one adapter folder');
  const model = await loadModel(modelDir(f), { device: str(f, 'device') ?? 'auto', maxBatch: 1, kvCache, lora: lora && { ...lora, maxAdapters: 1 } });
  try {
    const adapter = adapters.length ? (await model.loadAdapter(adapters[0].dir, { name: adapters[0].name })).name : undefined;
    const it = model.generate({
      adapter,
      prompt,
      maxTokens: numFlag(f, 'max-tokens', true) ?? 128,
      temperature: numFlag(f, 'temperature'),
      topK: numFlag(f, 'top-k', true),
      topP: numFlag(f, 'top-p'),
      seed: numFlag(f, 'seed', true),
    });
    for await (const e of it) if (e.text) process.stdout.write(e.text);
    process.stdout.write('\n');
  } finally {
    await model.dispose();
  }
}

async function cmdPpl(f: Flags): Promise<void> {
  allow(f, ['model', 'data', 'windows', 'window', 'device', 'batch', 'json', 'progress', 'kv-bits', 'kv-calib', 'decode', 'lora', 'lora-rank',
    'prefix-tokens', 'squeeze', 'clusters']);
  const data = str(f, 'data');
  if (!data) throw new SqueezeError('ERR_ARG', 'ppl: --data FILE is required');
  const window = numFlag(f, 'window', true);
  const batch = numFlag(f, 'batch', true) ?? 1;
  const { bits: kvBits, kvCache } = kvCacheFlags(f, 'ppl');
  const decode = f.decode === true || kvBits !== undefined;
  const { lora, adapters } = await loraFlags(f, 'ppl');
  if (adapters.length > 1) throw new SqueezeError('ERR_ARG', 'ppl: --lora takes one adapter folder');
  const prefixTokens = numFlag(f, 'prefix-tokens', true), keep = numFlag(f, 'squeeze'), clusters = numFlag(f, 'clusters', true);
  // A cached prefix is a sequence of its own beside the window forked from it: the fork copies the
  // prefix's last, partly filled page, one page more than the window alone takes.
  const model = await loadModel(modelDir(f), {
    device: str(f, 'device') ?? 'auto', maxBatch: batch + (prefixTokens !== undefined ? 1 : 0), maxContext: window, kvCache,
    lora: lora && { ...lora, maxAdapters: 1 },
  });
  try {
    const adapter = adapters.length ? (await model.loadAdapter(adapters[0].dir, { name: adapters[0].name })).name : undefined;
    const d = loadPplData(model, data, { windows: numFlag(f, 'windows', true), window });
    const show = f.progress === true || process.stderr.isTTY === true;
    if (prefixTokens === undefined && (keep !== undefined || clusters !== undefined)) throw new SqueezeError('ERR_ARG', 'ppl: --squeeze / --clusters need --prefix-tokens P');
    if (prefixTokens !== undefined && (prefixTokens < 1 || prefixTokens > d.length - 2))
      throw new SqueezeError('ERR_ARG', `ppl: --prefix-tokens must be 1 .. ${d.length - 2} for windows of ${d.length}`);
    const prefix = prefixTokens === undefined ? undefined : { tokens: prefixTokens, squeeze: keep === undefined ? undefined : { keep, clusters } };
    // a prefix run is decode-style by construction (its own flag is for whole windows)
    const r = await perplexity(model, d, { batch, decode: decode && !prefix, adapter, prefix, onProgress: progressBar(show, 'ppl') });
    const kv = model.kvCache;
    const out = {
      ppl: r.ppl, tokens: r.tokens, seconds: r.seconds, windows: r.windows, device: r.device,
      mode: prefix ? 'prefix' : decode ? 'decode' : 'prefill', kvBits: kv.bits, kvBytesPerToken: kv.bytesPerToken,
      ...(prefix ? { prefixTokens } : {}),
      ...(r.clusters !== undefined ? { squeeze: keep, clusters: r.clusters, topClusters: r.topClusters } : {}),
      ...(adapter !== undefined ? { adapter } : {}),
    };
    process.stdout.write(JSON.stringify(out) + '\n');
  } finally {
    await model.dispose();
  }
}

async function cmdServe(f: Flags): Promise<void> {
  allow(f, ['model', 'host', 'port', 'name', 'device', 'max-batch', 'max-context', 'api-key', 'cors', 'kv-bits', 'kv-calib', 'quiet',
    'lora', 'lora-slots', 'lora-rank', 'allow-adapter-loading', 'cache-prefix', 'squeeze']);
  const port = numFlag(f, 'port', true) ?? 8080;
  if (port < 0 || port > 65535) throw new SqueezeError('ERR_ARG', `serve: --port must be 0..65535, got ${port}`);
  const host = str(f, 'host') ?? '127.0.0.1';
  const { kvCache } = kvCacheFlags(f, 'serve');
  const { lora, adapters } = await loraFlags(f, 'serve');
  const dir = modelDir(f);
  const model = await loadModel(dir, {
    device: str(f, 'device') ?? 'auto', maxBatch: numFlag(f, 'max-batch', true) ?? 8, maxContext: numFlag(f, 'max-context', true), kvCache, lora,
  });
  try {
    for (const a of adapters) await model.loadAdapter(a.dir, { name: a.name });
    const prefixFile = str(f, 'cache-prefix');
    if (prefixFile !== undefined) {
      if (!fs.existsSync(prefixFile)) throw new SqueezeError('ERR_ARG', `serve: --cache-prefix: no file ${prefixFile}`);
      const keep = numFlag(f, 'squeeze');
      const p = await model.cachePrefix(fs.readFileSync(prefixFile, 'utf8'), keep === undefined ? {} : { squeeze: { keep } });
      const how = p.clusters ? ` in ${p.clusters} clusters per layer and kv head, ${p.topClusters} attended` : '';
      process.stderr.write(`squeezelm: cached a ${p.length}-token prefix${how}\n`);
    } else if (str(f, 'squeeze') !== undefined) {
      throw new SqueezeError('ERR_ARG', 'serve: --squeeze needs --cache-prefix FILE');
    }
  } catch (e) {
    await model.dispose();
    throw e;
  }
  const cors = str(f, 'cors');
  const server = createServer(model, {
    modelName: str(f, 'name') ?? path.basename(path.resolve(dir)),
    apiKey: str(f, 'api-key') ?? (process.env.SQUEEZELM_API_KEY || undefined),
    cors: cors === '*' ? true : cors,
    allowAdapterLoading: f['allow-adapter-loading'] === true,
    log: f.quiet === true ? undefined : (line) => process.stderr.write(`${new Date().toISOString()} ${line}\n`),
  });
  try {
    const at = await server.listen(port, host);
    const also = model.adapters.length ? ` (adapters: ${model.adapters.join(', ')})` : '';
    process.stdout.write(`squeezelm: serving '${server.modelName}'${also} on ${model.device} at ${at.url}\n`);
  } catch (e) {
    await model.dispose();
    throw new SqueezeError('ERR_ARG', `serve: cannot listen on ${host}:${port} (${(e as Error).message})`);
  }
  await new Promise<void>((resolve) => {
    const stop = () => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  process.stderr.write('squeezelm: shutting down\n');
  await server.close();
  await model.dispose();
}

async function cmdInfo(f: Flags): Promise<void> {
  allow(f, ['model', 'device', 'json', 'kv-bits', 'kv-calib']);
  const { kvCache } = kvCacheFlags(f, 'info');
  const model = await loadModel(modelDir(f), { device: str(f, 'device') ?? 'auto', maxBatch: 1, maxContext: 16, kvCache });
  try {
    const info = { model: modelDir(f), ...describeModel(model), devices: devices() };
    process.stdout.write(JSON.stringify(info, null, f.json ? 0 : 2) + '\n');
  } finally {
    await model.dispose();
  }
}

// A reader that stops early (`squeezelm generate ... | head`) closes the pipe under us: stop
// quietly, as command-line tools do, instead of dying on an unhandled EPIPE with a stack trace.
let stdoutGuarded = false;
function guardStdoutPipe(): void {
  if (stdoutGuarded) return;
  stdoutGuarded = true;
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(0);
    throw e;
  });
}

export async function main(argv: string[]): Promise<number> {
  guardStdoutPipe();
  try {
    // Subcommands with their own argument parsing get the raw arguments.
    if (argv[0] === 'quantize') { await quantizeCommand(argv.slice(1)); return 0; }
    if (argv[0] === 'convert') { await convertCommand(argv.slice(1)); return 0; }
    if (argv[0] === 'calibrate-kv') { await calibrateKvCommand(argv.slice(1), defaultModelDir()); return 0; }
    if (argv[0] === 'fisher') { await fisherCommand(argv.slice(1), defaultModelDir()); return 0; }
    const { cmd, flags } = parse(argv);
    if (flags.help || !cmd || cmd === 'help') {
      process.stdout.write(HELP + '\n');
      return cmd || flags.help ? 0 : 1;
    }
    switch (cmd) {
      case 'generate': await cmdGenerate(flags); break;
      case 'ppl': await cmdPpl(flags); break;
      case 'info': await cmdInfo(flags); break;
      case 'serve': await cmdServe(flags); break;
      default: throw new SqueezeError('ERR_ARG', `unknown command '${cmd}' (generate, ppl, info, serve, quantize, fisher, convert, calibrate-kv; --help)`);
    }
    return 0;
  } catch (e) {
    const code = isSqueezeError(e) ? e.code : 'ERR_INTERNAL';
    process.stderr.write(`squeezelm: ${code} ${(e as Error).message ?? String(e)}\n`);
    return 1;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((c) => {
    process.exitCode = c;
  });
}
