/**
 * A restricted reader of PyTorch checkpoints (`torch.save` zip files: `<root>/data.pkl` plus one
 * `<root>/data/<key>` entry per storage). The pickle is interpreted by a small stack machine that
 * knows only the opcodes a state dict needs and a fixed allow-list of globals (OrderedDict, the
 * tensor/parameter rebuild functions and the typed storage classes). It never imports or calls
 * anything: every other global is rejected with ERR_FORMAT naming it, before anything is built.
 */
import * as fs from 'fs';
import * as zlib from 'zlib';
import { SqueezeError } from '../errors';
import { typedView } from '../model/safetensors';

const fmt = (file: string, msg: string): SqueezeError => new SqueezeError('ERR_FORMAT', `${file}: ${msg}`);

// ---------------------------------------------------------------- zip

export interface ZipEntry {
  name: string;
  method: number;
  compressedSize: number;
  size: number;
  localOffset: number;
  crc: number;
}

/** A zip archive read through a file descriptor (central directory, ZIP64 aware; stored or deflated entries). */
export class ZipReader {
  readonly entries = new Map<string, ZipEntry>();
  private fd: number;
  private fileSize: number;

  constructor(readonly file: string) {
    try {
      this.fd = fs.openSync(file, 'r');
    } catch (e) {
      throw new SqueezeError('ERR_FORMAT', `${file}: cannot open (${(e as Error).message})`);
    }
    try {
      this.fileSize = fs.fstatSync(this.fd).size;
      this.readDirectory();
    } catch (e) {
      fs.closeSync(this.fd);
      throw e;
    }
  }

  private pread(pos: number, len: number): Buffer {
    if (pos < 0 || len < 0 || pos + len > this.fileSize) throw fmt(this.file, `truncated zip (needs bytes ${pos}..${pos + len} of ${this.fileSize})`);
    const b = Buffer.alloc(len);
    let done = 0;
    while (done < len) {
      const n = fs.readSync(this.fd, b, done, len - done, pos + done);
      if (n <= 0) throw fmt(this.file, 'unexpected end of file');
      done += n;
    }
    return b;
  }

  private readDirectory(): void {
    const tailLen = Math.min(this.fileSize, 22 + 65535);
    if (tailLen < 22) throw fmt(this.file, 'not a zip file (too short)');
    const tail = this.pread(this.fileSize - tailLen, tailLen);
    let eocd = -1;
    for (let i = tailLen - 22; i >= 0; i--) if (tail.readUInt32LE(i) === 0x06054b50) { eocd = i; break; }
    if (eocd < 0) throw fmt(this.file, 'not a zip file or truncated (no end-of-central-directory record)');
    let count = tail.readUInt16LE(eocd + 10);
    let cdSize = tail.readUInt32LE(eocd + 12);
    let cdOffset = tail.readUInt32LE(eocd + 16);
    if (count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) {
      // ZIP64: the locator sits right before the end-of-central-directory record.
      const locPos = this.fileSize - tailLen + eocd - 20;
      const loc = this.pread(locPos, 20);
      if (loc.readUInt32LE(0) !== 0x07064b50) throw fmt(this.file, 'missing ZIP64 locator');
      const recPos = Number(loc.readBigUInt64LE(8));
      const rec = this.pread(recPos, 56);
      if (rec.readUInt32LE(0) !== 0x06064b50) throw fmt(this.file, 'bad ZIP64 end-of-central-directory record');
      count = Number(rec.readBigUInt64LE(32));
      cdSize = Number(rec.readBigUInt64LE(40));
      cdOffset = Number(rec.readBigUInt64LE(48));
    }
    const cd = this.pread(cdOffset, cdSize);
    let p = 0;
    for (let i = 0; i < count; i++) {
      if (p + 46 > cd.length || cd.readUInt32LE(p) !== 0x02014b50) throw fmt(this.file, `corrupt central directory (entry ${i})`);
      const flags = cd.readUInt16LE(p + 8), method = cd.readUInt16LE(p + 10), crc = cd.readUInt32LE(p + 16);
      let csize = cd.readUInt32LE(p + 20), size = cd.readUInt32LE(p + 24);
      const nlen = cd.readUInt16LE(p + 28), xlen = cd.readUInt16LE(p + 30), clen = cd.readUInt16LE(p + 32);
      let off = cd.readUInt32LE(p + 42);
      if (p + 46 + nlen + xlen + clen > cd.length) throw fmt(this.file, `corrupt central directory (entry ${i})`);
      const name = cd.toString('utf8', p + 46, p + 46 + nlen);
      // ZIP64 extra field: the 64-bit values of the fields saturated above, in this order.
      let x = p + 46 + nlen;
      const xend = x + xlen;
      while (x + 4 <= xend) {
        const id = cd.readUInt16LE(x), len = cd.readUInt16LE(x + 2);
        if (id === 0x0001) {
          let q = x + 4;
          if (size === 0xffffffff) { size = Number(cd.readBigUInt64LE(q)); q += 8; }
          if (csize === 0xffffffff) { csize = Number(cd.readBigUInt64LE(q)); q += 8; }
          if (off === 0xffffffff) { off = Number(cd.readBigUInt64LE(q)); q += 8; }
        }
        x += 4 + len;
      }
      if (flags & 1) throw fmt(this.file, `entry '${name}' is encrypted`);
      if (method !== 0 && method !== 8) throw fmt(this.file, `entry '${name}': compression method ${method} is not supported`);
      this.entries.set(name, { name, method, compressedSize: csize, size, localOffset: off, crc });
      p += 46 + nlen + xlen + clen;
    }
  }

  has(name: string): boolean {
    return this.entries.has(name);
  }

  /** The bytes of one entry (inflated when deflated), CRC-checked. */
  read(name: string): Buffer {
    const e = this.entries.get(name);
    if (!e) throw fmt(this.file, `no entry '${name}'`);
    const h = this.pread(e.localOffset, 30);
    if (h.readUInt32LE(0) !== 0x04034b50) throw fmt(this.file, `entry '${name}': bad local header`);
    const start = e.localOffset + 30 + h.readUInt16LE(26) + h.readUInt16LE(28);
    const raw = this.pread(start, e.compressedSize);
    let data: Buffer;
    if (e.method === 0) data = raw;
    else {
      try {
        data = zlib.inflateRawSync(raw);
      } catch (err) {
        throw fmt(this.file, `entry '${name}': ${(err as Error).message}`);
      }
    }
    if (data.length !== e.size) throw fmt(this.file, `entry '${name}': ${data.length} bytes, directory says ${e.size}`);
    const crc32 = (zlib as unknown as { crc32?: (b: Uint8Array) => number }).crc32;
    if (crc32 && crc32(data) >>> 0 !== e.crc >>> 0) throw fmt(this.file, `entry '${name}': CRC mismatch`);
    return data;
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}

// ---------------------------------------------------------------- pickle

/** Storage classes -> safetensors dtype and element size. */
const STORAGES: Record<string, [string, number]> = {
  'torch.FloatStorage': ['F32', 4], 'torch.HalfStorage': ['F16', 2], 'torch.BFloat16Storage': ['BF16', 2],
  'torch.IntStorage': ['I32', 4], 'torch.LongStorage': ['I64', 8], 'torch.ByteStorage': ['U8', 1],
  'torch.CharStorage': ['I8', 1], 'torch.ShortStorage': ['I16', 2], 'torch.BoolStorage': ['BOOL', 1],
  'torch.DoubleStorage': ['F64', 8],
};
const CALLABLES = new Set(['collections.OrderedDict', 'torch._utils._rebuild_tensor_v2', 'torch._utils._rebuild_parameter']);

class PyGlobal { constructor(readonly name: string) {} }
class PyTuple { constructor(readonly items: unknown[]) {} }
class StorageRef { constructor(readonly key: string, readonly dtype: string, readonly elemSize: number, readonly numel: number) {} }
/** A tensor as the pickle describes it: a strided view of a storage. */
export class TensorRef {
  constructor(readonly storage: StorageRef, readonly offset: number, readonly shape: number[], readonly stride: number[]) {}
  get dtype(): string { return this.storage.dtype; }
}
const MARK = Symbol('mark');

function asInt(v: unknown, what: string, file: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw fmt(file, `${what}: expected an integer`);
  return v;
}

/**
 * Interprets a pickle (protocol <= 5 encoding of the opcodes a state dict uses) without running
 * anything. Dicts become Maps, lists arrays, tuples PyTuple, tensors TensorRef.
 */
export function readPickle(buf: Uint8Array, file: string): unknown {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  const stack: unknown[] = [];
  const memo = new Map<number, unknown>();
  let p = 0;
  const need = (n: number) => {
    if (p + n > b.length) throw fmt(file, `truncated pickle at byte ${p}`);
  };
  const pop = (): unknown => {
    if (!stack.length) throw fmt(file, `pickle stack underflow at byte ${p}`);
    const v = stack.pop();
    if (v === MARK) throw fmt(file, `unexpected mark at byte ${p}`);
    return v;
  };
  const popMark = (): unknown[] => {
    for (let i = stack.length - 1; i >= 0; i--)
      if (stack[i] === MARK) {
        const items = stack.slice(i + 1);
        stack.length = i;
        return items;
      }
    throw fmt(file, `no mark on the pickle stack at byte ${p}`);
  };
  const top = (): unknown => {
    if (!stack.length || stack[stack.length - 1] === MARK) throw fmt(file, `pickle stack underflow at byte ${p}`);
    return stack[stack.length - 1];
  };
  const str = (n: number): string => {
    need(n);
    const s = b.toString('utf8', p, p + n);
    p += n;
    return s;
  };
  const global = (mod: string, name: string): PyGlobal => {
    const full = `${mod}.${name}`;
    if (!CALLABLES.has(full) && !(full in STORAGES))
      throw fmt(file, `pickle refers to ${full}, which is not allowed in a checkpoint (only state dicts of tensors are read)`);
    return new PyGlobal(full);
  };
  const setItems = (d: unknown, items: unknown[]) => {
    if (!(d instanceof Map)) throw fmt(file, `SETITEMS on a non-dict at byte ${p}`);
    if (items.length % 2) throw fmt(file, `odd number of dict items at byte ${p}`);
    for (let i = 0; i < items.length; i += 2) d.set(items[i], items[i + 1]);
  };
  const reduce = (f: unknown, args: unknown): unknown => {
    if (!(f instanceof PyGlobal)) throw fmt(file, `REDUCE of a non-callable at byte ${p}`);
    if (!(args instanceof PyTuple)) throw fmt(file, `REDUCE arguments are not a tuple at byte ${p}`);
    const a = args.items;
    switch (f.name) {
      case 'collections.OrderedDict': {
        const m = new Map<unknown, unknown>();
        if (a.length > 0) {
          if (!Array.isArray(a[0])) throw fmt(file, 'OrderedDict() takes a list of pairs');
          for (const kv of a[0] as unknown[]) {
            if (!(kv instanceof PyTuple) || kv.items.length !== 2) throw fmt(file, 'OrderedDict() takes a list of pairs');
            m.set(kv.items[0], kv.items[1]);
          }
        }
        return m;
      }
      case 'torch._utils._rebuild_tensor_v2': {
        const [st, off, size, stride] = a;
        if (!(st instanceof StorageRef)) throw fmt(file, '_rebuild_tensor_v2: first argument is not a storage');
        if (!(size instanceof PyTuple) || !(stride instanceof PyTuple) || size.items.length !== stride.items.length)
          throw fmt(file, '_rebuild_tensor_v2: bad size/stride');
        return new TensorRef(st, asInt(off, 'storage offset', file), size.items.map((v) => asInt(v, 'size', file)),
          stride.items.map((v) => asInt(v, 'stride', file)));
      }
      case 'torch._utils._rebuild_parameter':
        if (!(a[0] instanceof TensorRef)) throw fmt(file, '_rebuild_parameter: first argument is not a tensor');
        return a[0];
      default:
        throw fmt(file, `${f.name} cannot be called`);
    }
  };
  for (;;) {
    need(1);
    const op = b[p++];
    switch (op) {
      case 0x80: need(1); p += 1; break; // PROTO
      case 0x95: need(8); p += 8; break; // FRAME
      case 0x7d: stack.push(new Map()); break; // EMPTY_DICT }
      case 0x5d: stack.push([]); break; // EMPTY_LIST ]
      case 0x29: stack.push(new PyTuple([])); break; // EMPTY_TUPLE )
      case 0x28: stack.push(MARK); break; // MARK (
      case 0x58: { need(4); const n = b.readUInt32LE(p); p += 4; stack.push(str(n)); break; } // BINUNICODE X
      case 0x8c: { need(1); const n = b[p++]; stack.push(str(n)); break; } // SHORT_BINUNICODE
      case 0x8d: { need(8); const n = Number(b.readBigUInt64LE(p)); p += 8; stack.push(str(n)); break; } // BINUNICODE8
      case 0x4a: need(4); stack.push(b.readInt32LE(p)); p += 4; break; // BININT J
      case 0x4b: need(1); stack.push(b[p++]); break; // BININT1 K
      case 0x4d: need(2); stack.push(b.readUInt16LE(p)); p += 2; break; // BININT2 M
      case 0x8a: { // LONG1
        need(1);
        const n = b[p++];
        need(n);
        let v = 0n;
        for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[p + i]);
        if (n > 0 && b[p + n - 1] & 0x80) v -= 1n << BigInt(8 * n);
        p += n;
        if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) throw fmt(file, `integer ${v} out of range`);
        stack.push(Number(v));
        break;
      }
      case 0x47: need(8); stack.push(b.readDoubleBE(p)); p += 8; break; // BINFLOAT G
      case 0x4e: stack.push(null); break; // NONE
      case 0x88: stack.push(true); break; // NEWTRUE
      case 0x89: stack.push(false); break; // NEWFALSE
      case 0x74: stack.push(new PyTuple(popMark())); break; // TUPLE t
      case 0x85: stack.push(new PyTuple([pop()])); break; // TUPLE1
      case 0x86: { const y = pop(), x = pop(); stack.push(new PyTuple([x, y])); break; } // TUPLE2
      case 0x87: { const z = pop(), y = pop(), x = pop(); stack.push(new PyTuple([x, y, z])); break; } // TUPLE3
      case 0x61: { const v = pop(); const l = top(); if (!Array.isArray(l)) throw fmt(file, 'APPEND to a non-list'); l.push(v); break; } // APPEND a
      case 0x65: { const items = popMark(); const l = top(); if (!Array.isArray(l)) throw fmt(file, 'APPENDS to a non-list'); l.push(...items); break; } // APPENDS e
      case 0x73: { const v = pop(), k = pop(); setItems(top(), [k, v]); break; } // SETITEM s
      case 0x75: { const items = popMark(); setItems(top(), items); break; } // SETITEMS u
      case 0x63: { // GLOBAL c: "module\nname\n"
        const e1 = b.indexOf(0x0a, p);
        if (e1 < 0) throw fmt(file, 'truncated GLOBAL');
        const e2 = b.indexOf(0x0a, e1 + 1);
        if (e2 < 0) throw fmt(file, 'truncated GLOBAL');
        const mod = b.toString('utf8', p, e1), name = b.toString('utf8', e1 + 1, e2);
        p = e2 + 1;
        stack.push(global(mod, name));
        break;
      }
      case 0x93: { // STACK_GLOBAL
        const name = pop(), mod = pop();
        if (typeof mod !== 'string' || typeof name !== 'string') throw fmt(file, 'STACK_GLOBAL needs two strings');
        stack.push(global(mod, name));
        break;
      }
      case 0x52: { const args = pop(), f = pop(); stack.push(reduce(f, args)); break; } // REDUCE R
      case 0x62: { pop(); const o = top(); if (!(o instanceof Map)) throw fmt(file, 'BUILD on an object that is not a dict'); break; } // BUILD: state ignored
      case 0x51: { // BINPERSID Q: ('storage', storage_type, key, location, numel)
        const pid = pop();
        if (!(pid instanceof PyTuple) || pid.items.length < 5 || pid.items[0] !== 'storage') throw fmt(file, 'unsupported persistent id');
        const [, type, key, , numel] = pid.items;
        if (!(type instanceof PyGlobal) || !(type.name in STORAGES)) throw fmt(file, 'persistent id without a storage class');
        if (typeof key !== 'string') throw fmt(file, 'storage key is not a string');
        const [dtype, size] = STORAGES[type.name];
        stack.push(new StorageRef(key, dtype, size, asInt(numel, 'storage size', file)));
        break;
      }
      case 0x71: need(1); memo.set(b[p++], top()); break; // BINPUT q
      case 0x72: need(4); memo.set(b.readUInt32LE(p), top()); p += 4; break; // LONG_BINPUT r
      case 0x94: memo.set(memo.size, top()); break; // MEMOIZE
      case 0x68: case 0x6a: { // BINGET h / LONG_BINGET j
        const wide = op === 0x6a;
        need(wide ? 4 : 1);
        const i = wide ? b.readUInt32LE(p) : b[p];
        p += wide ? 4 : 1;
        if (!memo.has(i)) throw fmt(file, `pickle memo ${i} is unset`);
        stack.push(memo.get(i));
        break;
      }
      case 0x30: pop(); break; // POP
      case 0x2e: { // STOP
        const v = pop();
        return v;
      }
      default:
        throw fmt(file, `unsupported pickle opcode 0x${op.toString(16)} at byte ${p - 1}`);
    }
  }
}

// ---------------------------------------------------------------- checkpoint

export interface TorchTensor {
  /** safetensors dtype name: F32, F16, BF16, I32, I64, U8, I8, I16, BOOL, F64 */
  dtype: string;
  shape: number[];
  data: ArrayBufferView;
}

/** A PyTorch state dict read without executing its pickle; tensors are materialised on demand. */
export class TorchCheckpoint {
  readonly tensors = new Map<string, TensorRef>();
  private zip: ZipReader;
  private root: string;
  private cache = new Map<string, Buffer>();

  private constructor(readonly file: string) {
    this.zip = new ZipReader(file);
    try {
      const pkl = [...this.zip.entries.keys()].filter((n) => /^[^/]+\/data\.pkl$/.test(n));
      if (pkl.length !== 1) throw fmt(file, pkl.length ? 'more than one data.pkl' : 'no <root>/data.pkl: not a PyTorch zip checkpoint (legacy pickled checkpoints are not read)');
      this.root = pkl[0].slice(0, -'data.pkl'.length);
      const bo = `${this.root}byteorder`;
      if (this.zip.has(bo) && this.zip.read(bo).toString('utf8').trim() !== 'little')
        throw fmt(file, 'big-endian checkpoints are not supported');
      const obj = readPickle(this.zip.read(pkl[0]), file);
      let dict = obj;
      // {'state_dict': {...}} or {'model': {...}} wrappers hold the dict one level down.
      if (dict instanceof Map && ![...dict.values()].some((v) => v instanceof TensorRef)) {
        const inner = [...dict.values()].filter((v) => v instanceof Map);
        if (inner.length === 1) dict = inner[0];
      }
      if (!(dict instanceof Map)) throw fmt(file, 'the pickle does not hold a dict of tensors');
      for (const [k, v] of dict)
        if (typeof k === 'string' && v instanceof TensorRef) this.tensors.set(k, v);
    } catch (e) {
      this.zip.close();
      throw e;
    }
  }

  static open(file: string): TorchCheckpoint {
    return new TorchCheckpoint(file);
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  names(): string[] {
    return [...this.tensors.keys()];
  }

  /** One tensor, contiguous, in a fresh aligned buffer (strided views are gathered). */
  read(name: string): TorchTensor {
    const t = this.tensors.get(name);
    if (!t) throw fmt(this.file, `missing tensor '${name}'`);
    const key = `${this.root}data/${t.storage.key}`;
    let st = this.cache.get(key);
    if (!st) {
      st = this.zip.read(key);
      this.cache.clear();
      this.cache.set(key, st);
    }
    const es = t.storage.elemSize;
    if (st.length < t.storage.numel * es) throw fmt(this.file, `storage ${t.storage.key} of '${name}' is shorter than its ${t.storage.numel} elements`);
    const numel = t.shape.reduce((a, x) => a * x, 1);
    const out = new Uint8Array(numel * es);
    if (numel > 0) {
      let maxIdx = t.offset, minIdx = t.offset;
      t.shape.forEach((s, i) => {
        const span = (s - 1) * t.stride[i];
        if (span > 0) maxIdx += span;
        else minIdx += span;
      });
      if (minIdx < 0 || maxIdx >= t.storage.numel)
        throw fmt(this.file, `tensor '${name}' [${t.shape}] reaches outside its storage of ${t.storage.numel} elements`);
      let contiguous = true;
      for (let i = t.shape.length - 1, s = 1; i >= 0; i--) {
        if (t.shape[i] !== 1 && t.stride[i] !== s) contiguous = false;
        s *= t.shape[i];
      }
      if (contiguous) out.set(st.subarray(t.offset * es, (t.offset + numel) * es));
      else {
        const idx = new Array(t.shape.length).fill(0);
        for (let j = 0; j < numel; j++) {
          let src = t.offset;
          for (let d = 0; d < idx.length; d++) src += idx[d] * t.stride[d];
          out.set(st.subarray(src * es, (src + 1) * es), j * es);
          for (let d = idx.length - 1; d >= 0; d--) {
            if (++idx[d] < t.shape[d]) break;
            idx[d] = 0;
          }
        }
      }
    }
    return { dtype: t.dtype, shape: [...t.shape], data: typedView(t.dtype, out) };
  }

  close(): void {
    this.cache.clear();
    this.zip.close();
  }
}
