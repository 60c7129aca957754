/**
 * Benchmark harness: CUDA-event timing of plain launches and of graph replay, the copy
 * bandwidth floor measured in the same run, random (never zero) inputs, and the result rows
 * every suite returns. See bench/README.md for how numbers are meant to be read.
 */
import { native } from '../ts/native';
import { Tensor, DType } from '../ts/tensor';
import * as ops from '../ts/ops';

/** Per-launch times in microseconds. */
export interface Stats {
  median: number;
  p10: number;
  p90: number;
  min: number;
  max: number;
  samples: number;
}

export interface Timing {
  plain: Stats;
  /** null when the launches could not be captured (the reason is in graphError). */
  graph: Stats | null;
  graphError?: string;
}

export interface TimeOptions {
  device: string;
  /** Launches before timing (also creates library handles outside any capture). */
  warmup?: number;
  /** Launches per timed sample (and per captured graph). */
  iters?: number;
  /** Timed samples; statistics are over samples. */
  repeats?: number;
  /** Skip the graph-replay measurement. */
  noGraph?: boolean;
  /** Launch number i (rotate input sets with i % sets). */
  fn: (i: number) => void;
}

export function stats(samplesUs: number[]): Stats {
  const s = [...samplesUs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.round(p * (s.length - 1))))];
  return { median: q(0.5), p10: q(0.1), p90: q(0.9), min: s[0], max: s[s.length - 1], samples: s.length };
}

async function sync(device: string): Promise<void> {
  await native().synchronize(device);
}

/**
 * Times fn's launches with CUDA events: `repeats` samples of `iters` back-to-back launches
 * (plain), then the same `iters` launches captured once into a CUDA graph and replayed
 * `repeats` times. Reports per-launch microseconds.
 */
export async function timeCuda(opts: TimeOptions): Promise<Timing> {
  const { device, fn } = opts;
  const warmup = opts.warmup ?? 5, iters = opts.iters ?? 20, repeats = opts.repeats ?? 15;
  const n = native();
  const a = n.createEvent(device), b = n.createEvent(device);
  try {
    for (let i = 0; i < warmup; i++) fn(i);
    await sync(device);
    const plain: number[] = [];
    for (let r = 0; r < repeats; r++) {
      a.record();
      for (let i = 0; i < iters; i++) fn(i);
      b.record();
      await sync(device);
      plain.push((n.elapsedMs(a, b) * 1000) / iters);
    }
    const out: Timing = { plain: stats(plain), graph: null };
    if (opts.noGraph) return out;
    let graph;
    try {
      n.captureBegin(device);
      try {
        for (let i = 0; i < iters; i++) fn(i);
      } finally {
        graph = n.captureEnd(device);
      }
    } catch (e) {
      out.graphError = (e as Error).message;
      return out;
    }
    try {
      graph.replay();
      await sync(device);
      const replayed: number[] = [];
      for (let r = 0; r < repeats; r++) {
        a.record();
        graph.replay();
        b.record();
        await sync(device);
        replayed.push((n.elapsedMs(a, b) * 1000) / iters);
      }
      out.graph = stats(replayed);
    } finally {
      graph.dispose();
    }
    return out;
  } finally {
    a.dispose();
    b.dispose();
  }
}

/** The CUDA device to benchmark on, or why there is none. */
export function cudaDevice(): { device: string | null; name: string; l2Bytes: number; reason: string } {
  const list = native().devices() as Array<Record<string, unknown>>;
  const gpu = list.find((d) => d.type === 'cuda');
  if (!gpu) return { device: null, name: String(list[0]?.name ?? 'cpu'), l2Bytes: 0, reason: native().buildInfo().cudaReason || 'no CUDA device visible' };
  return { device: String(gpu.id), name: String(gpu.name), l2Bytes: Number(gpu.l2Bytes ?? 50 * 2 ** 20), reason: '' };
}

let seedCounter = 1;

/** A tensor of normal random values (never zeros): fillRandom where the op exists, else host data. */
export async function randomTensor(shape: number[], dtype: DType, device: string, std = 1): Promise<Tensor> {
  const t = Tensor.empty(shape, { dtype, device });
  const seed = seedCounter++;
  const hasFill = typeof (ops as Record<string, unknown>).fillRandom === 'function' && typeof native().ops.fillRandom === 'function';
  if (hasFill) {
    (ops as unknown as { fillRandom: (t: Tensor, s: number, m: number, sd: number) => void }).fillRandom(t, seed, 0, std);
    return t;
  }
  // Host fallback, written in slices so huge weights never need one giant host array.
  const numel = t.numel;
  const sliceElems = Math.min(numel, 1 << 24);
  let state = (seed * 2654435761) >>> 0;
  const slice = new Float32Array(sliceElems);
  for (let off = 0; off < numel; off += sliceElems) {
    const len = Math.min(sliceElems, numel - off);
    for (let i = 0; i < len; i++) {
      // xorshift32 -> sum of two uniforms (roughly bell-shaped, mean 0, never all zero)
      state ^= state << 13; state >>>= 0; state ^= state >>> 17; state ^= state << 5; state >>>= 0;
      const u1 = state / 4294967296;
      state ^= state << 13; state >>>= 0; state ^= state >>> 17; state ^= state << 5; state >>>= 0;
      const u2 = state / 4294967296;
      slice[i] = (u1 + u2 - 1) * std * 2.45;
    }
    const host = Tensor.from(len === sliceElems ? slice : slice.subarray(0, len), [len], { dtype });
    const dev = await host.to(device);
    ops.copy(t.view(off, [len]), dev);
    await sync(device);
    host.dispose();
    dev.dispose();
  }
  return t;
}

/** Device-to-device copy bandwidth in GB/s (read + write bytes), on a 1 GiB buffer. */
export async function copyBandwidthGBs(device: string, bytes = 2 ** 30): Promise<number> {
  const n = bytes / 2;
  const src = Tensor.empty([n], { dtype: 'f16', device });
  const dst = Tensor.empty([n], { dtype: 'f16', device });
  try {
    const t = await timeCuda({ device, warmup: 2, iters: 5, repeats: 7, noGraph: true, fn: () => ops.copy(dst, src) });
    return (2 * bytes) / (t.plain.median * 1e-6) / 1e9;
  } finally {
    src.dispose();
    dst.dispose();
  }
}

/** How many rotating input sets keep the working set above 2x the L2 (at most `cap`). */
export function setsFor(bytesPerSet: number, l2Bytes: number, cap = 16): number {
  return Math.max(1, Math.min(cap, Math.ceil((2 * l2Bytes) / Math.max(1, bytesPerSet)) + 1));
}

/** One row of a benchmark report. Times are graph-replayed medians unless no graph was possible. */
export interface BenchResult {
  suite: string;
  name: string;
  /** What the time is: 'graph' (replayed) or 'plain' launches, or 'cpu' wall time. */
  timing: 'graph' | 'plain' | 'cpu';
  timeUs: number;
  p10Us?: number;
  p90Us?: number;
  plainUs?: number;
  bytes?: number;
  gbs?: number;
  /** Achieved GB/s over the measured copy bandwidth. */
  fracCopy?: number;
  flops?: number;
  tflops?: number;
  baseline?: string;
  baselineUs?: number;
  /** baselineUs / timeUs: above 1 = faster than the baseline. */
  speedup?: number;
  note?: string;
}

export interface BenchContext {
  /** CUDA device id, or null where none is usable (GPU suites then return []). */
  device: string | null;
  deviceName: string;
  l2Bytes: number;
  copyBandwidthGBs: number;
  /** Fewer shapes and repeats (smoke runs). */
  quick: boolean;
  log: (line: string) => void;
}

/** The time a row binds: graph replay when captured, else plain launches. */
export function bound(t: Timing): { timing: 'graph' | 'plain'; s: Stats } {
  return t.graph ? { timing: 'graph', s: t.graph } : { timing: 'plain', s: t.plain };
}

/** Builds a row from our timing, optional baseline timing, bytes and flops. */
export function row(
  ctx: BenchContext,
  suite: string,
  name: string,
  ours: Timing,
  extra: { bytes?: number; flops?: number; baseline?: string; base?: Timing | null; note?: string } = {},
): BenchResult {
  const { timing, s } = bound(ours);
  const r: BenchResult = { suite, name, timing, timeUs: s.median, p10Us: s.p10, p90Us: s.p90, plainUs: ours.plain.median };
  if (extra.bytes) {
    r.bytes = extra.bytes;
    r.gbs = extra.bytes / (s.median * 1e-6) / 1e9;
    if (ctx.copyBandwidthGBs > 0) r.fracCopy = r.gbs / ctx.copyBandwidthGBs;
  }
  if (extra.flops) {
    r.flops = extra.flops;
    r.tflops = extra.flops / (s.median * 1e-6) / 1e12;
  }
  if (extra.base) {
    r.baseline = extra.baseline;
    r.baselineUs = bound(extra.base).s.median;
    r.speedup = r.baselineUs / r.timeUs;
  }
  const notes = [extra.note, ours.graphError ? `no graph: ${ours.graphError}` : undefined].filter(Boolean);
  if (notes.length) r.note = notes.join('; ');
  return r;
}

/** A row of host wall time (timing 'cpu'): work timed once with the clock, not with CUDA events. */
export function wallRow(suite: string, name: string, seconds: number, note?: string): BenchResult {
  const r: BenchResult = { suite, name, timing: 'cpu', timeUs: seconds * 1e6 };
  if (note) r.note = note;
  return r;
}

const fmt = (v: number | undefined, d = 1) => (v === undefined || !Number.isFinite(v) ? '' : v.toFixed(d));

/** A Markdown table of results. */
export function markdown(results: BenchResult[]): string {
  const head = '| suite | case | time us (p10–p90) | timing | plain us | GB/s | of copy BW | TFLOP/s | baseline | baseline us | speedup | note |';
  const sep = '|---|---|---|---|---|---|---|---|---|---|---|---|';
  const lines = results.map((r) =>
    [
      r.suite,
      r.name,
      `${fmt(r.timeUs, 2)} (${fmt(r.p10Us, 2)}–${fmt(r.p90Us, 2)})`,
      r.timing,
      fmt(r.plainUs, 2),
      fmt(r.gbs, 0),
      r.fracCopy === undefined ? '' : `${(100 * r.fracCopy).toFixed(0)}%`,
      fmt(r.tflops, r.tflops !== undefined && r.tflops < 1 ? 3 : 1),
      r.baseline ?? '',
      fmt(r.baselineUs, 2),
      r.speedup === undefined ? '' : `${r.speedup.toFixed(2)}x`,
      r.note ?? '',
    ].join(' | '),
  );
  return [head, sep, ...lines.map((l) => `| ${l} |`)].join('\n');
}

/**
 * Runs one suite as a script (`node dist/bench/<suite>.js [--quick]`) on the first CUDA device,
 * printing its Markdown table; bench/run.ts is the way to run several and write JSON.
 */
export function runSuiteMain(suite: (ctx: BenchContext) => Promise<BenchResult[]>): void {
  (async () => {
    const gpu = cudaDevice();
    if (!gpu.device) throw new Error(`no CUDA device: ${gpu.reason}`);
    const ctx: BenchContext = {
      device: gpu.device, deviceName: gpu.name, l2Bytes: gpu.l2Bytes, quick: process.argv.includes('--quick'),
      copyBandwidthGBs: await copyBandwidthGBs(gpu.device), log: (l) => console.error(l),
    };
    console.log(markdown(await suite(ctx)));
  })().catch((e) => {
    console.error(e);
    process.exitCode = 1;
  });
}
