/**
 * SqueezeLLM dense-and-sparse ops (layouts: csrc/cpu/lut_gemm.h). Weights arrive in the interchange
 * layout (qweight i32 [ceil(K/32)*bits, N], lut [N, 2^bits], optional CSR outliers) and are
 * repacked once (lutRepack) into the layout the kernels read; lutMatmulPacked runs on that.
 */
import { SqueezeError } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';
import { requireTensors } from './check';

/** Shape of the packed codes of an [N, K] weight: [ceil(N/16)*16, Kp*bits/32]. */
export function lutPackedShape(N: number, K: number, bits: number): [number, number] {
  if (bits !== 3 && bits !== 4) throw new SqueezeError('ERR_UNSUPPORTED', `bits must be 3 or 4, got ${bits}`);
  const ku = bits === 4 ? 128 : 512;
  const kg = Math.ceil(K / 32) * 32;
  const kp = Math.ceil(kg / ku) * ku;
  return [Math.ceil(N / 16) * 16, (kp * bits) / 32];
}

/** dst i32 lutPackedShape(N, K, bits) <- qweight i32 [ceil(K/32)*bits, N] (same device). */
export function lutRepack(dst: Tensor, qweight: Tensor, bits: number): void {
  native().ops.lutRepack(dst.native, qweight.native, bits);
}

/**
 * y[M,N] = x[M,K] · dequant(codes, lut)ᵀ + outliers; codes from lutRepack (rows/cols/vals all or none).
 * With f16/bf16 activations the products use the table entries rounded to the activation dtype
 * (CPU and CUDA alike); outlier values are added in fp32 (on CUDA past M = 64 the weight at an
 * outlier's position is rounded with the outlier added); fp32 accumulation. On CUDA past M = 64 the
 * weight is decoded once into a temporary fp16/bf16 copy [N, K] from the device's memory pool and
 * multiplied by the dense GEMM (while a graph is captured, or where the copy would exceed
 * SQUEEZELM_LUT_DENSE_MAX_MB, default 1024, a tiled LUT GEMM instead; docs/log/squeezellm-kernels.md,
 * "Prefill through a dense copy of the weight").
 */
export function lutMatmulPacked(
  y: Tensor,
  x: Tensor,
  codes: Tensor,
  lut: Tensor,
  rows: Tensor | null | undefined,
  cols: Tensor | null | undefined,
  vals: Tensor | null | undefined,
  bits: number,
  opts: LutStoreOptions = {},
): void {
  const epilogue = { store: 0, siluPairs: 1, residual: 2 }[opts.epilogue ?? 'store'];
  if (epilogue === undefined) throw new SqueezeError('ERR_ARG', `lutMatmulPacked: unknown epilogue ${opts.epilogue}`);
  if (opts.normWeight !== undefined) requireTensors('lutMatmulPacked', [['normWeight', opts.normWeight]]);
  if (opts.prefetchNext !== undefined) requireTensors('lutMatmulPacked', [['prefetchNext', opts.prefetchNext]]);
  native().ops.lutMatmulPacked(y.native, x.native, codes.native, lut.native, rows?.native ?? null, cols?.native ?? null,
    vals?.native ?? null, bits, opts.pairHalf ?? 0, epilogue, opts.normWeight?.native ?? null, opts.eps ?? 1e-6,
    opts.prefetchNext?.native ?? null);
}

/** The RMSNorm of the decoder fused in front of a quantized linear: x is replaced by rmsnorm(x) * weight. */
export interface LutNormOptions {
  /**
   * RMSNorm weight [K]: the product is of x * rsqrt(mean(x²) + eps) * normWeight, rounded to x's dtype
   * as rmsNorm stores it (on CUDA computed by every block of the GEMV into its shared memory: up to 2
   * rows of x, K a multiple of 8, x 16-byte aligned; ERR_UNSUPPORTED otherwise).
   */
  normWeight?: Tensor;
  /** RMSNorm epsilon (with normWeight; default 1e-6). */
  eps?: number;
}

/** Where lutMatmulPacked's results go (csrc/cpu/lut_gemm.h, "Paired rows"), and the norm in front. */
export interface LutStoreOptions extends LutNormOptions {
  /**
   * The weight's rows are stored paired at this half (pairSqueezeRows; 0 / absent: as they are):
   * each stored row is written to its own output row, so y is the unpaired weight's.
   */
  pairHalf?: number;
  /**
   * 'store' (y = z, [M, N]) or 'siluPairs' (y[m, j] = silu(z[m, j]) * z[m, j + N/2], [M, N/2], each z
   * rounded to y's dtype first: the gated MLP's siluMul fused behind the gate|up projection; needs
   * pairHalf = N/2, and on CUDA the GEMV: M <= 64), or 'residual' (y += z, z rounded to y's dtype
   * first: the residual add behind a block's last projection; y [M, N] must not overlap x; on CUDA the
   * GEMV: M <= 64).
   */
  epilogue?: 'store' | 'siluPairs' | 'residual';
  /**
   * The packed codes (lutRepack's output) of the quantized weight whose launch follows this one, e.g.
   * a decode step's next projection. A hint: at their end the 4-bit CUDA GEMVs of up to 2 rows of x
   * (Hopper) request the first codes of that weight's row groups into L2, so the next launch starts
   * from L2 instead of an idle DRAM pipe. The result does not depend on it; every other path (the
   * CPU, 3 bits, more rows) ignores it.
   */
  prefetchNext?: Tensor;
}

/** Where lutRopeAppend's rows go: ropeAppend's positions, rotation and paged cache (ts/ops/fused.ts). */
export interface LutRopeAppendArgs extends LutNormOptions {
  positions: Tensor;
  invFreq: Tensor;
  pageTable: Tensor;
  seqLens: Tensor;
  cuQ: Tensor;
}

/**
 * The quantized q|k|v projection and ropeAppend in one call: qkv = x · dequant(codes, lut)ᵀ (+
 * outliers), w [(Hq + 2*kvHeads) * D, K] stored with its rows paired at pairHalf = D/2 (each tile
 * then holds rotation pairs), rounded to x's dtype as lutMatmulPacked stores it, then exactly what
 * ropeAppend(qOut, kCache, vCache, qkv, ...) does, without qkv being stored. On CUDA the rotation
 * and the cache writes run in the GEMV's epilogue (one launch instead of two; up to 64 rows of x).
 */
export function lutRopeAppend(qOut: Tensor, kCache: Tensor, vCache: Tensor, x: Tensor, codes: Tensor, lut: Tensor,
  rows: Tensor | null | undefined, cols: Tensor | null | undefined, vals: Tensor | null | undefined, bits: number,
  pairHalf: number, r: LutRopeAppendArgs): void {
  if (!r || typeof r !== 'object') throw new SqueezeError('ERR_ARG', 'lutRopeAppend: the rope arguments must be an object');
  requireTensors('lutRopeAppend', [['qOut', qOut], ['kCache', kCache], ['vCache', vCache], ['x', x], ['codes', codes], ['lut', lut],
    ['positions', r.positions], ['invFreq', r.invFreq], ['pageTable', r.pageTable], ['seqLens', r.seqLens], ['cuQ', r.cuQ]]);
  if (r.normWeight !== undefined) requireTensors('lutRopeAppend', [['normWeight', r.normWeight]]);
  native().ops.lutRopeAppend(qOut.native, kCache.native, vCache.native, x.native, codes.native, lut.native, rows?.native ?? null,
    cols?.native ?? null, vals?.native ?? null, bits, pairHalf, r.positions.native, r.invFreq.native, r.pageTable.native,
    r.seqLens.native, r.cuQ.native, r.normWeight?.native ?? null, r.eps ?? 1e-6);
}

/** Output row of stored row p of a weight paired at half H (H = 0: p); csrc/cpu/lut_gemm.h lut_pair_row. */
export function lutPairRow(p: number, H: number): number {
  if (H <= 0) return p;
  const t = p >> 4, i = p & 15, per = H >> 3, b = Math.floor(t / per), s = t - b * per;
  return b * 2 * H + 8 * s + (i < 8 ? i : H + i - 8);
}

/** Whether the rows of an N-row weight can be paired at half H. */
export function lutPairable(N: number, H: number): boolean {
  return H > 0 && H % 8 === 0 && N % (2 * H) === 0;
}

/**
 * y[M,N] = x[M,K] · dequant(qweight, lut)ᵀ + outliers on the interchange layout: repacks into a
 * temporary on every call (a convenience; models repack once at load time).
 */
export function lutMatmul(
  y: Tensor,
  x: Tensor,
  qweight: Tensor,
  lut: Tensor,
  rows: Tensor | null | undefined,
  cols: Tensor | null | undefined,
  vals: Tensor | null | undefined,
  bits: number,
): void {
  if (bits !== 3 && bits !== 4) throw new SqueezeError('ERR_UNSUPPORTED', `lutMatmul: bits must be 3 or 4, got ${bits}`);
  if (x.shape.length !== 2 || y.shape.length !== 2)
    throw new SqueezeError('ERR_SHAPE', `lutMatmul: x [${x.shape}] and y [${y.shape}] must be 2-D`);
  const N = y.shape[1], K = x.shape[1];
  if (qweight.shape.length !== 2 || qweight.shape[0] !== Math.ceil(K / 32) * bits || qweight.shape[1] !== N)
    throw new SqueezeError('ERR_SHAPE', `lutMatmul: qweight is [${qweight.shape}], expected [${Math.ceil(K / 32) * bits}, ${N}]`);
  const codes = Tensor.empty(lutPackedShape(N, K, bits), { dtype: 'i32', device: qweight.device });
  try {
    lutRepack(codes, qweight, bits);
    lutMatmulPacked(y, x, codes, lut, rows, cols, vals, bits);
  } finally {
    codes.dispose();
  }
}

/**
 * Weighted k-means per row: lut f32 [N, 2^bits] (ascending centroids), codes u8 [N,K] from w [N,K]
 * with weights sens [N,K] or [K]; zero-weight entries do not move the centroids.
 */
export function kmeansRows(lut: Tensor, codes: Tensor, w: Tensor, sens: Tensor, iters: number): void {
  native().ops.kmeansRows(lut.native, codes.native, w.native, sens.native, iters);
}

/**
 * Error compensation with table refits (csrc/cpu/gptq.h), CPU tensors only: lut f32 [N,E] and
 * codes u8 [N,K] in/out, q f32 [N,K] and err f32 [N,2] out, w f32 [N,K], out u8 [N,K] (outlier
 * mask), h and u f32 [K,K] in the column order perm i32 [K] (a permutation of 0..K-1, checked
 * here on the host array it was made from).
 */
export function gptqRefitRows(lut: Tensor, codes: Tensor, q: Tensor, err: Tensor, w: Tensor, out: Tensor, h: Tensor,
  u: Tensor, perm: Int32Array, rounds: number): void {
  const K = perm.length, seen = new Uint8Array(K);
  for (let i = 0; i < K; i++) {
    const p = perm[i];
    if (!(p >= 0 && p < K) || seen[p]) throw new SqueezeError('ERR_ARG', `gptqRefitRows: perm is not a permutation of 0..${K - 1}`);
    seen[p] = 1;
  }
  const tp = Tensor.from(perm, [K], { dtype: 'i32', device: w.device });
  try {
    native().ops.gptqRefitRows(lut.native, codes.native, q.native, err.native, w.native, out.native, h.native, u.native,
      tp.native, rounds);
  } finally {
    tp.dispose();
  }
}

/**
 * Host check of an outlier CSR, done once when weights are loaded so that no kernel reads out of
 * bounds: rows has N+1 entries, rows[0] = 0, non-decreasing, rows[N] = nnz, cols in [0, K), and
 * increasing within each row (the prefill kernel walks each row's list once, in k order;
 * sortOutlierRows puts a foreign file's lists in that order).
 */
export function checkOutlierCsr(rows: Int32Array, cols: Int32Array, N: number, K: number, what: string): void {
  const bad = (msg: string): never => { throw new SqueezeError('ERR_FORMAT', `${what}: ${msg}`); };
  if (rows.length !== N + 1) bad(`rows has ${rows.length} entries, expected N + 1 = ${N + 1}`);
  if (rows[0] !== 0) bad(`rows[0] must be 0, got ${rows[0]}`);
  for (let n = 0; n < N; n++)
    if (rows[n + 1] < rows[n]) bad(`rows must be non-decreasing (rows[${n + 1}] = ${rows[n + 1]} < ${rows[n]})`);
  if (rows[N] !== cols.length) bad(`rows[N] = ${rows[N]} but there are ${cols.length} outliers`);
  for (let j = 0; j < cols.length; j++)
    if (cols[j] < 0 || cols[j] >= K) bad(`cols[${j}] = ${cols[j]} is outside [0, ${K})`);
  for (let n = 0; n < N; n++)
    for (let j = rows[n] + 1; j < rows[n + 1]; j++)
      if (cols[j] <= cols[j - 1]) bad(`cols of row ${n} must increase (cols[${j}] = ${cols[j]} after ${cols[j - 1]})`);
}

/**
 * Sorts each row's outliers by column in place (cols and vals together); rows must already be a
 * valid row pointer (non-decreasing, within cols). Returns whether anything moved.
 */
export function sortOutlierRows(rows: Int32Array, cols: Int32Array, vals: Float32Array): boolean {
  let moved = false;
  for (let n = 0; n + 1 < rows.length; n++) {
    const b = rows[n], e = rows[n + 1];
    let sorted = true;
    for (let j = b + 1; j < e; j++) if (cols[j] < cols[j - 1]) { sorted = false; break; }
    if (sorted || b < 0 || e > cols.length || e < b) continue;
    const idx = Array.from({ length: e - b }, (_, i) => b + i).sort((i, j) => cols[i] - cols[j]);
    const c = idx.map((i) => cols[i]), v = idx.map((i) => vals[i]);
    cols.set(c, b);
    vals.set(v, b);
    moved = true;
  }
  return moved;
}
