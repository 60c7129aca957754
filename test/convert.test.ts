// The restricted .pt reader and the upstream-checkpoint converter, on checkpoints written here by
// a tiny pickle + zip writer that mimics torch.save (protocol 2, stored entries).
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as zlib from 'zlib';
import { isSqueezeError } from '../ts/errors';
import { readPickle, TorchCheckpoint, ZipReader } from '../ts/quant/pickle';
import { convertCheckpoint } from '../ts/quant/convert';
import { dequantize, quantizeLinear, readSqueezeLinear, unpackCodes, packCodes, SqueezeLinear } from '../ts/quant/squeezellm';
import { SafetensorsFile } from '../ts/model/safetensors';
import { loadModel } from '../ts/model/model';
import { float32ToF16Bits, f16BitsToFloat32 } from '../ts/util/half';
import { rng, randn } from './gpu';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

// ---------------------------------------------------------------- writers

class Pickler {
  private parts: number[] = [];
  private memo = new Map<string, number>();
  op(...bytes: number[]): this { this.parts.push(...bytes); return this; }
  str(s: string): this {
    const b = Buffer.from(s, 'utf8');
    if (b.length < 256) this.op(0x8c, b.length);
    else { this.op(0x58); const l = Buffer.alloc(4); l.writeUInt32LE(b.length); this.op(...l); }
    return this.op(...b);
  }
  int(v: number): this {
    if (v >= 0 && v < 256) return this.op(0x4b, v);
    if (v >= 0 && v < 65536) return this.op(0x4d, v & 255, v >> 8);
    if (v >= -(2 ** 31) && v < 2 ** 31) { const b = Buffer.alloc(4); b.writeInt32LE(v); return this.op(0x4a, ...b); }
    const b = Buffer.alloc(8); b.writeBigInt64LE(BigInt(v)); return this.op(0x8a, 8, ...b);
  }
  /** GLOBAL, memoised like the real pickler (BINPUT on first use, BINGET after). */
  global(mod: string, name: string): this {
    const k = `${mod}.${name}`;
    const m = this.memo.get(k);
    if (m !== undefined) return this.op(0x68, m);
    this.op(0x63, ...Buffer.from(`${mod}\n${name}\n`));
    const id = this.memo.size;
    this.memo.set(k, id);
    return this.op(0x71, id);
  }
  tuple(items: number[]): this {
    if (items.length === 0) return this.op(0x29);
    this.op(0x28);
    items.forEach((v) => this.int(v));
    return this.op(0x74);
  }
  bytes(): Buffer { return Buffer.from(this.parts); }
}

interface PtTensor { storage: string; data: ArrayBufferView; shape: number[]; stride?: number[]; offset?: number; numel?: number; param?: boolean }
const STORAGE: Record<string, number> = { FloatStorage: 4, HalfStorage: 2, IntStorage: 4, LongStorage: 8 };

function statePickle(tensors: Record<string, PtTensor>): Buffer {
  const p = new Pickler().op(0x80, 2).global('collections', 'OrderedDict').op(0x29, 0x52, 0x71, 90).op(0x28);
  let key = 0;
  for (const [name, t] of Object.entries(tensors)) {
    p.str(name);
    if (t.param) p.global('torch._utils', '_rebuild_parameter').op(0x28);
    p.global('torch._utils', '_rebuild_tensor_v2').op(0x28);
    const numel = t.numel ?? t.data.byteLength / STORAGE[t.storage];
    p.op(0x28).str('storage').global('torch', t.storage).str(String(key++)).str('cpu').int(numel).op(0x74, 0x51);
    const stride = t.stride ?? t.shape.map((_, i) => t.shape.slice(i + 1).reduce((a, b) => a * b, 1));
    p.int(t.offset ?? 0).tuple(t.shape).tuple(stride).op(0x89);
    p.global('collections', 'OrderedDict').op(0x29, 0x52); // backward hooks
    p.op(0x74, 0x52);
    if (t.param) p.op(0x88).global('collections', 'OrderedDict').op(0x29, 0x52).op(0x74, 0x52);
  }
  p.op(0x75);
  // state for BUILD (torch keeps _metadata there): a dict with a float, None and a list
  p.op(0x7d, 0x28).str('_metadata').op(0x5d, 0x28).int(1).op(0x47, ...Buffer.from([0x3f, 0xf0, 0, 0, 0, 0, 0, 0]), 0x4e, 0x65)
    .op(0x75, 0x62, 0x2e);
  return p.bytes();
}

function zipStored(entries: Array<[string, Buffer]>): Buffer {
  const local: Buffer[] = [], central: Buffer[] = [];
  let off = 0;
  for (const [name, data] of entries) {
    const n = Buffer.from(name), crc = (zlib as unknown as { crc32(b: Uint8Array): number }).crc32(data) >>> 0;
    const h = Buffer.alloc(30);
    h.writeUInt32LE(0x04034b50, 0); h.writeUInt16LE(20, 4); h.writeUInt32LE(crc, 14);
    h.writeUInt32LE(data.length, 18); h.writeUInt32LE(data.length, 22); h.writeUInt16LE(n.length, 26);
    // pad the local extra field so data is 64-byte aligned, as torch does
    const pad = (64 - ((off + 30 + n.length + 4) % 64)) % 64;
    h.writeUInt16LE(4 + pad, 28);
    const extra = Buffer.alloc(4 + pad);
    extra.writeUInt16LE(0x4b46, 0); extra.writeUInt16LE(pad, 2);
    local.push(h, n, extra, data);
    const c = Buffer.alloc(46);
    c.writeUInt32LE(0x02014b50, 0); c.writeUInt16LE(20, 4); c.writeUInt16LE(20, 6); c.writeUInt32LE(crc, 16);
    c.writeUInt32LE(data.length, 20); c.writeUInt32LE(data.length, 24); c.writeUInt16LE(n.length, 28); c.writeUInt32LE(off, 42);
    central.push(c, n);
    off += 30 + n.length + extra.length + data.length;
  }
  const cd = Buffer.concat(central);
  const e = Buffer.alloc(22);
  e.writeUInt32LE(0x06054b50, 0); e.writeUInt16LE(entries.length, 8); e.writeUInt16LE(entries.length, 10);
  e.writeUInt32LE(cd.length, 12); e.writeUInt32LE(off, 16);
  return Buffer.concat([...local, cd, e]);
}

function writePt(file: string, tensors: Record<string, PtTensor>, pickle?: Buffer): void {
  const entries: Array<[string, Buffer]> = [['ckpt/data.pkl', pickle ?? statePickle(tensors)], ['ckpt/byteorder', Buffer.from('little')]];
  Object.values(tensors).forEach((t, i) => entries.push([`ckpt/data/${i}`, Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength)]));
  entries.push(['ckpt/version', Buffer.from('3\n')]);
  fs.writeFileSync(file, zipStored(entries));
}

const code = (f: () => unknown): string => {
  try { f(); } catch (e) { return isSqueezeError(e) ? `${e.code}: ${(e as Error).message}` : `other: ${e}`; }
  return 'none';
};

// ---------------------------------------------------------------- tests

const FIX = path.join(__dirname, 'fixtures', 'tiny-llama-gqa');
let dir: string;
beforeAll(() => { dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-pt-')); });
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe('restricted .pt reader', () => {
  test('reads tensors, parameters, strided views; memo, LONG1, BUILD', () => {
    const f = path.join(dir, 'a.pt');
    const a = new Float32Array([1, 2, 3, 4, 5, 6]);
    writePt(f, {
      'x.weight': { storage: 'FloatStorage', data: a, shape: [2, 3], param: true },
      't': { storage: 'FloatStorage', data: a, shape: [3, 2], stride: [1, 3] }, // a transposed view
      'big': { storage: 'LongStorage', data: new BigInt64Array([5n, -7n]), shape: [2] },
      'h': { storage: 'HalfStorage', data: float32ToF16Bits(new Float32Array([0.5, -2])), shape: [1, 2] },
    });
    const ck = TorchCheckpoint.open(f);
    expect(ck.names()).toEqual(['x.weight', 't', 'big', 'h']);
    expect(Array.from(ck.read('x.weight').data as Float32Array)).toEqual([1, 2, 3, 4, 5, 6]);
    const t = ck.read('t');
    expect(t.shape).toEqual([3, 2]);
    expect(Array.from(t.data as Float32Array)).toEqual([1, 4, 2, 5, 3, 6]);
    expect(Array.from(ck.read('big').data as BigInt64Array)).toEqual([5n, -7n]);
    expect(Array.from(f16BitsToFloat32(ck.read('h').data as Uint16Array))).toEqual([0.5, -2]);
    ck.close();
  });

  test('os.system in the pickle: ERR_FORMAT naming it, nothing runs', () => {
    const marker = path.join(dir, 'pwned');
    const evil = new Pickler().op(0x80, 2).op(0x63, ...Buffer.from('os\nsystem\n')).str(`touch ${marker}`).op(0x85, 0x52, 0x2e).bytes();
    const f = path.join(dir, 'evil.pt');
    writePt(f, {}, evil);
    const c = code(() => TorchCheckpoint.open(f));
    expect(c).toMatch(/^ERR_FORMAT: .*os\.system/);
    expect(fs.existsSync(marker)).toBe(false);
    // the same through STACK_GLOBAL, and torch's own byte-loader
    const sg = new Pickler().op(0x80, 4).str('builtins').str('eval').op(0x93).str('1').op(0x85, 0x52, 0x2e).bytes();
    expect(code(() => readPickle(sg, 'sg.pkl'))).toMatch(/^ERR_FORMAT: .*builtins\.eval/);
    const lb = new Pickler().op(0x80, 2).op(0x63, ...Buffer.from('torch.storage\n_load_from_bytes\n')).op(0x2e).bytes();
    expect(code(() => readPickle(lb, 'lb.pkl'))).toMatch(/^ERR_FORMAT: .*torch\.storage\._load_from_bytes/);
  });

  test('truncated or foreign files: ERR_FORMAT', () => {
    const f = path.join(dir, 'ok.pt');
    writePt(f, { w: { storage: 'FloatStorage', data: new Float32Array(64), shape: [64] } });
    const whole = fs.readFileSync(f);
    for (const cut of [whole.length - 10, Math.floor(whole.length / 2), 10]) {
      const g = path.join(dir, `cut${cut}.pt`);
      fs.writeFileSync(g, whole.subarray(0, cut));
      expect(code(() => TorchCheckpoint.open(g).read('w'))).toMatch(/^ERR_FORMAT/);
    }
    // truncated pickle inside a valid zip
    const g = path.join(dir, 'trunc-pkl.pt');
    writePt(g, {}, statePickle({ w: { storage: 'FloatStorage', data: new Float32Array(4), shape: [4] } }).subarray(0, 40));
    expect(code(() => TorchCheckpoint.open(g))).toMatch(/^ERR_FORMAT/);
    // a tensor that reaches outside its storage
    const h = path.join(dir, 'oob.pt');
    writePt(h, { w: { storage: 'FloatStorage', data: new Float32Array(4), shape: [8], numel: 4 } });
    expect(code(() => TorchCheckpoint.open(h).read('w'))).toMatch(/^ERR_FORMAT: .*outside/);
    expect(code(() => new ZipReader(path.join(FIX, 'config.json')))).toMatch(/^ERR_FORMAT/);
  });
});

/** Upstream layout: dense rows split off (codes at the zero centroid, full_rows = w - that centroid). */
function upstreamSplit(l: SqueezeLinear, w: Float32Array, fullIdx: number[]) {
  const { N, K, bits } = l, E = 1 << bits;
  const codes = unpackCodes(l.qweight, N, K, bits);
  const full = new Float32Array(K * fullIdx.length);
  const rows = [0], cols: number[] = [], vals: number[] = [];
  for (let n = 0; n < N; n++) {
    const j = fullIdx.indexOf(n);
    if (j >= 0) {
      let z = 0;
      for (let e = 1; e < E; e++) if (Math.abs(l.lut[n * E + e]) < Math.abs(l.lut[n * E + z])) z = e;
      for (let k = 0; k < K; k++) { codes[n * K + k] = z; full[k * fullIdx.length + j] = w[n * K + k] - l.lut[n * E + z]; }
    } else if (l.rows) for (let t = l.rows[n]; t < l.rows[n + 1]; t++) { cols.push(l.cols![t]); vals.push(l.vals![t]); }
    rows.push(cols.length);
  }
  return { qweight: packCodes(codes, N, K, bits), rows: Int32Array.from(rows), cols: Int32Array.from(cols), vals: Float32Array.from(vals), full };
}

describe('convert', () => {
  test('upstream checkpoint -> interchange folder; dense rows folded; round trip', async () => {
    const base = SafetensorsFile.open(path.join(FIX, 'model.safetensors'));
    const r = rng(11);
    const pt: Record<string, PtTensor> = {};
    const want = new Map<string, Float32Array>();
    const specs: Array<[string, 3 | 4, number[]]> = [
      ['model.layers.0.self_attn.q_proj', 4, []],
      ['model.layers.0.mlp.down_proj', 3, [1, 5]],
      ['model.layers.1.mlp.up_proj', 4, [0]],
    ];
    for (const [prefix, bits, fullIdx] of specs) {
      const w = base.readFloat32(`${prefix}.weight`);
      const [N, K] = base.entry(`${prefix}.weight`).shape;
      const l = await quantizeLinear(w, N, K, { bits, outliers: 0.01, iters: 10 });
      const u = upstreamSplit(l, w, fullIdx);
      const half = bits === 4; // one table in fp16, one in fp32
      pt[`${prefix}.qweight`] = { storage: 'IntStorage', data: u.qweight, shape: [Math.ceil(K / 32) * bits, N] };
      pt[`${prefix}.lookup_table`] = half
        ? { storage: 'HalfStorage', data: float32ToF16Bits(l.lut), shape: [N, 1 << bits] }
        : { storage: 'FloatStorage', data: l.lut, shape: [N, 1 << bits] };
      pt[`${prefix}.rows`] = { storage: 'IntStorage', data: u.rows, shape: [N + 1] };
      pt[`${prefix}.cols`] = { storage: 'IntStorage', data: u.cols, shape: [u.cols.length] };
      pt[`${prefix}.vals`] = { storage: 'FloatStorage', data: u.vals, shape: [u.vals.length] };
      pt[`${prefix}.startrows`] = { storage: 'IntStorage', data: new Int32Array(8), shape: [8] };
      if (fullIdx.length) {
        pt[`${prefix}.full_rows`] = { storage: 'HalfStorage', data: float32ToF16Bits(u.full), shape: [K, fullIdx.length] };
        pt[`${prefix}.full_row_indices`] = { storage: 'IntStorage', data: Int32Array.from(fullIdx), shape: [fullIdx.length] };
      }
      // what the upstream kernels compute: LUT (as stored) + CSR + dense rows (as stored)
      const lut = half ? f16BitsToFloat32(float32ToF16Bits(l.lut)) : l.lut;
      const eff = dequantize({ ...l, lut, qweight: u.qweight, rows: u.rows, cols: u.cols, vals: u.vals });
      const full = f16BitsToFloat32(float32ToF16Bits(u.full));
      fullIdx.forEach((n, j) => { for (let k = 0; k < K; k++) eff[n * K + k] += full[k * fullIdx.length + j]; });
      want.set(prefix, eff);
      // dense rows reproduce the weight to fp16 precision
      for (const n of fullIdx) for (let k = 0; k < K; k++) expect(Math.abs(eff[n * K + k] - w[n * K + k])).toBeLessThan(2e-3 * Math.abs(w[n * K + k]) + 1e-4);
    }
    const normW = randn(base.entry('model.norm.weight').shape[0], r);
    pt['model.norm.weight'] = { storage: 'FloatStorage', data: normW, shape: [normW.length], param: true };
    pt['model.layers.0.self_attn.rotary_emb.inv_freq'] = { storage: 'FloatStorage', data: new Float32Array(4), shape: [4] };
    const file = path.join(dir, 'sq.pt');
    writePt(file, pt);
    const out = path.join(dir, 'out');
    const res = await convertCheckpoint(file, { model: FIX, out });
    expect(res.linears).toBe(3);
    expect(res.foldedRows).toBe(3);
    expect(res.dropped).toEqual(['model.layers.0.self_attn.rotary_emb.inv_freq']);
    expect(res.fromCheckpoint).toBe(1);
    const f = SafetensorsFile.open(path.join(out, 'model.safetensors'));
    expect(f.metadata.format).toBe('squeezellm');
    expect(JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')).quantization_config.quant_method).toBe('squeezellm');
    for (const [prefix] of specs) {
      expect(f.has(`${prefix}.weight`)).toBe(false);
      expect(f.has(`${prefix}.startrows`)).toBe(false);
      const K = base.entry(`${prefix}.weight`).shape[1];
      const got = dequantize(readSqueezeLinear(f, prefix, K));
      const eff = want.get(prefix)!;
      let m = 0;
      for (let i = 0; i < eff.length; i++) m = Math.max(m, Math.abs(got[i] - eff[i]));
      expect(m).toBeLessThan(1e-6);
    }
    expect(Array.from(f.readFloat32('model.norm.weight'))).toEqual(Array.from(normW));
    expect(f.has('model.layers.1.self_attn.q_proj.weight')).toBe(true); // from the base
    expect(f.has('model.layers.0.self_attn.rotary_emb.inv_freq')).toBe(false);
    for (const t of fs.readdirSync(FIX).filter((x) => x.startsWith('tokenizer')))
      expect(fs.existsSync(path.join(out, t))).toBe(true);
    f.close();
    base.close();
    // q_proj alone of q|k|v quantized: the loader names the fused group before reading a byte
    await expect(loadModel(out, { device: 'cpu' })).rejects.toMatchObject({
      code: 'ERR_FORMAT', message: expect.stringMatching(/q_proj \+ .*v_proj are fused, but only model\.layers\.0\.self_attn\.q_proj is quantized/),
    });
  });

  test('missing base tensor and non-SqueezeLLM checkpoints: ERR_FORMAT', async () => {
    const f = path.join(dir, 'nq.pt');
    writePt(f, { 'model.norm.weight': { storage: 'FloatStorage', data: new Float32Array(4), shape: [4] } });
    await expect(convertCheckpoint(f, { model: FIX, out: path.join(dir, 'o2') })).rejects.toMatchObject({ code: 'ERR_FORMAT' });
    const g = path.join(dir, 'unknown.pt');
    writePt(g, {
      'model.layers.9.mlp.up_proj.qweight': { storage: 'IntStorage', data: new Int32Array(4), shape: [4, 1] },
      'model.layers.9.mlp.up_proj.lookup_table': { storage: 'FloatStorage', data: new Float32Array(16), shape: [1, 16] },
    });
    await expect(convertCheckpoint(g, { model: FIX, out: path.join(dir, 'o3') })).rejects.toThrow(/model\.layers\.9\.mlp\.up_proj\.weight/);
  });
});

describe('decoder hooks', () => {
  test('loadQuantizedLinear fuses gate+up; linearForward matches the dense product', async () => {
    const { loadQuantizedLinear, linearForward, squeezeTensors } = await import('../ts/quant/squeezellm');
    const { writeSafetensors } = await import('../ts/model/safetensors');
    const { Tensor } = await import('../ts/tensor');
    const r = rng(21);
    const K = 70, Ns = [24, 40];
    const ls = await Promise.all(Ns.map((N) => quantizeLinear(randn(N * K, r, 0.05), N, K, { bits: 3, outliers: N === 24 ? 0.02 : 0 })));
    const file = path.join(dir, 'gu.safetensors');
    writeSafetensors(file, { ...squeezeTensors('l.gate_proj', ls[0], 'f32', 'f32'), ...squeezeTensors('l.up_proj', ls[1], 'f32', 'f32') });
    const f = SafetensorsFile.open(file);
    expect(loadQuantizedLinear(f, ['l.down_proj'], K, 'cpu')).toBeUndefined();
    const m = loadQuantizedLinear(f, ['l.gate_proj', 'l.up_proj'], K, 'cpu')!;
    expect(m.N).toBe(64);
    const M = 3, x = randn(M * K, r);
    const y = Tensor.empty([M, 64]);
    linearForward(y, Tensor.from(x, [M, K]), m);
    const got = (await y.toArray()) as Float32Array;
    const w = [...dequantize(ls[0]), ...dequantize(ls[1])];
    for (let i = 0; i < M; i++)
      for (let n = 0; n < 64; n++) {
        let s = 0;
        for (let k = 0; k < K; k++) s += x[i * K + k] * w[n * K + k];
        expect(Math.abs(got[i * 64 + n] - s)).toBeLessThan(1e-4);
      }
    m.dispose();
    f.close();
  });
});
