/**
 * npm run bench -- [--only gemv,attention,decode] [--out FILE] [--quick]
 * Runs the suites of bench/suites.ts, prints a Markdown table, and with --out writes
 * FILE (JSON: device, date, commit, copyBandwidthGBs, results) and FILE.md beside it.
 * Where no GPU is usable the GPU suites say so and the run still exits 0.
 */
import * as fs from 'fs';
import * as path from 'path';
import { execSync } from 'child_process';
import { BenchContext, BenchResult, copyBandwidthGBs, cudaDevice, markdown } from './harness';
import { suites } from './suites';

function parseArgs(argv: string[]): { only: string[] | null; out: string | null; quick: boolean } {
  let only: string[] | null = null, out: string | null = null, quick = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--only') only = (argv[++i] ?? '').split(',').map((s) => s.trim()).filter(Boolean);
    else if (a.startsWith('--only=')) only = a.slice(7).split(',').map((s) => s.trim()).filter(Boolean);
    else if (a === '--out') out = argv[++i] ?? null;
    else if (a.startsWith('--out=')) out = a.slice(6);
    else if (a === '--quick') quick = true;
    else throw new Error(`bench: unknown argument '${a}' (use --only a,b --out FILE --quick)`);
  }
  return { only, out, quick };
}

function commit(): string {
  if (process.env.SQUEEZELM_COMMIT) return process.env.SQUEEZELM_COMMIT;
  try {
    return execSync('git rev-parse HEAD', { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
  } catch {
    return 'unknown';
  }
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const names = args.only ?? Object.keys(suites).filter((n) => !suites[n].manual);
  for (const n of names) if (!suites[n]) throw new Error(`bench: unknown suite '${n}' (known: ${Object.keys(suites).join(', ')})`);
  const log = (line: string) => console.error(line);
  const gpu = cudaDevice();
  const ctx: BenchContext = { device: gpu.device, deviceName: gpu.name, l2Bytes: gpu.l2Bytes, copyBandwidthGBs: 0, quick: args.quick, log };
  const notes: string[] = [];
  if (gpu.device) {
    ctx.copyBandwidthGBs = await copyBandwidthGBs(gpu.device);
    log(`device ${gpu.device} (${gpu.name}), L2 ${(gpu.l2Bytes / 2 ** 20).toFixed(0)} MiB, copy bandwidth ${ctx.copyBandwidthGBs.toFixed(0)} GB/s (read + write)`);
  } else {
    const msg = `no CUDA device usable (${gpu.reason}); GPU suites skipped`;
    log(msg);
    notes.push(msg);
  }
  const results: BenchResult[] = [];
  for (const name of names) {
    const s = suites[name];
    if (s.gpu && !gpu.device) continue;
    const fn = s.load();
    if (!fn) {
      const msg = `suite '${name}' is not available in this checkout; skipped`;
      log(msg);
      notes.push(msg);
      continue;
    }
    log(`-- ${name}`);
    results.push(...(await fn(ctx)));
  }
  const table = markdown(results);
  const header = `# squeezelm benchmarks\n\ndevice: ${gpu.device ? `${gpu.device} ${gpu.name}` : `cpu (${gpu.name})`}; copy bandwidth ${ctx.copyBandwidthGBs.toFixed(0)} GB/s; commit ${commit()}; ${new Date().toISOString()}\n\n`;
  const md = header + table + (notes.length ? `\n\n${notes.map((n) => `- ${n}`).join('\n')}\n` : '\n');
  console.log(md);
  if (args.out) {
    fs.mkdirSync(path.dirname(path.resolve(args.out)), { recursive: true });
    const json = {
      device: gpu.device ? { id: gpu.device, name: gpu.name, l2Bytes: gpu.l2Bytes } : { id: 'cpu', name: gpu.name },
      date: new Date().toISOString(),
      commit: commit(),
      copyBandwidthGBs: ctx.copyBandwidthGBs,
      notes,
      results,
    };
    fs.writeFileSync(args.out, JSON.stringify(json, null, 2) + '\n');
    fs.writeFileSync(args.out.replace(/\.json$/, '') + '.md', md);
    log(`wrote ${args.out} and ${args.out.replace(/\.json$/, '')}.md`);
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
