import { native } from '../native';
import { Tensor } from '../tensor';

/** dst <- src (same dtype, element count and device); stream-ordered. */
export function copy(dst: Tensor, src: Tensor): void {
  native().ops.copy(dst.native, src.native);
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
