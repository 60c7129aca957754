import { Tensor } from '../ts/tensor';
import { KvqCache, kvqAttention, kvqDequantize, kvqRopeAppend } from '../ts/ops/kvquant';
import { describeGpu, freshSeed, randn, relErr, rng } from './gpu';
import { buildCache, codebook, invFreqFor } from './kvquant_helpers';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

async function bytesOf(t: Tensor): Promise<Uint8Array> {
  const a = await t.toArray();
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function firstDiff(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : a.length;
}

describeGpu('kvquant (CUDA vs CPU)', () => {
  const cases: Array<[number, number, number, number[], number, 'f16' | 'bf16', number?, [number, number]?]> = [
    // [Hq, H, D, lens, bits, dtype, sink (default 3), [key slots, value slots] (default 2 + 2)]
    [4, 4, 64, [1, 17, 300], 2, 'f16'],
    [6, 2, 80, [33, 129], 3, 'f16'],
    [12, 3, 96, [70], 4, 'bf16'],
    [32, 8, 128, [1000, 5, 64, 257], 2, 'f16'],
    [8, 2, 256, [45, 2], 3, 'bf16'],
    [32, 4, 128, Array.from({ length: 16 }, (_, i) => 1 + i * 37), 4, 'f16'],
    [8, 8, 128, [2049], 3, 'bf16'],
    [24, 8, 80, [130, 7, 1, 64], 4, 'f16'],
    [64, 8, 128, [300, 513], 2, 'f16'],
    [3, 1, 256, [129, 200, 17], 4, 'f16'],
    [16, 2, 64, Array.from({ length: 9 }, (_, i) => 3 + i * 61), 3, 'bf16'],
    // 9..16 query heads per kv head (second head tile of the tensor-core kernel)
    [32, 2, 128, [300, 41], 4, 'bf16'],
    [48, 4, 96, [77, 130], 2, 'f16'],
    [16, 2, 256, [700], 2, 'f16'],
    // more than 16 query heads per kv head: the default (tensor-core) call falls back to the flash kernel
    [32, 1, 64, [100, 3], 3, 'f16'],
    // long sequences: several chunks per split, several splits; 32 kv heads: several head groups
    [32, 8, 128, [3000], 2, 'f16'],
    [32, 32, 128, [2600, 33], 4, 'f16'],
    [8, 8, 80, [4099], 3, 'bf16'],
    // a long 2-bit cache: fixed per-code roundings of the values would not average out here
    [32, 8, 128, [6000], 2, 'f16'],
    // sinks longer than a 16-token tile and than a 32-token split (the default kernel takes them in
    // a split of their own, in batches of up to 32 tokens spread over the lanes; the others in each
    // split that starts inside the sink), and sequences shorter than the sink
    [32, 8, 128, [100, 45, 3, 700], 4, 'f16', 40],
    [8, 4, 64, [70, 20, 1], 2, 'f16', 20],
    [12, 4, 96, [200, 17], 3, 'bf16', 17],
    // a sink of two full 32-token batches (two sink splits, their lanes one token each), 8 query
    // heads per kv head (two groups of four)
    [64, 8, 128, [90, 33], 3, 'f16', 64],
    // five 32-token batches over the four sink splits (split 0 takes batches 0 and 4)
    [16, 4, 64, [200, 90], 2, 'f16', 150],
    // no sink tokens (the default kernel then has no sink split)
    [32, 8, 128, [1000, 5, 64, 257], 3, 'f16', 0],
    [16, 4, 64, [300, 2], 2, 'bf16', 0],
    // the slot counts of calibrate-kv's per-layer allocation: none, keys only, values only, up to 16 each
    [32, 8, 128, [1000, 5, 64, 257], 2, 'f16', 3, [0, 0]],
    [16, 4, 64, [300, 17], 2, 'f16', 4, [8, 0]],
    [8, 2, 128, [500, 3], 3, 'bf16', 3, [0, 3]],
    [32, 8, 128, [700, 40], 4, 'f16', 4, [4, 1]],
    [12, 4, 96, [260], 2, 'f16', 2, [16, 16]],
    [8, 2, 80, [150, 9], 3, 'f16', 3, [6, 2]],
    [32, 2, 256, [90], 2, 'bf16', 1, [12, 0]],
  ];
  for (const [Hq, H, D, lens, bits, dtype, sink = 3, [nk, nv] = [2, 2]] of cases) {
    test(`append bytes and attention match (Hq ${Hq}, H ${H}, D ${D}, B ${lens.length}, ${bits}-bit, ${dtype}, sink ${sink}, slots ${nk} + ${nv})`, async () => {
      const seed = freshSeed();
      const opts = { bits, H, D, lens, nk, nv, sink, pageSize: 16, seed, dtype };
      const c = buildCache({ ...opts, device: 'cpu' });
      const g = buildCache({ ...opts, device: 'cuda' });
      for (const name of ['kCodes', 'vCodes', 'meta', 'sinkK', 'sinkV'] as const) {
        const d = firstDiff(await bytesOf(g.cache[name]), await bytesOf(c.cache[name]));
        if (d >= 0) throw new Error(`seed ${seed}: ${name} differs at byte ${d}`);
      }
      // dequantize agrees
      const L = lens[lens.length - 1];
      const kc = Tensor.empty([L, H, D], { dtype: 'f16' }), vc = Tensor.empty([L, H, D], { dtype: 'f16' });
      const kg = Tensor.empty([L, H, D], { dtype: 'f16', device: 'cuda' }), vg = Tensor.empty([L, H, D], { dtype: 'f16', device: 'cuda' });
      kvqDequantize(kc, vc, c.cache, c.cal, c.pageTable, lens.length - 1);
      kvqDequantize(kg, vg, g.cache, g.cal, g.pageTable, lens.length - 1);
      for (const [a, b, name] of [[kg, kc, 'keys'], [vg, vc, 'values']] as const) {
        const d = firstDiff(await bytesOf(a), await bytesOf(b));
        if (d >= 0) throw new Error(`seed ${seed}: dequantized ${name} differ at byte ${d}`);
      }
      // attention, decode rows
      const B = lens.length, r = rng(seed + 1), inv = invFreqFor(D, 500000), scale = 1 / Math.sqrt(D);
      const q = randn(B * Hq * D, r);
      const qc = Tensor.from(q, [B, Hq, D], { dtype }), qg = Tensor.from(q, [B, Hq, D], { dtype, device: 'cuda' });
      const oc = Tensor.empty([B, Hq, D], { dtype }), og = Tensor.empty([B, Hq, D], { dtype, device: 'cuda' });
      og.write(new Uint16Array(B * Hq * D).fill(0x7fc0));
      const ic = Tensor.from(inv, [D / 2]), ig = Tensor.from(inv, [D / 2], { device: 'cuda' });
      kvqAttention(oc, qc, c.cache, c.cal, c.pageTable, c.seqLens, c.cuQ, ic, scale, 1, Math.max(...lens));
      kvqAttention(og, qg, g.cache, g.cal, g.pageTable, g.seqLens, g.cuQ, ig, scale, 1, Math.max(...lens));
      const e = relErr(await og.toFloat32(), await oc.toFloat32());
      if (!(e < (dtype === 'bf16' ? 1e-2 : 2e-3))) throw new Error(`seed ${seed}: attention rel err ${e}`);
      // graph-friendly: a second launch with the same shapes gives identical bits
      const og2 = Tensor.empty([B, Hq, D], { dtype, device: 'cuda' });
      kvqAttention(og2, qg, g.cache, g.cal, g.pageTable, g.seqLens, g.cuQ, ig, scale, 1, Math.max(...lens));
      if (firstDiff(await bytesOf(og2), await bytesOf(og)) >= 0) throw new Error(`seed ${seed}: a second launch gave other bits`);
      // planned for a far longer bound (what a captured decode graph passes): every split shares
      // the keys of the moment; same accuracy, both kernels
      // (a page table 8x wider than needed; the columns past each length are never read)
      const wideCols = 8 * g.maxPages + 63, bound = wideCols * g.pageSize;
      const ptHost = (await g.pageTable.toArray()) as Int32Array, wide = new Int32Array(B * wideCols);
      for (let b = 0; b < B; b++) wide.set(ptHost.subarray(b * g.maxPages, (b + 1) * g.maxPages), b * wideCols);
      const ptWide = Tensor.from(wide, [B, wideCols], { device: 'cuda' });
      for (const variant of [0, 1, 2] as const) {
        const og4 = Tensor.empty([B, Hq, D], { dtype, device: 'cuda' });
        og4.write(new Uint16Array(B * Hq * D).fill(0x7fc0));
        kvqAttention(og4, qg, g.cache, g.cal, ptWide, g.seqLens, g.cuQ, ig, scale, 1, bound, { variant });
        const e4 = relErr(await og4.toFloat32(), await oc.toFloat32());
        const tol4 = dtype === 'bf16' ? 1e-2 : 2e-3;
        if (!(e4 < tol4)) throw new Error(`seed ${seed}: attention planned for ${bound} tokens (variant ${variant}) rel err ${e4}`);
      }
      // the CUDA-core flash kernel (variant 1, fp32 throughout), held to the same contract
      const og3 = Tensor.empty([B, Hq, D], { dtype, device: 'cuda' });
      og3.write(new Uint16Array(B * Hq * D).fill(0x7fc0));
      kvqAttention(og3, qg, g.cache, g.cal, g.pageTable, g.seqLens, g.cuQ, ig, scale, 1, Math.max(...lens), { variant: 1 });
      const e3 = relErr(await og3.toFloat32(), await oc.toFloat32());
      if (!(e3 < (dtype === 'bf16' ? 1e-2 : 2e-3))) throw new Error(`seed ${seed}: flash-kernel attention rel err ${e3}`);
      // the earlier tensor-core kernel (variant 2; the flash kernel where it does not cover the shape)
      const og5 = Tensor.empty([B, Hq, D], { dtype, device: 'cuda' });
      og5.write(new Uint16Array(B * Hq * D).fill(0x7fc0));
      kvqAttention(og5, qg, g.cache, g.cal, g.pageTable, g.seqLens, g.cuQ, ig, scale, 1, Math.max(...lens), { variant: 2 });
      const e5 = relErr(await og5.toFloat32(), await oc.toFloat32());
      if (!(e5 < (dtype === 'bf16' ? 1e-2 : 2e-3))) throw new Error(`seed ${seed}: earlier tensor-core kernel rel err ${e5}`);
      // the default kernel with cp.async copies instead of its TMA boxes (where those run: pages of whole
      // tiles, 16-byte metadata rows): the same bits, masked rows (read whole by TMA) contributing nothing
      process.env.SQUEEZELM_KVQ_TMA = '0';
      try {
        const og6 = Tensor.empty([B, Hq, D], { dtype, device: 'cuda' });
        og6.write(new Uint16Array(B * Hq * D).fill(0x7fc0));
        kvqAttention(og6, qg, g.cache, g.cal, g.pageTable, g.seqLens, g.cuQ, ig, scale, 1, Math.max(...lens));
        if (firstDiff(await bytesOf(og6), await bytesOf(og)) >= 0) throw new Error(`seed ${seed}: cp.async and TMA copies gave other bits`);
      } finally {
        delete process.env.SQUEEZELM_KVQ_TMA;
      }
      // SQUEEZELM_LOG_ERR=1 prints each case's errors (for the accuracy table in docs/kvquant.md)
      if (process.env.SQUEEZELM_LOG_ERR) console.log(`kvq err ${dtype} Hq ${Hq} H ${H} D ${D} ${bits}-bit L ${lens.join(',')}: default ${e.toExponential(2)}, earlier tensor-core ${e5.toExponential(2)}, flash ${e3.toExponential(2)}`);
    });
  }

  // kvqRopeAppend from packed qkv rows with sink rows: the same bytes as the CPU, q rotated alike.
  const rcases: Array<[number, number, number, number[], number, boolean]> = [
    // [Hq, H, D, rows per sequence, bits, rotateKeys]
    [8, 2, 64, [5, 1, 9], 4, false],
    [12, 4, 80, [1, 1, 1, 1], 3, false],
    [32, 8, 128, [17, 2], 2, false],
    [8, 8, 256, [3], 3, false],
    [12, 3, 96, [6, 1], 4, true],
  ];
  for (const [Hq, H, D, ns, bits, rotateKeys] of rcases) {
    test(`kvqRopeAppend CUDA = CPU (Hq ${Hq}, H ${H}, D ${D}, rows ${ns}, ${bits}-bit, rotateKeys ${rotateKeys})`, async () => {
      const seed = freshSeed(), r = rng(seed);
      const B = ns.length, N = ns.reduce((a, b) => a + b, 0), pageSize = 16, maxPages = 4, pages = B * maxPages, sink = 2;
      const prior = ns.map(() => Math.floor(r() * 40));
      const lens = ns.map((n, b) => prior[b] + n);
      const cu = [0];
      ns.forEach((n) => cu.push(cu[cu.length - 1] + n));
      const positions = new Int32Array(N);
      ns.forEach((n, b) => { for (let j = 0; j < n; j++) positions[cu[b] + j] = lens[b] - n + j; });
      const pt = Int32Array.from({ length: B * maxPages }, (_, i) => (i * 7 + 3) % pages);
      const sinkRows = Int32Array.from({ length: B }, (_, b) => B - 1 - b);
      const qkv = randn(N * (Hq + 2 * H) * D, r);
      const lo = new Float32Array(H * D).map(() => -2 - r()), hi = new Float32Array(H * D).map(() => 2 + r());
      const kcb = codebook(bits, r), vcb = codebook(bits, r), inv = invFreqFor(D, 10000);
      const out: Record<string, Uint8Array[]> = {};
      const qs: Float32Array[] = [];
      for (const device of ['cpu', 'cuda']) {
        const cache = new KvqCache({ pages, pageSize, kvHeads: H, headDim: D, bits, keyOutliers: 2, valueOutliers: 1, sink, maxSeqs: B, device });
        for (const t of [cache.kCodes, cache.vCodes, cache.meta]) t.write(new Uint8Array(t.numel).fill(0xa5));
        for (const t of [cache.sinkK, cache.sinkV]) t.write(new Uint16Array(t.numel).fill(0x7e00));
        const cal = {
          keyLo: Tensor.from(lo, [H * D], { device }), keyHi: Tensor.from(hi, [H * D], { device }),
          keyCodebook: Tensor.from(kcb, [kcb.length], { device }), valueCodebook: Tensor.from(vcb, [vcb.length], { device }),
        };
        const qo = Tensor.empty([N, Hq, D], { dtype: 'f16', device });
        qo.write(new Uint16Array(N * Hq * D).fill(0x7e00));
        kvqRopeAppend(qo, cache, cal, Tensor.from(qkv, [N, (Hq + 2 * H) * D], { dtype: 'f16', device }),
          Tensor.from(positions, [N], { device }), Tensor.from(inv, [D / 2], { device }), Tensor.from(pt, [B, maxPages], { device }),
          Tensor.from(Int32Array.from(lens), [B], { device }), Tensor.from(Int32Array.from(cu), [B + 1], { device }),
          { rotateKeys, sinkRows: Tensor.from(sinkRows, [B], { device }) });
        qs.push(await qo.toFloat32());
        out[device] = [];
        for (const t of [cache.kCodes, cache.vCodes, cache.meta, cache.sinkK, cache.sinkV]) out[device].push(await bytesOf(t));
        cache.dispose();
      }
      const e = relErr(qs[1], qs[0]);
      if (!(e < 1e-3)) throw new Error(`seed ${seed}: qOut rel err ${e}`);
      const names = ['kCodes', 'vCodes', 'meta', 'sinkK', 'sinkV'];
      for (let i = 0; i < names.length; i++) {
        const a = out.cuda[i], b = out.cpu[i];
        if (!rotateKeys || i === 1) {
          const d = firstDiff(a, b);
          if (d >= 0) throw new Error(`seed ${seed}: ${names[i]} differs at byte ${d}`);
        } else {
          // rotated keys: cos/sin may differ in the last bit between CPU and GPU; codes almost always agree
          let diff = 0;
          for (let j = 0; j < a.length; j++) if (a[j] !== b[j]) diff++;
          if (diff > a.length * 0.01) throw new Error(`seed ${seed}: ${names[i]}: ${diff} of ${a.length} bytes differ`);
        }
      }
    });
  }
});
