/**
 * Tensor: a typed, shaped buffer on one device ('cpu', 'cuda:N'). Data moves in and out
 * asynchronously; ops on a device run in submission order, so reading a result waits for
 * exactly the work that produced it.
 */
import { SqueezeError } from './errors';
import { native, NativeTensor } from './native';
import { resolveDevice } from './device';
import { f16BitsToFloat32, bf16BitsToFloat32 } from './util/half';

export type DType = 'f32' | 'f16' | 'bf16' | 'i32' | 'u32' | 'i8' | 'u8';
export const DTYPES: readonly DType[] = ['f32', 'f16', 'bf16', 'i32', 'u32', 'i8', 'u8'];

export type TypedArray = Float32Array | Uint16Array | Int32Array | Uint32Array | Int8Array | Uint8Array;

export interface TensorOptions {
  dtype?: DType;
  device?: string;
}

const BYTES: Record<DType, number> = { f32: 4, f16: 2, bf16: 2, i32: 4, u32: 4, i8: 1, u8: 1 };

export function dtypeBytes(d: DType): number {
  return BYTES[d];
}

function defaultDtype(data: ArrayBufferView): DType {
  const tag = Object.prototype.toString.call(data).slice(8, -1);
  switch (tag) {
    case 'Float32Array': return 'f32';
    case 'Uint16Array': return 'f16';
    case 'Int32Array': return 'i32';
    case 'Uint32Array': return 'u32';
    case 'Int8Array': return 'i8';
    case 'Uint8Array': return 'u8';
    default: throw new SqueezeError('ERR_DTYPE', `Tensor.from: unsupported array type ${tag}`);
  }
}

function checkShape(shape: readonly number[], what: string): number[] {
  if (!Array.isArray(shape)) throw new SqueezeError('ERR_SHAPE', `${what}: shape must be an array`);
  for (const s of shape)
    if (!Number.isInteger(s) || s < 0) throw new SqueezeError('ERR_SHAPE', `${what}: bad dimension ${s} in [${shape.join(', ')}]`);
  return [...shape];
}

export class Tensor {
  /** The native handle (ops take it). */
  readonly native: NativeTensor;

  constructor(handle: NativeTensor) {
    this.native = handle;
  }

  /**
   * Makes a tensor from host data. f16/bf16 data come as Uint16Array bits, or as a
   * Float32Array to convert (round to nearest even).
   */
  static from(data: ArrayBufferView, shape: readonly number[], opts: TensorOptions = {}): Tensor {
    if (!ArrayBuffer.isView(data) || data instanceof DataView)
      throw new SqueezeError('ERR_ARG', 'Tensor.from: data must be a TypedArray');
    const dtype = opts.dtype ?? defaultDtype(data);
    if (!DTYPES.includes(dtype)) throw new SqueezeError('ERR_DTYPE', `Tensor.from: unknown dtype '${dtype}'`);
    const s = checkShape(shape, 'Tensor.from');
    return new Tensor(native().fromBuffer(data, dtype, s, resolveDevice(opts.device ?? 'cpu')));
  }

  /** An uninitialised tensor. */
  static empty(shape: readonly number[], opts: TensorOptions = {}): Tensor {
    const s = checkShape(shape, 'Tensor.empty');
    return new Tensor(native().empty(opts.dtype ?? 'f32', s, resolveDevice(opts.device ?? 'cpu')));
  }

  get dtype(): DType { return this.native.dtype as DType; }
  get shape(): number[] { return this.native.shape; }
  get device(): string { return this.native.device; }
  get disposed(): boolean { return this.native.disposed; }
  get byteLength(): number { return this.native.byteLength; }
  get numel(): number { return this.shape.reduce((a, b) => a * b, 1); }

  /** A copy on another device; a CPU source is taken as of this call, like toArray(). */
  async to(device: string): Promise<Tensor> {
    return new Tensor(await this.native.to(resolveDevice(device)));
  }

  /**
   * The raw elements: Uint16Array bits for f16/bf16. On the CPU the contents are taken as of
   * this call (after the ops queued before it, before any queued after it); on CUDA the copy is
   * ordered on the device stream when it starts, so `copy()` into a fresh tensor first where a
   * snapshot is needed while more work is being queued.
   */
  async toArray(): Promise<TypedArray> {
    return typed(this.dtype, await this.native.toHost());
  }

  /**
   * The raw elements as of this call, in stream order on CUDA too: the copy is queued now, so
   * ops queued after the call neither change what is read nor wait for the reader (a decode loop
   * queues its next step before it reads this one's tokens). CUDA tensors of at most 1 MiB
   * (ERR_ARG above: use toArray); ERR_STATE while the device captures a graph.
   */
  async readback(): Promise<TypedArray> {
    const buf = await this.native.readback();
    return typed(this.dtype, buf);
  }

  /** The values as float32 (float dtypes only). */
  async toFloat32(): Promise<Float32Array> {
    const dt = this.dtype;
    const a = await this.toArray();
    if (dt === 'f32') return a as Float32Array;
    if (dt === 'f16') return f16BitsToFloat32(a as Uint16Array);
    if (dt === 'bf16') return bf16BitsToFloat32(a as Uint16Array);
    return Float32Array.from(a as ArrayLike<number>);
  }

  /** Overwrites the contents from host data (stream-ordered; same byte length). */
  write(data: ArrayBufferView): void {
    this.native.write(data);
  }

  /** A view sharing storage: `numel(shape)` elements starting `offset` elements in. */
  view(offset: number, shape: readonly number[]): Tensor {
    return new Tensor(this.native.view(offset, checkShape(shape, 'view')));
  }

  /** Reshape without copying. */
  reshape(shape: readonly number[]): Tensor {
    const n = shape.reduce((a, b) => a * b, 1);
    if (n !== this.numel) throw new SqueezeError('ERR_SHAPE', `reshape: [${this.shape}] has ${this.numel} elements, [${shape}] has ${n}`);
    return this.view(0, shape);
  }

  /** Frees the storage once pending work is done. Idempotent. */
  dispose(): void {
    this.native.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.dispose();
  }
}

/** A typed array over host bytes of a tensor of `dtype` (Uint16Array bits for f16/bf16). */
function typed(dtype: DType, buf: ArrayBuffer): TypedArray {
  switch (dtype) {
    case 'f32': return new Float32Array(buf);
    case 'f16': case 'bf16': return new Uint16Array(buf);
    case 'i32': return new Int32Array(buf);
    case 'u32': return new Uint32Array(buf);
    case 'i8': return new Int8Array(buf);
    case 'u8': return new Uint8Array(buf);
  }
}
