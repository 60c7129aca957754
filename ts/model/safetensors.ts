/**
 * safetensors: a reader that validates the whole header before touching any data, lazy
 * reads of one tensor's bytes, sharded checkpoints (model.safetensors.index.json), and a
 * writer. Format: 8-byte little-endian header length N, N bytes of JSON
 * {name: {dtype, shape, data_offsets: [begin, end]}, __metadata__?: {string: string}},
 * then the data; offsets are relative to the end of the header.
 */
import * as fs from 'fs';
import * as path from 'path';
import { SqueezeError } from '../errors';
import { DType } from '../tensor';

/** Element sizes of every dtype the format defines. */
export const SAFETENSORS_DTYPE_BYTES: Readonly<Record<string, number>> = {
  F64: 8, F32: 4, F16: 2, BF16: 2,
  I64: 8, I32: 4, I16: 2, I8: 1,
  U64: 8, U32: 4, U16: 2, U8: 1,
  BOOL: 1, F8_E4M3: 1, F8_E5M2: 1,
};

/** Our dtype for a safetensors dtype (undefined where we have none). */
export function toDType(st: string): DType | undefined {
  switch (st) {
    case 'F32': return 'f32';
    case 'F16': return 'f16';
    case 'BF16': return 'bf16';
    case 'I32': return 'i32';
    case 'U32': return 'u32';
    case 'I8': return 'i8';
    case 'U8': case 'BOOL': return 'u8';
    default: return undefined;
  }
}

export function fromDType(d: DType): string {
  const m: Record<DType, string> = { f32: 'F32', f16: 'F16', bf16: 'BF16', i32: 'I32', u32: 'U32', i8: 'I8', u8: 'U8' };
  return m[d];
}

export interface TensorEntry {
  name: string;
  /** safetensors spelling: F16, BF16, F32, I32, ... */
  dtype: string;
  shape: number[];
  /** Byte range in the file (absolute). */
  begin: number;
  end: number;
  file: string;
}

/** The largest header we accept (the format's reference implementation uses 100 MB). */
const MAX_HEADER = 100 * 1024 * 1024;

function formatError(file: string, msg: string): SqueezeError {
  return new SqueezeError('ERR_FORMAT', `${file}: ${msg}`);
}

function numelOf(shape: number[]): number {
  let n = 1;
  for (const s of shape) n *= s;
  return n;
}

/** One .safetensors file: header parsed and validated on open; data read on demand. */
export class SafetensorsFile {
  readonly path: string;
  readonly metadata: Record<string, string>;
  readonly tensors: Map<string, TensorEntry>;
  readonly fileSize: number;
  private fd: number | undefined;

  private constructor(file: string, fd: number, size: number, meta: Record<string, string>, tensors: Map<string, TensorEntry>) {
    this.path = file;
    this.fd = fd;
    this.fileSize = size;
    this.metadata = meta;
    this.tensors = tensors;
  }

  static open(file: string): SafetensorsFile {
    let fd: number;
    try {
      fd = fs.openSync(file, 'r');
    } catch (e) {
      throw new SqueezeError('ERR_FORMAT', `${file}: cannot open (${(e as Error).message})`);
    }
    try {
      const size = fs.fstatSync(fd).size;
      const { meta, tensors } = parseHeader(fd, size, file);
      return new SafetensorsFile(file, fd, size, meta, tensors);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  names(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  entry(name: string): TensorEntry {
    const e = this.tensors.get(name);
    if (!e) throw formatError(this.path, `no tensor '${name}'`);
    return e;
  }

  /** The raw bytes of one tensor, in a fresh (aligned) ArrayBuffer. */
  readBytes(name: string): Uint8Array {
    const e = this.entry(name);
    if (this.fd === undefined) throw new SqueezeError('ERR_DISPOSED', `${this.path}: file is closed`);
    const out = new Uint8Array(new ArrayBuffer(e.end - e.begin));
    let done = 0;
    while (done < out.length) {
      const n = fs.readSync(this.fd, out, done, Math.min(out.length - done, 1 << 30), e.begin + done);
      if (n <= 0) throw formatError(this.path, `tensor '${name}': unexpected end of file`);
      done += n;
    }
    return out;
  }

  /** One tensor's elements as a typed array (f16/bf16 as Uint16Array bits). */
  read(name: string): { dtype: string; shape: number[]; data: ArrayBufferView } {
    const e = this.entry(name);
    const b = this.readBytes(name);
    return { dtype: e.dtype, shape: [...e.shape], data: typedView(e.dtype, b) };
  }

  /** float dtypes as Float32Array, integer dtypes as Int32Array-compatible numbers. */
  readFloat32(name: string): Float32Array {
    const { dtype, data } = this.read(name);
    return toFloat32(dtype, data);
  }

  readInt32(name: string): Int32Array {
    const { dtype, data } = this.read(name);
    if (dtype === 'I32') return data as Int32Array;
    if (dtype === 'I64') {
      const a = data as BigInt64Array;
      const out = new Int32Array(a.length);
      for (let i = 0; i < a.length; i++) out[i] = Number(a[i]);
      return out;
    }
    throw formatError(this.path, `tensor '${name}' is ${dtype}, expected an integer tensor`);
  }

  close(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
  }
}

export function typedView(dtype: string, b: Uint8Array): ArrayBufferView {
  const buf = b.buffer, off = b.byteOffset, len = b.byteLength;
  switch (dtype) {
    case 'F32': return new Float32Array(buf, off, len / 4);
    case 'F64': return new Float64Array(buf, off, len / 8);
    case 'F16': case 'BF16': case 'U16': return new Uint16Array(buf, off, len / 2);
    case 'I16': return new Int16Array(buf, off, len / 2);
    case 'I32': return new Int32Array(buf, off, len / 4);
    case 'U32': return new Uint32Array(buf, off, len / 4);
    case 'I64': return new BigInt64Array(buf, off, len / 8);
    case 'U64': return new BigUint64Array(buf, off, len / 8);
    case 'I8': return new Int8Array(buf, off, len);
    default: return b;
  }
}

function toFloat32(dtype: string, data: ArrayBufferView): Float32Array {
  // Local conversions keep this module free of native code.
  if (dtype === 'F32') return data as Float32Array;
  const out = new Float32Array((data as unknown as ArrayLike<number>).length);
  if (dtype === 'BF16') {
    const o = new Uint32Array(out.buffer);
    const a = data as Uint16Array;
    for (let i = 0; i < a.length; i++) o[i] = a[i] << 16;
    return out;
  }
  if (dtype === 'F16') {
    const a = data as Uint16Array;
    for (let i = 0; i < a.length; i++) {
      const h = a[i];
      const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
      out[i] = e === 0 ? s * m * 5.960464477539063e-8 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
    }
    return out;
  }
  const a = data as unknown as ArrayLike<number | bigint>;
  for (let i = 0; i < out.length; i++) out[i] = Number(a[i]);
  return out;
}

function parseHeader(fd: number, size: number, file: string): { meta: Record<string, string>; tensors: Map<string, TensorEntry> } {
  if (size < 8) throw formatError(file, `file of ${size} bytes is too short for a safetensors header`);
  const lenBuf = Buffer.alloc(8);
  fs.readSync(fd, lenBuf, 0, 8, 0);
  const n64 = lenBuf.readBigUInt64LE(0);
  if (n64 > BigInt(size - 8)) throw formatError(file, `header length ${n64} runs past the end of the file (${size} bytes)`);
  const n = Number(n64);
  if (n > MAX_HEADER) throw formatError(file, `header length ${n} is larger than ${MAX_HEADER}`);
  if (n < 2) throw formatError(file, `header length ${n} is too short`);
  const hb = Buffer.alloc(n);
  fs.readSync(fd, hb, 0, n, 8);
  let header: unknown;
  try {
    header = JSON.parse(hb.toString('utf8'));
  } catch (e) {
    throw formatError(file, `header is not valid JSON (${(e as Error).message})`);
  }
  if (!header || typeof header !== 'object' || Array.isArray(header)) throw formatError(file, 'header is not a JSON object');
  const dataStart = 8 + n;
  const dataSize = size - dataStart;
  const meta: Record<string, string> = {};
  const tensors = new Map<string, TensorEntry>();
  for (const [name, v] of Object.entries(header as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (!v || typeof v !== 'object' || Array.isArray(v)) throw formatError(file, '__metadata__ is not an object');
      for (const [k, s] of Object.entries(v as Record<string, unknown>)) {
        if (typeof s !== 'string') throw formatError(file, `__metadata__ entry '${k}' is not a string`);
        meta[k] = s;
      }
      continue;
    }
    const t = v as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (!t || typeof t !== 'object') throw formatError(file, `tensor '${name}': entry is not an object`);
    if (typeof t.dtype !== 'string' || !(t.dtype in SAFETENSORS_DTYPE_BYTES))
      throw formatError(file, `tensor '${name}': unknown dtype ${JSON.stringify(t.dtype)}`);
    if (!Array.isArray(t.shape) || !t.shape.every((s) => Number.isSafeInteger(s) && s >= 0))
      throw formatError(file, `tensor '${name}': bad shape ${JSON.stringify(t.shape)}`);
    const off = t.data_offsets;
    if (!Array.isArray(off) || off.length !== 2 || !off.every((x) => Number.isSafeInteger(x) && x >= 0))
      throw formatError(file, `tensor '${name}': bad data_offsets ${JSON.stringify(off)}`);
    const [b, e] = off as number[];
    if (b > e) throw formatError(file, `tensor '${name}': data_offsets [${b}, ${e}] are reversed`);
    if (e > dataSize) throw formatError(file, `tensor '${name}': data_offsets [${b}, ${e}] run past the data (${dataSize} bytes)`);
    const shape = t.shape as number[];
    const want = numelOf(shape) * SAFETENSORS_DTYPE_BYTES[t.dtype];
    if (e - b !== want)
      throw formatError(file, `tensor '${name}': ${t.dtype} [${shape.join(', ')}] needs ${want} bytes, data_offsets give ${e - b}`);
    tensors.set(name, { name, dtype: t.dtype, shape: [...shape], begin: dataStart + b, end: dataStart + e, file });
  }
  const sorted = [...tensors.values()].filter((t) => t.end > t.begin).sort((a, b) => a.begin - b.begin);
  for (let i = 1; i < sorted.length; i++)
    if (sorted[i].begin < sorted[i - 1].end)
      throw formatError(file, `tensors '${sorted[i - 1].name}' and '${sorted[i].name}' overlap`);
  return { meta, tensors };
}

/** A checkpoint: one model.safetensors, or shards listed in model.safetensors.index.json. */
export class Checkpoint {
  readonly dir: string;
  readonly files: SafetensorsFile[];
  private byName = new Map<string, SafetensorsFile>();

  private constructor(dir: string, files: SafetensorsFile[]) {
    this.dir = dir;
    this.files = files;
    for (const f of files) for (const n of f.tensors.keys()) this.byName.set(n, f);
  }

  static open(dir: string): Checkpoint {
    const index = path.join(dir, 'model.safetensors.index.json');
    const single = path.join(dir, 'model.safetensors');
    if (fs.existsSync(index)) {
      let map: Record<string, string>;
      try {
        const j = JSON.parse(fs.readFileSync(index, 'utf8'));
        map = j.weight_map;
        if (!map || typeof map !== 'object') throw new Error('no weight_map');
      } catch (e) {
        throw new SqueezeError('ERR_FORMAT', `${index}: ${(e as Error).message}`);
      }
      const shards = [...new Set(Object.values(map))];
      const files: SafetensorsFile[] = [];
      try {
        for (const s of shards) {
          if (typeof s !== 'string' || s.includes('..') || path.isAbsolute(s))
            throw new SqueezeError('ERR_FORMAT', `${index}: bad shard name ${JSON.stringify(s)}`);
          files.push(SafetensorsFile.open(path.join(dir, s)));
        }
      } catch (e) {
        files.forEach((f) => f.close());
        throw e;
      }
      const ck = new Checkpoint(dir, files);
      for (const [name, shard] of Object.entries(map))
        if (ck.byName.get(name)?.path !== path.join(dir, shard)) {
          ck.close();
          throw new SqueezeError('ERR_FORMAT', `${index}: tensor '${name}' is not in ${shard}`);
        }
      return ck;
    }
    if (fs.existsSync(single)) return new Checkpoint(dir, [SafetensorsFile.open(single)]);
    throw new SqueezeError('ERR_FORMAT', `${dir}: no model.safetensors or model.safetensors.index.json`);
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  names(): string[] {
    return [...this.byName.keys()];
  }

  /** Where a tensor lives; ERR_FORMAT naming tensor and checkpoint when it is missing. */
  entry(name: string): TensorEntry {
    const f = this.byName.get(name);
    if (!f) throw new SqueezeError('ERR_FORMAT', `${this.describe()}: missing tensor '${name}'`);
    return f.entry(name);
  }

  read(name: string): { dtype: string; shape: number[]; data: ArrayBufferView } {
    this.entry(name);
    return this.byName.get(name)!.read(name);
  }

  /** One tensor as fp32 (a fresh array), as SafetensorsFile.readFloat32. */
  readFloat32(name: string): Float32Array {
    this.entry(name);
    return this.byName.get(name)!.readFloat32(name);
  }

  /** The file (or index) name used in messages. */
  describe(): string {
    return this.files.length === 1 ? this.files[0].path : path.join(this.dir, 'model.safetensors.index.json');
  }

  totalBytes(): number {
    let n = 0;
    for (const f of this.files) for (const t of f.tensors.values()) n += t.end - t.begin;
    return n;
  }

  close(): void {
    this.files.forEach((f) => f.close());
  }
}

export interface WriteTensor {
  /** Our dtype ('f16', ...) or a safetensors one ('F16', 'I64', ...). */
  dtype: string;
  shape: number[];
  data: ArrayBufferView;
}

/** Writes a .safetensors file (tensors in the given order, 8-byte aligned header). */
export function writeSafetensors(file: string, tensors: Record<string, WriteTensor>, metadata?: Record<string, string>): void {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length) header.__metadata__ = metadata;
  let off = 0;
  const parts: Uint8Array[] = [];
  for (const [name, t] of Object.entries(tensors)) {
    const st = t.dtype in SAFETENSORS_DTYPE_BYTES ? t.dtype : fromDType(t.dtype as DType);
    if (!st || !(st in SAFETENSORS_DTYPE_BYTES)) throw new SqueezeError('ERR_DTYPE', `writeSafetensors: tensor '${name}': unknown dtype '${t.dtype}'`);
    const bytes = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    const want = numelOf(t.shape) * SAFETENSORS_DTYPE_BYTES[st];
    if (bytes.length !== want)
      throw new SqueezeError('ERR_SHAPE', `writeSafetensors: tensor '${name}': ${st} [${t.shape.join(', ')}] needs ${want} bytes, data has ${bytes.length}`);
    header[name] = { dtype: st, shape: t.shape, data_offsets: [off, off + bytes.length] };
    off += bytes.length;
    parts.push(bytes);
  }
  let json = JSON.stringify(header);
  while ((8 + Buffer.byteLength(json)) % 8 !== 0) json += ' ';
  const hb = Buffer.from(json, 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hb.length));
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, len);
    fs.writeSync(fd, hb);
    for (const p of parts) {
      let done = 0;
      while (done < p.length) done += fs.writeSync(fd, p, done, Math.min(p.length - done, 1 << 30));
    }
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}
