/**
 * Attention benchmark: split-KV decode over a paged fp16 cache (batch 1 at 512/8K/32K/128K
 * tokens, MHA 32x128 and GQA 32q/8kv x128; batch 8 at 4K) in GB/s of K+V cache read and as a
 * fraction of the copy bandwidth measured in the same run, each case with the kernel the planner
 * picks against the CUDA-core decode kernel (SQUEEZELM_ATTN_SIMT=1) in the same process; and
 * causal tensor-core prefill of 2048 tokens (32 heads x 128) in TFLOP/s. Caches hold random
 * data and are not rotated: from 32K tokens (and at batch 8) each case's K+V exceed a 50 MB L2
 * several times over; the 512-token cases (and GQA at 8K, 34 MB) may be served partly from L2
 * and measure latency more than bandwidth.
 */
import { Tensor } from '../ts/tensor';
import { attention, attentionWorkspaceSize } from '../ts/ops/attention';
import { BenchContext, BenchResult, randomTensor, row, timeCuda } from './harness';

const D = 128;
const PAGE = 16;

interface Case {
  batch: number;
  tokens: number;
  qHeads: number;
  kvHeads: number;
}

/** A paged cache holding `batch` sequences of `tokens` each, pages in a shuffled order. */
async function makeCache(device: string, c: Case, rows: number) {
  const perSeq = Math.ceil(c.tokens / PAGE);
  const pages = perSeq * c.batch;
  const shape = [pages, PAGE, c.kvHeads, D];
  const kCache = await randomTensor(shape, 'f16', device);
  const vCache = await randomTensor(shape, 'f16', device);
  const order = Array.from({ length: pages }, (_, i) => i);
  for (let i = pages - 1; i > 0; i--) {
    const j = (i * 7919 + 13) % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  const pageTable = Tensor.from(Int32Array.from(order), [c.batch, perSeq], { device });
  const seqLens = Tensor.from(new Int32Array(c.batch).fill(c.tokens), [c.batch], { device });
  const cuQ = Tensor.from(Int32Array.from({ length: c.batch + 1 }, (_, b) => b * rows), [c.batch + 1], { device });
  const q = await randomTensor([c.batch * rows, c.qHeads, D], 'f16', device);
  const out = Tensor.empty([c.batch * rows, c.qHeads, D], { dtype: 'f16', device });
  const dispose = () => [kCache, vCache, pageTable, seqLens, cuQ, q, out].forEach((t) => t.dispose());
  return { kCache, vCache, pageTable, seqLens, cuQ, q, out, dispose };
}

export async function benchAttention(ctx: BenchContext): Promise<BenchResult[]> {
  const device = ctx.device;
  if (!device) return [];
  const results: BenchResult[] = [];
  const decode: Case[] = [
    { batch: 1, tokens: 512, qHeads: 32, kvHeads: 32 },
    { batch: 1, tokens: 8192, qHeads: 32, kvHeads: 32 },
    { batch: 1, tokens: 32768, qHeads: 32, kvHeads: 32 },
    { batch: 1, tokens: 131072, qHeads: 32, kvHeads: 32 },
    { batch: 1, tokens: 512, qHeads: 32, kvHeads: 8 },
    { batch: 1, tokens: 8192, qHeads: 32, kvHeads: 8 },
    { batch: 1, tokens: 32768, qHeads: 32, kvHeads: 8 },
    { batch: 1, tokens: 131072, qHeads: 32, kvHeads: 8 },
    { batch: 8, tokens: 4096, qHeads: 32, kvHeads: 32 },
    { batch: 8, tokens: 4096, qHeads: 32, kvHeads: 8 },
  ];
  const cases = ctx.quick ? decode.filter((c) => c.tokens !== 131072) : decode;
  for (const c of cases) {
    const t = await makeCache(device, c, 1);
    // One kernel's timing: the workspace is sized under the same setting the launches plan with.
    const time = async (simt: boolean) => {
      if (simt) process.env.SQUEEZELM_ATTN_SIMT = '1';
      const wsSize = attentionWorkspaceSize(device, c.batch, c.qHeads, c.kvHeads, D, 1, c.tokens);
      const workspace = Tensor.empty([Math.max(1, wsSize)], { dtype: 'f32', device });
      try {
        return await timeCuda({
          device,
          iters: ctx.quick ? 5 : 20,
          repeats: ctx.quick ? 5 : 15,
          fn: () => attention(t.out, t.q, t.kCache, t.vCache, t.pageTable, t.seqLens, t.cuQ, 1 / Math.sqrt(D),
            { maxQ: 1, maxSeqLen: c.tokens, workspace }),
        });
      } finally {
        if (simt) delete process.env.SQUEEZELM_ATTN_SIMT;
        workspace.dispose();
      }
    };
    try {
      const bytes = 2 * c.batch * c.tokens * c.kvHeads * D * 2;
      const name = `decode b${c.batch} ${c.tokens >= 1024 ? `${c.tokens / 1024}K` : c.tokens} ${c.qHeads}q/${c.kvHeads}kv x${D} f16`;
      // The CUDA-core kernel is the baseline: the tensor-core one replaced it as the default.
      const simt = await time(true);
      const mma = await time(false);
      results.push(row(ctx, 'attention', name, mma, { bytes, baseline: 'CUDA-core decode kernel', base: simt }));
      results.push(row(ctx, 'attention', `${name} (CUDA-core kernel)`, simt, { bytes }));
      ctx.log(`attention: ${name}: ${bound(mma)} us (CUDA-core kernel ${bound(simt)} us)`);
    } finally {
      t.dispose();
    }
  }
  {
    const tokens = 2048, heads = 32;
    const t = await makeCache(device, { batch: 1, tokens, qHeads: heads, kvHeads: heads }, tokens);
    try {
      const timing = await timeCuda({
        device,
        iters: ctx.quick ? 3 : 10,
        repeats: ctx.quick ? 3 : 10,
        fn: () => attention(t.out, t.q, t.kCache, t.vCache, t.pageTable, t.seqLens, t.cuQ, 1 / Math.sqrt(D),
          { maxQ: tokens, maxSeqLen: tokens }),
      });
      // Causal: QK^T and PV over the visible half, 2 flops per multiply-add.
      const flops = 4 * heads * D * (tokens * (tokens + 1)) / 2;
      results.push(row(ctx, 'attention', `prefill ${tokens} causal ${heads}x${D} f16`, timing, { flops }));
    } finally {
      t.dispose();
    }
  }
  return results;
}

function bound(t: { graph: { median: number } | null; plain: { median: number } }): string {
  return (t.graph ?? t.plain).median.toFixed(1);
}
