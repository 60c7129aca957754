/**
 * Argument checks shared by the op wrappers: a clear ERR_ARG naming the op and the argument
 * before anything reaches the addon.
 */
import { SqueezeError } from '../errors';
import { Tensor } from '../tensor';

/** True for a Tensor of this package (by shape, not instanceof: a test's Tensor class may differ). */
export function isTensor(t: unknown): t is Tensor {
  return !!t && typeof t === 'object' && 'native' in (t as object);
}

/** ERR_ARG unless every named value is a Tensor; `optional` ones may also be undefined. */
export function requireTensors(op: string, named: Array<[string, unknown]>, optional: Array<[string, unknown]> = []): void {
  for (const [name, t] of named) if (!isTensor(t)) throw new SqueezeError('ERR_ARG', `${op}: ${name} must be a Tensor`);
  for (const [name, t] of optional)
    if (t !== undefined && !isTensor(t)) throw new SqueezeError('ERR_ARG', `${op}: ${name} must be a Tensor`);
}
