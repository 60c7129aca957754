/**
 * SqueezeLLM dense-and-sparse ops. Weights stay in the interchange layout (see
 * csrc/cpu/lut_gemm.h): qweight i32 [ceil(K/32)*bits, N], lut [N, 2^bits], optional CSR outliers.
 */
import { SqueezeError } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';

/** y[M,N] = x[M,K] · dequant(qweight, lut)ᵀ + outliers (rows/cols/vals all or none). */
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
  native().ops.lutMatmul(y.native, x.native, qweight.native, lut.native, rows?.native ?? null, cols?.native ?? null,
    vals?.native ?? null, bits);
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
 * bounds: rows has N+1 entries, rows[0] = 0, non-decreasing, rows[N] = nnz, cols in [0, K).
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
}
