import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { isSqueezeError } from '../ts/errors';
import { Checkpoint, SafetensorsFile, writeSafetensors } from '../ts/model/safetensors';
import { computeInvFreq, loadConfig, parseConfig } from '../ts/model/config';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-st-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A raw file: 8-byte header length, header JSON, data bytes. */
function raw(name: string, header: unknown, dataBytes: number, lenOverride?: number): string {
  const h = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(lenOverride ?? h.length));
  const f = path.join(tmp, name);
  fs.writeFileSync(f, Buffer.concat([len, h, Buffer.alloc(dataBytes)]));
  return f;
}

function expectFormat(fn: () => unknown, ...parts: string[]): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(isSqueezeError(err, 'ERR_FORMAT')).toBe(true);
  for (const p of parts) expect((err as Error).message).toContain(p);
}

describe('safetensors', () => {
  test('round trip with metadata, lazy reads', () => {
    const f = path.join(tmp, 'ok.safetensors');
    const a = Float32Array.from([1, 2, 3, 4, 5, 6]);
    const b = Int32Array.from([7, -8]);
    const c = Uint16Array.from([0x3c00, 0x4000, 0xbc00]);
    writeSafetensors(f, { a: { dtype: 'f32', shape: [2, 3], data: a }, b: { dtype: 'I32', shape: [2], data: b }, c: { dtype: 'f16', shape: [3], data: c } }, { format: 'pt', bits: '4' });
    const st = SafetensorsFile.open(f);
    expect(st.metadata).toEqual({ format: 'pt', bits: '4' });
    expect(st.names().sort()).toEqual(['a', 'b', 'c']);
    expect(Array.from(st.readFloat32('a'))).toEqual([1, 2, 3, 4, 5, 6]);
    expect(Array.from(st.readInt32('b'))).toEqual([7, -8]);
    expect(Array.from(st.readFloat32('c'))).toEqual([1, 2, -1]);
    expect(st.entry('a').shape).toEqual([2, 3]);
    st.close();
  });

  test('truncated header', () => {
    const f = path.join(tmp, 'short.safetensors');
    fs.writeFileSync(f, Buffer.from([1, 2, 3]));
    expectFormat(() => SafetensorsFile.open(f), f, 'too short');
    expectFormat(() => SafetensorsFile.open(raw('long.safetensors', { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, 4, 1000)), 'long.safetensors', 'past the end');
  });

  test('bad JSON and bad metadata', () => {
    expectFormat(() => SafetensorsFile.open(raw('json.safetensors', '{"a": ', 0)), 'json.safetensors', 'JSON');
    expectFormat(() => SafetensorsFile.open(raw('meta.safetensors', { __metadata__: { k: 1 } }, 0)), '__metadata__');
  });

  test('lying offsets, overlapping ranges, inconsistent dtype/shape', () => {
    expectFormat(
      () => SafetensorsFile.open(raw('off.safetensors', { w: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, 8)),
      'off.safetensors', "'w'", 'past the data',
    );
    expectFormat(
      () => SafetensorsFile.open(raw('ovl.safetensors', {
        x: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
        y: { dtype: 'F32', shape: [2], data_offsets: [4, 12] },
      }, 12)),
      'ovl.safetensors', "'x'", "'y'", 'overlap',
    );
    expectFormat(
      () => SafetensorsFile.open(raw('size.safetensors', { z: { dtype: 'F16', shape: [3], data_offsets: [0, 8] } }, 8)),
      "'z'", 'needs 6 bytes',
    );
    expectFormat(() => SafetensorsFile.open(raw('dt.safetensors', { q: { dtype: 'F12', shape: [1], data_offsets: [0, 2] } }, 2)), "'q'", 'dtype');
    expectFormat(() => SafetensorsFile.open(raw('neg.safetensors', { s: { dtype: 'F32', shape: [-1], data_offsets: [0, 0] } }, 0)), "'s'", 'shape');
    expectFormat(() => SafetensorsFile.open(raw('rev.safetensors', { r: { dtype: 'U8', shape: [0], data_offsets: [4, 2] } }, 4)), "'r'");
  });

  test('sharded checkpoint through the index', () => {
    const dir = fs.mkdtempSync(path.join(tmp, 'shard-'));
    writeSafetensors(path.join(dir, 'a.safetensors'), { x: { dtype: 'f32', shape: [1], data: Float32Array.from([1]) } });
    writeSafetensors(path.join(dir, 'b.safetensors'), { y: { dtype: 'f32', shape: [1], data: Float32Array.from([2]) } });
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { x: 'a.safetensors', y: 'b.safetensors' } }));
    const ck = Checkpoint.open(dir);
    expect(ck.names().sort()).toEqual(['x', 'y']);
    expect(Array.from(ck.read('y').data as Float32Array)).toEqual([2]);
    expectFormat(() => ck.entry('nope'), "'nope'", 'model.safetensors.index.json');
    ck.close();
  });
});

describe('config', () => {
  const base = {
    model_type: 'llama', hidden_size: 256, intermediate_size: 768, num_hidden_layers: 2,
    num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 512, max_position_embeddings: 4096,
    rms_norm_eps: 1e-5,
  };

  test('both rope spellings agree, default inv_freq', () => {
    const a = parseConfig({ ...base, rope_theta: 500000 });
    const b = parseConfig({ ...base, rope_parameters: { rope_theta: 500000, rope_type: 'default' } });
    expect(a.rope.theta).toBe(500000);
    expect(Array.from(a.invFreq)).toEqual(Array.from(b.invFreq));
    expect(a.headDim).toBe(64);
    expect(a.invFreq.length).toBe(32);
    for (let i = 0; i < 32; i++) expect(a.invFreq[i]).toBeCloseTo(1 / Math.pow(500000, (2 * i) / 64), 6);
    const pc = loadConfig(path.join(__dirname, '..', 'models', 'pycoder-mini'));
    expect(pc.rope.theta).toBe(10000);
    expect(pc.tieWordEmbeddings).toBe(true);
    expect(pc.numKvHeads).toBe(2);
  });

  test('linear and llama3 scaling vs hand-computed values', () => {
    const lin = parseConfig({ ...base, rope_theta: 10000, rope_scaling: { type: 'linear', factor: 4 } });
    const dflt = computeInvFreq(64, { type: 'default', theta: 10000 });
    for (let i = 0; i < 32; i++) expect(lin.invFreq[i]).toBeCloseTo(dflt[i] / 4, 8);
    const l3cfg = { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 };
    const l3 = parseConfig({ ...base, hidden_size: 512, num_attention_heads: 4, head_dim: 128, rope_theta: 500000, rope_scaling: l3cfg });
    const l3b = parseConfig({ ...base, hidden_size: 512, num_attention_heads: 4, head_dim: 128, rope_parameters: { rope_theta: 500000, ...l3cfg } });
    expect(Array.from(l3.invFreq)).toEqual(Array.from(l3b.invFreq));
    // Hand computation in double precision, the rule of Llama 3.1.
    for (let i = 0; i < 64; i++) {
      const f = 1 / Math.pow(500000, (2 * i) / 128);
      const wl = (2 * Math.PI) / f;
      let want: number;
      if (wl < 8192 / 4) want = f;
      else if (wl > 8192 / 1) want = f / 8;
      else {
        const s = (8192 / wl - 1) / (4 - 1);
        want = (1 - s) * (f / 8) + s * f;
      }
      expect(Math.abs(l3.invFreq[i] - want) / want).toBeLessThan(1e-5);
    }
    // The three regimes all occur at these settings.
    expect(l3.invFreq[0]).toBeCloseTo(1, 6);
    expect(l3.invFreq[63]).toBeLessThan(dflt[31]);
  });

  test('qwen2 biases, llama attention_bias, GQA, explicit head_dim, tying', () => {
    const q = parseConfig({ ...base, model_type: 'qwen2', tie_word_embeddings: true });
    expect(q.qkvBias).toBe(true);
    expect(q.oBias).toBe(false);
    expect(q.tieWordEmbeddings).toBe(true);
    const l = parseConfig({ ...base, attention_bias: true, head_dim: 32 });
    expect(l.qkvBias && l.oBias).toBe(true);
    expect(l.headDim).toBe(32);
    expect(parseConfig(base).qkvBias).toBe(false);
    expect(parseConfig({ ...base, model_type: 'mistral', sliding_window: 4096 }).slidingWindow).toBe(4096);
  });

  test('unknown architecture -> ERR_UNSUPPORTED naming it', () => {
    let err: unknown;
    try {
      parseConfig({ ...base, model_type: 'gpt2', architectures: ['GPT2LMHeadModel'] });
    } catch (e) {
      err = e;
    }
    expect(isSqueezeError(err, 'ERR_UNSUPPORTED')).toBe(true);
    expect((err as Error).message).toContain('gpt2');
    let err2: unknown;
    try {
      parseConfig({ ...base, rope_scaling: { rope_type: 'yarn', factor: 2 } });
    } catch (e) {
      err2 = e;
    }
    expect(isSqueezeError(err2, 'ERR_UNSUPPORTED')).toBe(true);
  });
});
