/**
 * Batched LoRA (loraApply) at LLaMA-2-7B's four projection sites, f16, against our fp16
 * projection of the same rows (matmul) in the same run: what an adapter adds to a decode step.
 * Batches of 1, 8 and 32 rows: every row on one rank-16 adapter, or the rows spread over four
 * adapters of ranks 8 / 16 / 32 / 64 (the heterogeneous batch S-LoRA is about). Bytes = the
 * distinct adapters' A and Bt rows read + x + y read and written; pools rotate past twice the L2.
 */
import { Tensor } from '../ts/tensor';
import { loraApply, loraWorkspaceSize, matmul } from '../ts/ops';
import { BenchContext, BenchResult, randomTensor, row, setsFor, timeCuda } from './harness';

const SITES: Array<[string, number, number]> = [  // name, K (in), N (out)
  ['q|k|v', 4096, 12288],
  ['o', 4096, 4096],
  ['gate|up', 4096, 22016],
  ['down', 11008, 4096],
];

export async function benchLora(ctx: BenchContext): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const device = ctx.device, out: BenchResult[] = [];
  const S = 4, maxRank = 64, R = S * maxRank;
  const ranks = [8, 16, 32, 64];
  const desc = Tensor.from(Int32Array.from(ranks.flatMap((r, s) => [s * maxRank, r])), [S, 2], { device });
  const descOne = Tensor.from(Int32Array.from([0, 16, 64, 0, 128, 0, 192, 0]), [S, 2], { device });
  const scale = Tensor.from(new Float32Array(S).fill(1), [S], { dtype: 'f32', device });
  try {
    for (const [site, K, N] of ctx.quick ? SITES.slice(0, 1) : SITES) {
      const sets = setsFor(2 * R * (K + N), ctx.l2Bytes);
      const as: Tensor[] = [], bts: Tensor[] = [];
      for (let i = 0; i < sets; i++) {
        as.push(await randomTensor([R, K], 'f16', device, 0.02));
        bts.push(await randomTensor([R, N], 'f16', device, 0.02));
      }
      const wsets = setsFor(2 * N * K, ctx.l2Bytes);
      const ws: Tensor[] = [];
      for (let i = 0; i < wsets; i++) ws.push(await randomTensor([N, K], 'f16', device, 0.02));
      try {
        for (const B of ctx.quick ? [8] : [1, 8, 32]) {
          const x = await randomTensor([B, K], 'f16', device), y = await randomTensor([B, N], 'f16', device);
          const work = Tensor.empty([loraWorkspaceSize(device, B, R)], { dtype: 'f32', device });
          const iters = ctx.quick ? 8 : Math.max(2 * Math.max(sets, wsets), 20), repeats = ctx.quick ? 5 : 15;
          try {
            const base = await timeCuda({ device, iters, repeats, fn: (i) => matmul(y, x, ws[i % wsets]) });
            for (const mixed of [false, true]) {
              const slotOf = (b: number) => (mixed ? b % S : 0);
              const slots = Tensor.from(Int32Array.from({ length: B }, (_, b) => slotOf(b)), [B], { device });
              const used = new Set(Array.from({ length: B }, (_, b) => slotOf(b)));
              const rankRows = [...used].reduce((s, u) => s + (mixed ? ranks[u] : 16), 0);
              const d = mixed ? desc : descOne;
              try {
                const t = await timeCuda({ device, iters, repeats, fn: (i) => loraApply(y, x, slots, as[i % sets], bts[i % sets], d, scale, work) });
                const label = mixed ? `ranks ${[...used].map((u) => ranks[u]).join('/')}` : 'one rank-16 adapter';
                out.push(row(ctx, 'lora', `${site} ${K}->${N} B=${B} ${label}`, t, {
                  bytes: 2 * (rankRows * (K + N) + B * K + 2 * B * N),
                  flops: 2 * B * (K + N) * (mixed ? [...Array(B).keys()].reduce((s, b) => s + ranks[slotOf(b)], 0) / B : 16),
                  baseline: 'fp16 projection',
                  base,
                  note: 'speedup = projection time / LoRA time (10x: the adapter adds 10%)',
                }));
              } finally {
                slots.dispose();
              }
            }
          } finally {
            x.dispose();
            y.dispose();
            work.dispose();
          }
        }
      } finally {
        [...as, ...bts, ...ws].forEach((t) => t.dispose());
      }
    }
  } finally {
    desc.dispose();
    descOne.dispose();
    scale.dispose();
  }
  return out;
}

/**
 * End to end (manual suite `decode-lora`): a LLaMA-2-7B-shaped model with random fp16 weights and an
 * adapter pool, four random PEFT adapters on q and v (ranks 8 / 16 / 32 / 32, written to a temporary
 * folder and loaded as users load them), batch-8 decode tokens/s through the scheduler: every
 * sequence on the base model, all on one adapter, and the eight spread over the four adapters (one
 * batch, heterogeneous ranks), against the base model in the same process.
 */
export async function benchDecodeLora(ctx: BenchContext, config?: Record<string, unknown>): Promise<BenchResult[]> {
  if (!ctx.device) return [];
  const fs = await import('fs'), os = await import('os'), path = await import('path');
  const { createRandomModel } = await import('../ts/model/model');
  const { LLAMA2_7B, decodeModelOptions } = await import('./decode');
  const { writeSafetensors } = await import('../ts/model/safetensors');
  const { float32ToF16Bits } = await import('../ts/util/half');
  const B = 8, tokens = ctx.quick ? 16 : 64;
  const cfg = (config ?? LLAMA2_7B) as typeof LLAMA2_7B, H = cfg.hidden_size, L = cfg.num_hidden_layers;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-bench-lora-'));
  const model = await createRandomModel(cfg, { device: ctx.device, dtype: ctx.device === 'cpu' ? undefined : 'f16', seed: 99, ...decodeModelOptions(B, 128, tokens), lora: { maxAdapters: 4, maxRank: 64 } });
  const rows: BenchResult[] = [];
  try {
    const ranks = [8, 16, 32, 32];
    let state = 12345;
    const rand = (n: number, s: number) => {
      const a = new Float32Array(n);
      for (let i = 0; i < n; i++) {
        state = (state * 1664525 + 1013904223) >>> 0;
        a[i] = (state / 4294967296 - 0.5) * s;
      }
      return float32ToF16Bits(a);
    };
    const names: string[] = [];
    for (const [i, r] of ranks.entries()) {
      const d = path.join(dir, `a${i}`);
      fs.mkdirSync(d);
      fs.writeFileSync(path.join(d, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r, lora_alpha: 2 * r, target_modules: ['q_proj', 'v_proj'], bias: 'none' }));
      const ts: Record<string, { dtype: string; shape: number[]; data: ArrayBufferView }> = {};
      for (let l = 0; l < L; l++)
        for (const m of ['q_proj', 'v_proj']) {
          const p = `base_model.model.model.layers.${l}.self_attn.${m}`;
          ts[`${p}.lora_A.weight`] = { dtype: 'F16', shape: [r, H], data: rand(r * H, 0.02) };
          ts[`${p}.lora_B.weight`] = { dtype: 'F16', shape: [H, r], data: rand(H * r, 0.02) };
        }
      writeSafetensors(path.join(d, 'adapter_model.safetensors'), ts);
      names.push((await model.loadAdapter(d)).name);
    }
    const prompt = Array.from({ length: 32 }, (_, i) => (i * 7919 + 11) % cfg.vocab_size);
    const step = async (adapterOf: (b: number) => string | undefined) => {
      const run = async (n: number) => {
        const t0 = performance.now();
        const res = await model.generateBatch(Array.from({ length: B }, (_, b) => ({ ids: prompt.map((t) => (t + b) % cfg.vocab_size), maxTokens: n, adapter: adapterOf(b) })));
        for (const r of res) if (r.error) throw r.error;
        return (performance.now() - t0) / 1000;
      };
      await run(4);
      const short = await run(8), long = await run(8 + tokens);
      return (long - short) / tokens;
    };
    const base = await step(() => undefined);
    const one = await step(() => names[1]);
    const mixed = await step((b) => names[b % names.length]);
    const mk = (name: string, s: number, note: string): BenchResult => ({
      suite: 'decode-lora', name, timing: 'cpu', timeUs: s * 1e6, baseline: 'base model, same process', baselineUs: base * 1e6, speedup: base / s,
      note: `${(B / s).toFixed(1)} tokens/s end to end; ${note}`,
    });
    rows.push(mk(`${config ? 'test-shaped' : '7B'} fp16 B=${B} base model (adapter pool present)`, base, 'no adapter'));
    rows.push(mk(`${config ? 'test-shaped' : '7B'} fp16 B=${B} one rank-16 adapter`, one, 'q, v'));
    rows.push(mk(`${config ? 'test-shaped' : '7B'} fp16 B=${B} four adapters mixed`, mixed, `ranks ${ranks.join('/')} on q, v, two sequences each`));
  } finally {
    await model.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}
