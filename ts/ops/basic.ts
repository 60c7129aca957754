import { native } from '../native';
import { Tensor } from '../tensor';

/** dst <- src (same dtype, element count and device); stream-ordered. */
export function copy(dst: Tensor, src: Tensor): void {
  native().ops.copy(dst.native, src.native);
}
