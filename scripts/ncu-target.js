#!/usr/bin/env node
// A profiler's target: a few launches of the kernels of the LUT and KVQuant speed points, and
// nothing else, so that Nsight Compute sees only them (a bench run would add thousands of graph
// replays). Build first (node scripts/build.js). Example:
//   ncu --clock-control none --kernel-name-base demangled -k 'regex:planes_kernel|lut_gemv_kernel' \
//       --set full --import-source yes -o prof node scripts/ncu-target.js all 2
// Arguments: which (lut | kvq | all, default all), launches per case (default 2).
//   lut: lutMatmulPacked, M = 1, 8192x8192, 4- then 3-bit, 0.45% outliers (the bench's layout);
//   kvq: kvqAttention, batch 1, 32K tokens, 32x128 then 32q/8kv x128, 4- then 2-bit, 2 + 2 outlier
//        slots, 4 sink tokens (the bench's synthetic cache).
const { Tensor } = require('../dist/ts/tensor');
const ops = require('../dist/ts/ops');
const { kvqAttention, kvqAttentionWorkspaceSize } = require('../dist/ts/ops/kvquant');
const { makeSet } = require('../dist/bench/lut');
const { syntheticKvqCache, syntheticKvqCalibration } = require('../dist/bench/kvquant');

const device = 'cuda:0';

async function lutTarget(reps) {
  const N = 8192, K = 8192;
  for (const bits of [4, 3]) {
    const w = await makeSet(N, K, bits, true, device, 3);  // the bench's weights, 0.45% outliers
    const x = Tensor.empty([1, K], { dtype: 'f16', device });
    ops.fillRandom(x, 6, 0, 1);
    const y = Tensor.empty([1, N], { dtype: 'f16', device });
    for (let i = 0; i < reps; i++) ops.lutMatmulPacked(y, x, w.q, w.lut, w.rows, w.cols, w.vals, bits);
    await y.toArray();
    for (const t of [w.q, w.lut, w.rows, w.cols, w.vals, x, y]) t?.dispose();
  }
}

async function kvqTarget(reps) {
  const D = 128, PAGE = 16, L = 32768;
  const invT = Tensor.from(new Float32Array(D / 2).map((_, i) => 1 / Math.pow(500000, (2 * i) / D)), [D / 2], { device });
  for (const [Hq, H] of [[32, 32], [32, 8]]) {
    for (const bits of [4, 2]) {
      const pages = Math.ceil(L / PAGE);
      const pt = Tensor.from(Int32Array.from({ length: pages }, (_, i) => i), [1, pages], { device });
      const lens = Tensor.from(Int32Array.of(L), [1], { device });
      const cu = Tensor.from(Int32Array.of(0, 1), [2], { device });
      const q = Tensor.empty([1, Hq, D], { dtype: 'f16', device });
      ops.fillRandom(q, 1);
      const out = Tensor.empty([1, Hq, D], { dtype: 'f16', device });
      const cache = syntheticKvqCache({ pages, kvHeads: H, headDim: D, bits, keyOutliers: 2, valueOutliers: 2, maxSeqs: 1, device });
      const cal = syntheticKvqCalibration(H, D, bits, device);
      const work = Tensor.empty([Math.max(1, kvqAttentionWorkspaceSize(device, 1, Hq, H, D, L))], { dtype: 'f32', device });
      for (let i = 0; i < reps; i++) kvqAttention(out, q, cache, cal, pt, lens, cu, invT, 1 / Math.sqrt(D), 1, L, { workspace: work });
      await out.toArray();
      cache.dispose();
      for (const t of [pt, lens, cu, q, out, work, cal.keyLo, cal.keyHi, cal.keyCodebook, cal.valueCodebook]) t.dispose();
    }
  }
  invT.dispose();
}

async function main() {
  const which = process.argv[2] ?? 'all', reps = Number(process.argv[3] ?? 2);
  if (!['lut', 'kvq', 'all'].includes(which) || !Number.isInteger(reps) || reps < 1) {
    console.error('usage: node scripts/ncu-target.js [lut|kvq|all] [launches per case >= 1]');
    process.exit(2);
  }
  if (which !== 'kvq') await lutTarget(reps);
  if (which !== 'lut') await kvqTarget(reps);
}

main().catch((e) => {
  console.error(`${e.code ?? 'error'}: ${e.message}`);
  process.exit(1);
});
