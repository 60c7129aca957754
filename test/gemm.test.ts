import { Tensor, DType } from '../ts/tensor';
import { matmul, cublasMatmul, cublasAvailable, fillRandom } from '../ts/ops';
import { isSqueezeError } from '../ts/errors';
import { native } from '../ts/native';
import { describeGpu, relErr, rng, randn, freshSeed } from './gpu';

type F = 'f32' | 'f16' | 'bf16';

/** A random tensor on `device` and the float values it actually holds (after rounding). */
async function randomTensor(shape: number[], dtype: DType, r: () => number, device = 'cpu') {
  const n = shape.reduce((a, b) => a * b, 1);
  const t = Tensor.from(randn(n, r), shape, { dtype });
  const vals = await t.toFloat32();
  return { t: device === 'cpu' ? t : await t.to(device), vals };
}

/** y = x·wᵀ + bias in fp64. */
function oracle(x: Float32Array, w: Float32Array, bias: Float32Array | undefined, M: number, N: number, K: number) {
  const y = new Float64Array(M * N);
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let s = bias ? bias[n] : 0;
      for (let k = 0; k < K; k++) s += x[m * K + k] * w[n * K + k];
      y[m * N + n] = s;
    }
  return y;
}

const tol: Record<F, number> = { f32: 1e-5, f16: 2e-3, bf16: 1e-2 };

/** An output tensor filled with NaN, so any element a kernel forgets to write shows. */
async function poisoned(shape: number[], dtype: DType, device = 'cpu'): Promise<Tensor> {
  const n = shape.reduce((a, b) => a * b, 1);
  const t = Tensor.from(new Float32Array(n).fill(NaN), shape, { dtype });
  return device === 'cpu' ? t : t.to(device);
}

/**
 * A GEMV case on CUDA with `env` forcing a kernel: fresh random x, w (and bias at odd M), poisoned
 * outputs, relative error against the CPU reference, and three runs with the same bits.
 */
async function checkForcedGemv(dt: 'f16' | 'bf16', M: number, N: number, K: number, env: Record<string, string>) {
  const seed = freshSeed();
  const r = rng(seed);
  const x = await randomTensor([M, K], dt, r, 'cuda');
  const w = await randomTensor([N, K], dt, r, 'cuda');
  const b = M % 2 === 1 ? await randomTensor([N], dt, r, 'cuda') : undefined;
  const want = await poisoned([M, N], 'f32');
  matmul(want, await x.t.to('cpu'), await w.t.to('cpu'), b ? await b.t.to('cpu') : undefined);
  Object.assign(process.env, env);
  try {
    const runs: number[][] = [];
    for (let i = 0; i < 3; i++) {
      const y = await poisoned([M, N], dt, 'cuda');
      matmul(y, x.t, w.t, b?.t);
      if (i === 0) {
        const e = relErr(await y.toFloat32(), await want.toFloat32());
        if (!(e <= (dt === 'f16' ? 2e-3 : 1e-2))) throw new Error(`rel err ${e} (seed ${seed})`);
      }
      runs.push(Array.from(await y.toArray()));
    }
    expect(runs[1]).toEqual(runs[0]);
    expect(runs[2]).toEqual(runs[0]);
  } finally {
    for (const k of Object.keys(env)) delete process.env[k];
  }
}

describe('matmul (cpu)', () => {
  const combos: Array<[F, F, F]> = [
    ['f32', 'f32', 'f32'],
    ['f32', 'f16', 'f32'],
    ['f16', 'f16', 'f16'],
    ['bf16', 'bf16', 'bf16'],
    ['f32', 'bf16', 'f16'],
  ];
  const shapes: Array<[number, number, number]> = [
    [1, 3, 4097],
    [5, 3, 4097],
    [17, 37, 129],
    [64, 3, 4097],
    [130, 70, 257],
    [2, 1, 1],
  ];
  for (const [xd, wd, yd] of combos)
    for (const [M, N, K] of shapes)
      test(`x ${xd} w ${wd} y ${yd}: M=${M} N=${N} K=${K}`, async () => {
        const seed = freshSeed();
        const r = rng(seed);
        const x = await randomTensor([M, K], xd, r);
        const w = await randomTensor([N, K], wd, r);
        const withBias = (M + N) % 2 === 0;
        const b = withBias ? await randomTensor([N], wd, r) : undefined;
        const y = await poisoned([M, N], yd);
        matmul(y, x.t, w.t, b?.t);
        const got = await y.toFloat32();
        const want = oracle(x.vals, w.vals, b?.vals, M, N, K);
        const e = relErr(got, want);
        if (!(e <= tol[yd])) throw new Error(`rel err ${e} > ${tol[yd]} (seed ${seed})`);
      });

  test('bad inputs are coded errors', () => {
    const x = Tensor.empty([2, 8]), w = Tensor.empty([4, 8]), y = Tensor.empty([2, 4]);
    const expectCode = (fn: () => void, code: string) => {
      let err: unknown;
      try { fn(); } catch (e) { err = e; }
      expect(isSqueezeError(err, code)).toBe(true);
    };
    expectCode(() => matmul(y, x, Tensor.empty([4, 7])), 'ERR_SHAPE');
    expectCode(() => matmul(Tensor.empty([2, 5]), x, w), 'ERR_SHAPE');
    expectCode(() => matmul(y, x, w, Tensor.empty([3])), 'ERR_SHAPE');
    expectCode(() => matmul(y, x, Tensor.empty([4, 8], { dtype: 'i32' })), 'ERR_DTYPE');
    // The native op checks on its own too (callers of native().ops bypass the wrapper).
    expectCode(() => native().ops.matmul(y.native, x.native, Tensor.empty([4, 8], { dtype: 'i32' }).native), 'ERR_DTYPE');
    expectCode(() => native().ops.matmul(y.native, x.native, Tensor.empty([4, 7]).native), 'ERR_SHAPE');
    expectCode(() => native().ops.matmul(Tensor.empty([3, 4]).native, x.native, w.native), 'ERR_SHAPE');
    expectCode(() => cublasMatmul(y, x, w), 'ERR_DEVICE');
    expect(typeof cublasAvailable()).toBe('boolean');
  });
});

describeGpu('matmul (cuda vs cpu)', () => {
  const shapes: Array<[number, number, number]> = [
    [1, 3, 4097],
    [5, 3, 4097],
    [17, 3, 4097],
    [64, 3, 4097],
    [1, 4096, 4096],
    [16, 1000, 1000],
    [7, 129, 8200],
    [200, 300, 1000],
    [256, 512, 4096],
    [33, 257, 72],
    [129, 131, 4097],
    // tensor-core GEMV with 2 and 4 row tiles per block (picked by N) and tails in N and K
    [4, 4229, 1000],
    [9, 8453, 1032],
    [16, 8451, 264],
    // wgmma kernel: full 128x256 tiles and tails in M, N and K (K % 64 != 0)
    [300, 520, 1000],
    [256, 384, 512],
    [130, 264, 136],
  ];
  for (const dt of ['f16', 'bf16'] as const)
    for (const [M, N, K] of shapes)
      test(`${dt}: M=${M} N=${N} K=${K}`, async () => {
        const seed = freshSeed();
        const r = rng(seed);
        const x = await randomTensor([M, K], dt, r, 'cuda');
        const w = await randomTensor([N, K], dt, r, 'cuda');
        const withBias = M % 2 === 1;
        const b = withBias ? await randomTensor([N], dt, r, 'cuda') : undefined;
        const yc = await poisoned([M, N], 'f32');
        const xc = await x.t.to('cpu'), wc = await w.t.to('cpu'), bc = b ? await b.t.to('cpu') : undefined;
        matmul(yc, xc, wc, bc);
        const y = await poisoned([M, N], dt, 'cuda');
        matmul(y, x.t, w.t, b?.t);
        const got = await y.toFloat32();
        const want = await yc.toFloat32();
        const e = relErr(got, want);
        if (!(e <= (dt === 'f16' ? 2e-3 : 1e-2))) throw new Error(`rel err ${e} (seed ${seed})`);
        // Deterministic: a second run gives the same bits.
        const y2 = await poisoned([M, N], dt, 'cuda');
        matmul(y2, x.t, w.t, b?.t);
        expect(Array.from(await y2.toArray())).toEqual(Array.from(await y.toArray()));
        if (!withBias && cublasAvailable()) {
          const yb = await poisoned([M, N], dt, 'cuda');
          cublasMatmul(yb, x.t, w.t);
          const eb = relErr(await yb.toFloat32(), want);
          if (!(eb <= (dt === 'f16' ? 2e-3 : 1e-2))) throw new Error(`cuBLAS rel err ${eb} (seed ${seed})`);
        }
      });

  // The tensor-core GEMV's persistent grid with few blocks per SM, so each block walks several
  // tiles (and K tails, partial chunks, N tails on the way).
  for (const [M, N, K] of [[5, 1000, 4104], [16, 8451, 72], [9, 4229, 1032]] as const)
    for (const [bps, nt] of [[1, 0], [2, 0], [1, 4]] as const)
      test(`f16: M=${M} N=${N} K=${K}, ${bps} block(s) per SM${nt ? `, ${nt} row tiles per block` : ''}`, async () => {
        const seed = freshSeed();
        const r = rng(seed);
        const x = await randomTensor([M, K], 'f16', r, 'cuda');
        const w = await randomTensor([N, K], 'f16', r, 'cuda');
        const want = await poisoned([M, N], 'f32');
        matmul(want, await x.t.to('cpu'), await w.t.to('cpu'));
        process.env.SQUEEZELM_GEMV_TC_BPS = String(bps);
        process.env.SQUEEZELM_GEMV_BULK_MIN_M = '0';  // the register-load GEMV, not the bulk-copy one
        process.env.SQUEEZELM_GEMV_TMA = '0';  // nor the TMA one
        if (nt) process.env.SQUEEZELM_GEMV_NT = String(nt);
        try {
          const y = await poisoned([M, N], 'f16', 'cuda');
          matmul(y, x.t, w.t);
          const e = relErr(await y.toFloat32(), await want.toFloat32());
          if (!(e <= 2e-3)) throw new Error(`rel err ${e} (seed ${seed})`);
          const y2 = await poisoned([M, N], 'f16', 'cuda');
          matmul(y2, x.t, w.t);
          expect(Array.from(await y2.toArray())).toEqual(Array.from(await y.toArray()));
        } finally {
          delete process.env.SQUEEZELM_GEMV_TC_BPS;
          delete process.env.SQUEEZELM_GEMV_BULK_MIN_M;
          delete process.env.SQUEEZELM_GEMV_TMA;
          delete process.env.SQUEEZELM_GEMV_NT;
        }
      });

  // The bulk-copy GEMV (sm_90 devices, forced here for any M and N; elsewhere these run the
  // register-load one): items of a tile
  // split between blocks (the last contributor sums the partial slots), a 2- or 3-slot ring that
  // wraps many times, 16- and 32-row items, M = 1..16, tails in N and K (K % 256 != 0), bias. Three
  // runs give the same bits: a split tile's counter must be back at 0 after each launch, or the
  // next launch leaves that tile unwritten (poisoned).
  const bulkCases: Array<[string, number, number, number, number, number, number, number?]> = [
    ['f16', 3, 77, 4104, 2, 0, 1024],
    ['f16', 16, 300, 8200, 4, 2, 1024],
    ['bf16', 9, 1000, 1032, 2, 2, 1024],
    ['f16', 1, 513, 6152, 2, 2, 2048],
    ['f16', 12, 8451, 264, 4, 3, 1024],
    ['bf16', 16, 4099, 4096, 4, 0, 1024],
    ['f16', 5, 2000, 3080, 2, 0, 2048],
    // Work split in units of 256 k (the default) against whole items; few tiles with a long K put
    // every block inside one tile: ~40 contributors to each tile's sum.
    ['f16', 7, 24, 40000, 2, 2, 1024, 256],
    ['bf16', 16, 3000, 5000, 4, 2, 1024, 1024],
    ['f16', 3, 1100, 4104, 4, 3, 1024, 512],
  ];
  for (const [dt, M, N, K, nt, slots, ks, unit] of bulkCases)
    test(`${dt}: M=${M} N=${N} K=${K}, bulk-copy GEMV, ${8 * nt}-row x ${ks}-k items, ${slots || 'all'} ring slots${unit ? `, ${unit}-k units` : ''}`, async () => {
      const env: Record<string, string> = {
        SQUEEZELM_GEMV_TMA: '0',
        SQUEEZELM_GEMV_BULK_MIN_M: '1',
        SQUEEZELM_GEMV_BULK_MIN_N: '1',
        SQUEEZELM_GEMV_BULK_NT: String(nt),
        SQUEEZELM_GEMV_BULK_KS: String(ks),
      };
      if (slots) env.SQUEEZELM_GEMV_BULK_S = String(slots);
      if (unit) env.SQUEEZELM_GEMV_BULK_UNIT = String(unit);
      await checkForcedGemv(dt as 'f16' | 'bf16', M, N, K, env);
    });

  // The TMA GEMV (sm_90 devices, forced here for any M and shape; elsewhere these run another GEMV):
  // 64- and 128-row tiles, rows past N and k past K (K % 64 != 0) zero-filled by the copies, activation
  // rows past M zero-filled, tiles split between blocks (a long K puts many blocks inside one tile:
  // the last contributor sums their slots), a 2- or 3-stage ring that wraps many times, bias. Three
  // runs give the same bits (a split tile's counter must be back at 0 after each launch).
  const tmaCases: Array<[string, number, number, number, number, number, number?]> = [
    ['f16', 1, 3, 4104, 128, 0],
    ['f16', 16, 300, 8200, 128, 2],
    ['bf16', 9, 1000, 1032, 64, 3],
    ['f16', 2, 513, 6152, 128, 0],
    ['f16', 12, 8451, 264, 64, 3],
    ['bf16', 16, 4099, 4096, 128, 6],
    ['f16', 5, 2000, 3080, 64, 2],
    ['f16', 7, 24, 40000, 128, 2],
    ['bf16', 4, 11008, 8, 128, 0],
    ['f16', 16, 700, 5000, 64, 12],
    ['bf16', 6, 4097, 2056, 64, 5, 2],
    ['f16', 13, 3001, 4104, 128, 4, 2],
    // whole-K tiles: one block per tile (bps 0 = whole), up to one wave of them
    ['f16', 16, 8200, 4104, 64, 8, 0],
    ['bf16', 5, 11008, 1032, 128, 4, 0],
    ['f16', 3, 100, 40000, 128, 3, 0],
    ['bf16', 16, 700, 5000, 64, 2, 0],
  ];
  for (const [dt, M, N, K, R, slots, bps] of tmaCases) {
    const whole = bps === 0;
    const how = whole ? ', whole-K tiles' : bps ? `, ${bps} blocks per SM` : '';
    test(`${dt}: M=${M} N=${N} K=${K}, TMA GEMV, ${R}-row tiles, ${slots || 'default'} ring stages${how}`, async () => {
      const env: Record<string, string> = {
        SQUEEZELM_GEMV_TMA: '1', SQUEEZELM_GEMV_TMA_R: String(R), SQUEEZELM_GEMV_TMA_WHOLE: whole ? '1' : '0',
      };
      if (slots) env.SQUEEZELM_GEMV_TMA_S = String(slots);
      if (bps) env.SQUEEZELM_GEMV_TMA_BPS = String(bps);
      await checkForcedGemv(dt as 'f16' | 'bf16', M, N, K, env);
    });
  }

  // Wide products take the tensor-core GEMV even at M = 1, 2 (weights filled on the device:
  // 67M host-side normals would dominate the suite's time).
  // (M = 4, 16 at N = 8200 and 11008: the whole-K TMA GEMV on sm_90a)
  for (const [M, N, K] of [[1, 8200, 8192], [2, 8200, 8192], [4, 8200, 8192], [16, 8200, 8192], [16, 11008, 4096]])
    test(`f16: M=${M} N=${N} K=${K} (wide GEMV path)`, async () => {
      const seed = freshSeed();
      const x = Tensor.empty([M, K], { dtype: 'f16', device: 'cuda' });
      const w = Tensor.empty([N, K], { dtype: 'f16', device: 'cuda' });
      fillRandom(x, seed, 0, 1);
      fillRandom(w, seed + 1, 0, 0.02);
      const y = await poisoned([M, N], 'f16', 'cuda');
      matmul(y, x, w);
      const yc = await poisoned([M, N], 'f32');
      matmul(yc, await x.to('cpu'), await w.to('cpu'));
      const e = relErr(await y.toFloat32(), await yc.toFloat32());
      if (!(e <= 2e-3)) throw new Error(`rel err ${e} (seed ${seed})`);
    });

  test('a tensor on another device or a mixed dtype is a coded error', async () => {
    const x = Tensor.empty([2, 8], { dtype: 'f16', device: 'cuda' });
    const w = Tensor.empty([4, 8], { dtype: 'f16', device: 'cuda' });
    const y = Tensor.empty([2, 4], { dtype: 'f16', device: 'cuda' });
    const wCpu = Tensor.empty([4, 8], { dtype: 'f16' });
    const codeOf = (fn: () => void) => {
      try { fn(); } catch (e) { return isSqueezeError(e) ? e.code : String(e); }
      return 'no error';
    };
    expect(codeOf(() => matmul(y, x, wCpu))).toBe('ERR_DEVICE');
    expect(codeOf(() => native().ops.matmul(y.native, x.native, wCpu.native))).toBe('ERR_DEVICE');
    expect(codeOf(() => native().ops.matmul(y.native, x.native, Tensor.empty([4, 8], { dtype: 'bf16', device: 'cuda' }).native))).toBe('ERR_DTYPE');
    expect(codeOf(() => matmul(y, Tensor.empty([2, 8], { dtype: 'f32', device: 'cuda' }), w))).toBe('ERR_DTYPE');
  });
});
