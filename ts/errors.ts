/**
 * Every error squeezelm raises is a SqueezeError with a stable `code`:
 * ERR_SHAPE, ERR_DTYPE, ERR_DEVICE, ERR_OUT_OF_MEMORY, ERR_FORMAT, ERR_CUDA, ERR_ARG,
 * ERR_DISPOSED, ERR_UNSUPPORTED, ERR_CONTEXT_LENGTH, ERR_STATE, ERR_INTERNAL, ...
 * Native code throws instances of this same class (registered at load time).
 */
export class SqueezeError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
    this.name = 'SqueezeError';
  }
}

/** True for a SqueezeError from any realm (jest sandboxes break `instanceof`). */
export function isSqueezeError(e: unknown, code?: string): e is SqueezeError {
  const err = e as { name?: unknown; code?: unknown } | null;
  return !!err && err.name === 'SqueezeError' && typeof err.code === 'string' && (code === undefined || err.code === code);
}
