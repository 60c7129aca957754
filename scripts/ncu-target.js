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
const { KvqCache, kvqAttention, kvqAttentionWorkspaceSize } = require('../dist/ts/ops/kvquant');
const { normalFloatCodebook } = require('../dist/ts/quant/kvquant');
const { syntheticMeta } = require('../dist/bench/scale');

const device = 'cuda:0';

async function lutTarget(reps) {
  const N = 8192, K = 8192;
  for (const bits of [4, 3]) {
    const q = Tensor.empty(ops.lutPackedShape(N, K, bits), { dtype: 'i32', device });
    ops.fillRandomInt(q, 3);
    const lut = Tensor.empty([N, 1 << bits], { dtype: 'f16', device });
    ops.fillRandom(lut, 4, 0, 0.02);
    // the bench's outliers: the same count in every row, spread over K
    const per = Math.max(1, Math.round(0.0045 * K));
    const rows = new Int32Array(N + 1), cols = new Int32Array(N * per);
    for (let n = 0; n < N; n++) {
      rows[n + 1] = (n + 1) * per;
      for (let j = 0; j < per; j++) cols[n * per + j] = (j * Math.floor(K / per) + n * 7) % K;
      cols.subarray(n * per, (n + 1) * per).sort();
    }
    const r = Tensor.from(rows, [N + 1], { device }), c = Tensor.from(cols, [N * per], { device });
    const v = Tensor.empty([N * per], { dtype: 'f16', device });
    ops.fillRandom(v, 5, 0, 0.1);
    const x = Tensor.empty([1, K], { dtype: 'f16', device });
    ops.fillRandom(x, 6, 0, 1);
    const y = Tensor.empty([1, N], { dtype: 'f16', device });
    for (let i = 0; i < reps; i++) ops.lutMatmulPacked(y, x, q, lut, r, c, v, bits);
    await y.toArray();
    for (const t of [q, lut, r, c, v, x, y]) t.dispose();
  }
}

async function kvqTarget(reps) {
  const D = 128, PAGE = 16, L = 32768, nk = 2, nv = 2;
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
      const cache = new KvqCache({ pages, pageSize: PAGE, kvHeads: H, headDim: D, bits, keyOutliers: nk, valueOutliers: nv, sink: 4, maxSeqs: 1, device });
      ops.fillRandomInt(cache.kCodes, 4);
      ops.fillRandomInt(cache.vCodes, 5);
      cache.meta.write(syntheticMeta(pages * PAGE * H, D, nk, nv, 6));
      ops.fillRandom(cache.sinkK, 7);
      ops.fillRandom(cache.sinkV, 8);
      const cb = normalFloatCodebook(bits);
      const cal = {
        keyLo: Tensor.from(new Float32Array(H * D).fill(-2), [H * D], { device }),
        keyHi: Tensor.from(new Float32Array(H * D).fill(2), [H * D], { device }),
        keyCodebook: Tensor.from(cb, [cb.length], { device }),
        valueCodebook: Tensor.from(cb, [cb.length], { device }),
      };
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
