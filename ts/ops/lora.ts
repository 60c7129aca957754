import { native } from '../native';
import { Tensor } from '../tensor';

/**
 * Batched LoRA over a pool of adapters (S-LoRA): y[t] += scale[s] * Bt[o:o+r]^T (A[o:o+r] x[t])
 * with s = slots[t] and (o, r) = desc[s]. y [T, N], x [T, K], slots i32 [T], A [R, K], Bt [R, N],
 * desc i32 [S, 2], scale f32 [S]. A row whose slot is outside [0, S), or whose (o, r) is not a range
 * of the pool, is left unchanged (so -1 means no adapter). fp32 accumulation; on CUDA y, x, A and
 * Bt share one float dtype. `workspace` (f32, at least `loraWorkspaceSize(device, T, R)` elements)
 * holds the rank products between the CUDA kernels; without one the device's grow-only scratch is
 * used, which a graph capture refuses (ERR_STATE).
 */
export function loraApply(y: Tensor, x: Tensor, slots: Tensor, A: Tensor, Bt: Tensor, desc: Tensor, scale: Tensor, workspace?: Tensor): void {
  native().ops.loraApply(y.native, x.native, slots.native, A.native, Bt.native, desc.native, scale.native, workspace?.native);
}

/** f32 elements of loraApply's CUDA workspace for `rows` rows and a pool of `poolRankRows` rank rows (0 on CPU). */
export function loraWorkspaceSize(device: string, rows: number, poolRankRows: number): number {
  if (device === 'cpu') return 0;
  return native().ops.loraWorkspaceSize(rows, poolRankRows) as number;
}
