import { native } from '../native';
import { Tensor } from '../tensor';

/** dst <- src (same dtype, element count and device); stream-ordered. */
export function copy(dst: Tensor, src: Tensor): void {
  native().ops.copy(dst.native, src.native);
}

/** dst[dstAt .. dstAt + n) <- src[srcAt .. srcAt + n), elements of the flat tensors (one may be the other). */
export function copyRange(dst: Tensor, dstAt: number, src: Tensor, srcAt: number, n: number): void {
  const d = dst.view(dstAt, [n]), s = src.view(srcAt, [n]);
  try {
    copy(d, s);
  } finally {
    d.dispose();
    s.dispose();
  }
}

/** A fresh tensor holding src's contents as they are at this point of the stream (the caller disposes it). */
export function clone(src: Tensor): Tensor {
  const c = Tensor.empty(src.shape, { dtype: src.dtype, device: src.device });
  try {
    copy(c, src);
  } catch (e) {
    c.dispose();
    throw e;
  }
  return c;
}
