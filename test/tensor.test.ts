import { Tensor, devices, isSqueezeError, ops, synchronize, resolveDevice } from '../ts';
import { native } from '../ts/native';
import { describeGpu, rng, randn } from './gpu';
import { float32ToF16Bits, f16BitsToFloat32, float32ToBf16Bits } from '../ts/util/half';

// Math as a module constant: under jest each lookup of the global in a hot loop is ~10x slower
// (the sandbox's global object; see gpu.ts).
const Math = globalThis.Math;

function expectCode(fn: () => unknown, code: string): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(isSqueezeError(err, code)).toBe(true);
}

async function expectReject(p: Promise<unknown>, code: string): Promise<void> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  expect(isSqueezeError(err, code)).toBe(true);
}

describe('devices', () => {
  test('cpu is listed first with its thread count; CUDA absence is explained', () => {
    const list = devices();
    expect(list[0].id).toBe('cpu');
    expect(list[0].threads).toBeGreaterThan(0);
    if (!list.some((d) => d.type === 'cuda')) expect(typeof list[0].cudaUnavailable).toBe('string');
  });

  test('device strings', () => {
    expect(resolveDevice('cpu')).toBe('cpu');
    expectCode(() => resolveDevice('tpu:0'), 'ERR_DEVICE');
    expectCode(() => Tensor.empty([2], { device: 'cuda:99' }), 'ERR_DEVICE');
    expectCode(() => Tensor.empty([2], { device: 'gpu' }), 'ERR_DEVICE');
  });
});

describe('Tensor on cpu', () => {
  test('round trips every dtype', async () => {
    const cases: Array<[ArrayBufferView, string]> = [
      [new Float32Array([1.5, -2, 3.25, 1e-3]), 'f32'],
      [new Uint16Array([0x3c00, 0xc000, 0x7bff, 0x0001]), 'f16'],
      [new Uint16Array([0x3f80, 0xbf80, 0x4049, 0x0001]), 'bf16'],
      [new Int32Array([-1, 2, 2147483647, -2147483648]), 'i32'],
      [new Uint32Array([0, 1, 4294967295, 7]), 'u32'],
      [new Int8Array([-128, 127, 0, 5]), 'i8'],
      [new Uint8Array([0, 255, 3, 4]), 'u8'],
    ];
    for (const [data, dtype] of cases) {
      const t = Tensor.from(data, [2, 2], { dtype: dtype as never });
      expect(t.dtype).toBe(dtype);
      expect(t.shape).toEqual([2, 2]);
      expect(t.device).toBe('cpu');
      const back = await t.toArray();
      expect(ArrayBuffer.isView(back)).toBe(true);
      expect(Array.from(back as ArrayLike<number>)).toEqual(Array.from(data as unknown as ArrayLike<number>));
      t.dispose();
    }
  });

  test('Float32Array converts to f16 and bf16 with round-to-nearest-even', async () => {
    const values = new Float32Array([1, 0.1, -65504, 70000, 1e-7, 3.14159]);
    const h = Tensor.from(values, [6], { dtype: 'f16' });
    expect(Array.from((await h.toArray()) as Uint16Array)).toEqual(Array.from(float32ToF16Bits(values)));
    const b = Tensor.from(values, [6], { dtype: 'bf16' });
    expect(Array.from((await b.toArray()) as Uint16Array)).toEqual(Array.from(float32ToBf16Bits(values)));
    const f = await h.toFloat32();
    expect(f[0]).toBe(1);
    expect(f[3]).toBe(Infinity);
  });

  test('copy, views and writes are ordered', async () => {
    const r = rng(7);
    const src = Tensor.from(randn(64, r), [8, 8]);
    const dst = Tensor.empty([8, 8]);
    ops.copy(dst, src);
    const row = dst.view(8, [8]);
    row.write(new Float32Array(8).fill(42));
    const all = (await dst.toArray()) as Float32Array;
    const want = (await src.toArray()) as Float32Array;
    for (let i = 0; i < 64; i++) expect(all[i]).toBe(i >= 8 && i < 16 ? 42 : want[i]);
    await synchronize('cpu');
  });

  test('a read takes the contents as of the call, not those of ops queued after it', async () => {
    const src = Tensor.from(new Float32Array(1 << 16).fill(1), [1 << 16]);
    const t = Tensor.from(new Float32Array(1 << 16).fill(2), [1 << 16]);
    const first = t.toArray();
    for (let i = 0; i < 8; i++) ops.copy(t, src);  // queued after the read: not in it
    const later = t.toArray();
    expect(((await first) as Float32Array).every((v) => v === 2)).toBe(true);
    expect(((await later) as Float32Array).every((v) => v === 1)).toBe(true);
  });

  test('a move to another device takes the contents as of the call, not those of ops queued after it', async () => {
    const src = Tensor.from(new Float32Array(1 << 16).fill(1), [1 << 16]);
    const t = Tensor.from(new Float32Array(1 << 16).fill(2), [1 << 16]);
    const first = t.to('cpu');
    for (let i = 0; i < 8; i++) ops.copy(t, src);  // queued after the move: not in it
    const later = t.to('cpu');
    expect(((await (await first).toArray()) as Float32Array).every((v) => v === 2)).toBe(true);
    expect(((await (await later).toArray()) as Float32Array).every((v) => v === 1)).toBe(true);
  });

  test('dispose is idempotent and a disposed tensor is refused', async () => {
    const t = Tensor.from(new Float32Array(4), [4]);
    const u = Tensor.empty([4]);
    t.dispose();
    t.dispose();
    expect(t.disposed).toBe(true);
    expectCode(() => ops.copy(u, t), 'ERR_DISPOSED');
    await expectReject(t.toArray(), 'ERR_DISPOSED');
    const v = Tensor.empty([1]);
    v[Symbol.dispose]();
    expect(v.disposed).toBe(true);
  });
});

describe('readback on cpu', () => {
  test('reads a tensor as of the call, like toArray', async () => {
    const t = Tensor.from(new Float32Array([1, 2, 3]), [3]);
    const early = t.readback();
    ops.copy(t, Tensor.from(new Float32Array([4, 5, 6]), [3]));
    expect(Array.from((await early) as Float32Array)).toEqual([1, 2, 3]);
    expect(Array.from((await t.readback()) as Float32Array)).toEqual([4, 5, 6]);
  });
});

describe('bad input gets a coded error', () => {
  test('TypedArray too short or long', () => {
    expectCode(() => Tensor.from(new Float32Array(5), [2, 3]), 'ERR_SHAPE');
    expectCode(() => Tensor.from(new Float32Array(7), [2, 3]), 'ERR_SHAPE');
  });
  test('wrong dtype for the data', () => {
    expectCode(() => Tensor.from(new Int32Array(4), [4], { dtype: 'f16' }), 'ERR_DTYPE');
    expectCode(() => Tensor.from(new Float32Array(4), [4], { dtype: 'f64' as never }), 'ERR_DTYPE');
  });
  test('shape mismatch in an op', () => {
    expectCode(() => ops.copy(Tensor.empty([3]), Tensor.empty([4])), 'ERR_SHAPE');
  });
  test('dtype mismatch in an op', () => {
    expectCode(() => ops.copy(Tensor.empty([4], { dtype: 'f16' }), Tensor.empty([4])), 'ERR_DTYPE');
  });
  test('detached buffer', () => {
    const a = new Float32Array(4);
    structuredClone(a.buffer, { transfer: [a.buffer] });
    expectCode(() => Tensor.from(a, [4]), 'ERR_ARG');
    const t = Tensor.empty([4]);
    expectCode(() => t.write(a), 'ERR_ARG');
  });
  test('not a typed array / not a tensor', () => {
    expectCode(() => Tensor.from([1, 2] as never, [2]), 'ERR_ARG');
    expectCode(() => native().ops.copy({}, {}), 'ERR_ARG');
    expectCode(() => Tensor.empty([-1]), 'ERR_SHAPE');
  });
  test('an allocation larger than any memory', () => {
    expectCode(() => Tensor.empty([1 << 30, 1 << 30]), 'ERR_OUT_OF_MEMORY');
  });
  test('unknown device string', () => {
    expectCode(() => Tensor.empty([1], { device: 'metal' }), 'ERR_DEVICE');
  });
});

describeGpu('Tensor on cuda', () => {
  test('moves between cpu and cuda in order', async () => {
    const r = rng(Date.now() >>> 0);
    const host = randn(1000, r);
    const g = Tensor.from(host, [10, 100], { device: 'cuda' });
    expect(g.device).toBe('cuda:0');
    const g2 = Tensor.empty([10, 100], { device: 'cuda' });
    ops.copy(g2, g);
    const back = await g2.to('cpu');
    expect(Array.from((await back.toArray()) as Float32Array)).toEqual(Array.from(host));
    const h16 = Tensor.from(host, [1000], { dtype: 'f16', device: 'cuda:0' });
    const f = await h16.toFloat32();
    const want = f16BitsToFloat32(float32ToF16Bits(host));
    expect(Array.from(f)).toEqual(Array.from(want));
    g.dispose();
    g2.dispose();
  });

  test('a tensor on another device is refused', () => {
    expectCode(() => ops.copy(Tensor.empty([4], { device: 'cuda' }), Tensor.empty([4])), 'ERR_DEVICE');
  });

  test('an allocation larger than the device is ERR_OUT_OF_MEMORY and the pool still works', async () => {
    const total = devices().find((d) => d.id === 'cuda:0')!.totalMemory!;
    expectCode(() => Tensor.empty([Math.ceil(total / 4) + 1024], { device: 'cuda' }), 'ERR_OUT_OF_MEMORY');
    const t = Tensor.from(new Float32Array([1, 2, 3]), [3], { device: 'cuda' });
    expect(Array.from((await t.toArray()) as Float32Array)).toEqual([1, 2, 3]);
  });

  test('graph capture replays copies', async () => {
    const a = Tensor.from(new Float32Array([1, 2, 3, 4]), [4], { device: 'cuda' });
    const b = Tensor.empty([4], { device: 'cuda' });
    native().captureBegin('cuda:0');
    ops.copy(b, a);
    const g = native().captureEnd('cuda:0');
    a.write(new Float32Array([5, 6, 7, 8]));
    g.replay();
    expect(Array.from((await b.toArray()) as Float32Array)).toEqual([5, 6, 7, 8]);
    g.dispose();
  });
  test('readback reads a tensor as of the call; later work neither changes nor waits for it', async () => {
    const r = rng(Date.now() >>> 0);
    const first = randn(4096, r), second = randn(4096, r);
    const t = Tensor.from(first, [4096], { device: 'cuda' });
    const src = Tensor.from(second, [4096], { device: 'cuda' });
    const early = t.readback();
    for (let i = 0; i < 50; i++) ops.copy(t, src);  // queued after the read
    expect(Array.from((await early) as Float32Array)).toEqual(Array.from(first));
    expect(Array.from((await t.readback()) as Float32Array)).toEqual(Array.from(second));
    // Reads of many sizes reuse the pinned staging buffers.
    for (const n of [1, 3, 1000, 65536]) {
      const x = randn(n, r);
      const g = Tensor.from(x, [n], { device: 'cuda' });
      expect(Array.from((await g.readback()) as Float32Array)).toEqual(Array.from(x));
      g.dispose();
    }
    // Too large for a readback, and during a capture: coded errors.
    const big = Tensor.empty([(1 << 18) + 1], { device: 'cuda' });
    await expect(async () => big.readback()).rejects.toMatchObject({ code: 'ERR_ARG' });
    native().captureBegin('cuda:0');
    let err: unknown;
    try {
      await t.readback();
    } catch (e) {
      err = e;
    } finally {
      native().captureEnd('cuda:0').dispose();
    }
    expect((err as { code?: string }).code).toBe('ERR_STATE');
    [t, src, big].forEach((x) => x.dispose());
  });
});
