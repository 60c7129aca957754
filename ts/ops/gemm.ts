/**
 * Dense matmul: y[M,N] = x[M,K] · w[N,K]ᵀ (+ bias[N]), w stored [out, in] as Hugging Face
 * stores linear weights. CPU takes any float dtypes (f32 activations with f16 weights is the
 * CPU decoder's case); CUDA takes one dtype, f16 or bf16, for every operand.
 */
import { SqueezeError } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';
import { requireTensors } from './check';

const FLOAT = ['f32', 'f16', 'bf16'];

function check(op: string, y: Tensor, x: Tensor, w: Tensor, bias?: Tensor): void {
  requireTensors(op, [['y', y], ['x', x], ['w', w]], [['bias', bias]]);
  const named: Array<[string, Tensor | undefined]> = [['y', y], ['x', x], ['w', w], ['bias', bias]];
  for (const [name, t] of named)
    if (t && !FLOAT.includes(t.dtype)) throw new SqueezeError('ERR_DTYPE', `${op}: ${name} must be f32, f16 or bf16, got ${t.dtype}`);
  for (const [name, t, nd] of [['y', y, 2], ['x', x, 2], ['w', w, 2]] as Array<[string, Tensor, number]>)
    if (t.shape.length !== nd) throw new SqueezeError('ERR_SHAPE', `${op}: ${name} must be 2-D, got [${t.shape}]`);
  const [M, K] = x.shape;
  const N = w.shape[0];
  if (w.shape[1] !== K) throw new SqueezeError('ERR_SHAPE', `${op}: w [${w.shape}] must be [N, ${K}] (x is [${x.shape}])`);
  if (y.shape[0] !== M || y.shape[1] !== N)
    throw new SqueezeError('ERR_SHAPE', `${op}: y [${y.shape}] must be [${M}, ${N}]`);
  if (bias && (bias.shape.length !== 1 || bias.shape[0] !== N))
    throw new SqueezeError('ERR_SHAPE', `${op}: bias [${bias.shape}] must be [${N}]`);
  for (const [name, t] of named)
    if (t && t.device !== y.device)
      throw new SqueezeError('ERR_DEVICE', `${op}: ${name} is on ${t.device} but y is on ${y.device}`);
  if (y.device !== 'cpu') {
    if (x.dtype === 'f32') throw new SqueezeError('ERR_DTYPE', `${op}: CUDA matmul takes f16 or bf16, x is f32`);
    for (const [name, t] of named)
      if (t && t.dtype !== x.dtype)
        throw new SqueezeError('ERR_DTYPE', `${op}: ${name} is ${t.dtype} but x is ${x.dtype} (CUDA takes one dtype)`);
  }
}

/** y = x · wᵀ (+ bias). Stream-ordered; y is fully overwritten. */
export function matmul(y: Tensor, x: Tensor, w: Tensor, bias?: Tensor): void {
  check('matmul', y, x, w, bias);
  native().ops.matmul(y.native, x.native, w.native, bias?.native);
}

/** What fusedLinear does behind the product. */
export type FusedEpilogue = 'store' | 'residual' | 'siluPairs';

export interface FusedLinearOptions {
  bias?: Tensor;
  /** RMSNorm weight [K]: x is normalised (fp32, per row) and scaled by it before the product. */
  normWeight?: Tensor;
  /** RMSNorm epsilon (with normWeight). */
  eps?: number;
  /** 'store' (y = z), 'residual' (y += z) or 'siluPairs' (y[m, j] = silu(z[m, j]) * z[m, j + N/2]). */
  epilogue?: FusedEpilogue;
}

/**
 * The decoder's fused linear, z = [rmsnorm(x) * normWeight] · wᵀ (+ bias), with the residual add
 * or the gated-MLP activation applied to z before it is stored: one GEMV launch where the plain
 * path needs a norm, a matmul and an elementwise kernel. CUDA takes up to 16 rows (the decode
 * step); the CPU any number. y must not share storage with x.
 */
export function fusedLinear(y: Tensor, x: Tensor, w: Tensor, o: FusedLinearOptions = {}): void {
  requireTensors('fusedLinear', [['y', y], ['x', x], ['w', w]], [['bias', o.bias], ['normWeight', o.normWeight]]);
  const mode = { store: 0, residual: 1, siluPairs: 2 }[o.epilogue ?? 'store'];
  if (mode === undefined) throw new SqueezeError('ERR_ARG', `fusedLinear: unknown epilogue '${o.epilogue}'`);
  native().ops.fusedLinear(y.native, x.native, w.native, o.bias?.native, o.normWeight?.native, o.eps ?? 1e-6, mode);
}

/** The same product through cuBLAS loaded at run time: a benchmark baseline (CUDA only). */
export function cublasMatmul(y: Tensor, x: Tensor, w: Tensor): void {
  check('cublasMatmul', y, x, w);
  if (y.device === 'cpu') throw new SqueezeError('ERR_DEVICE', 'cublasMatmul: runs on CUDA tensors only');
  native().ops.cublasMatmul(y.native, x.native, w.native);
}

/** Whether cuBLAS could be loaded (never true in a CPU-only build). */
export function cublasAvailable(): boolean {
  return native().ops.cublasAvailable() as boolean;
}
