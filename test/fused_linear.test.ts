/**
 * fusedLinear: the CPU op against the plain ops it replaces (rmsNorm, matmul, add, siluMul),
 * then the CUDA fused GEMVs against the CPU op on fresh random inputs with poisoned outputs.
 */
import { Tensor, DType } from '../ts/tensor';
import { add, fusedLinear, FusedEpilogue, matmul, rmsNorm, siluMul } from '../ts/ops';
import { isSqueezeError } from '../ts/errors';
import { describeGpu, freshSeed, randn, relErr, rng } from './gpu';

function rand(shape: number[], r: () => number, dtype: DType = 'f32', scale = 1): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const t = Tensor.from(randn(n, r, scale), shape, { dtype });
  return t;
}

async function onto(t: Tensor | undefined, device: string): Promise<Tensor | undefined> {
  return t && device !== 'cpu' ? t.to(device) : t;
}

function expectCode(f: () => unknown, code: string): void {
  try {
    f();
  } catch (e) {
    if (!isSqueezeError(e)) throw e;
    expect((e as { code: string }).code).toBe(code);
    return;
  }
  throw new Error(`expected ${code}`);
}

describe('fusedLinear (cpu)', () => {
  test.each(['store', 'residual', 'siluPairs'] as FusedEpilogue[])('%s equals the plain ops', async (epilogue) => {
    const r = rng(7);
    const [M, K, N] = [3, 40, 10];
    const x = rand([M, K], r), w = rand([N, K], r, 'f32', 0.2), g = rand([K], r), b = rand([N], r);
    const y0 = rand([M, epilogue === 'siluPairs' ? N / 2 : N], r);
    // plain: h = rmsNorm(x, g); z = h·wᵀ + b; then the epilogue
    const h = Tensor.empty([M, K]), z = Tensor.empty([M, N]);
    rmsNorm(h, x, g, 1e-5);
    matmul(z, h, w, b);
    let want: Tensor;
    if (epilogue === 'store') want = z;
    else if (epilogue === 'residual') {
      want = Tensor.empty([M, N]);
      add(want, y0, z);
    } else {
      want = Tensor.empty([M, N / 2]);
      siluMul(want, z);
    }
    const y = Tensor.from(await y0.toFloat32(), y0.shape);
    fusedLinear(y, x, w, { bias: b, normWeight: g, eps: 1e-5, epilogue });
    expect(relErr(await y.toFloat32(), await want.toFloat32())).toBeLessThan(1e-5);
  });

  test('bad input is a coded error', () => {
    const x = Tensor.empty([2, 8]), w = Tensor.empty([6, 8]), y = Tensor.empty([2, 6]);
    expectCode(() => fusedLinear(Tensor.empty([2, 5]), x, w), 'ERR_SHAPE');
    expectCode(() => fusedLinear(y, x, Tensor.empty([6, 7])), 'ERR_SHAPE');
    expectCode(() => fusedLinear(y, x, w, { epilogue: 'siluPairs' }), 'ERR_SHAPE');  // y must be [2, 3]
    expectCode(() => fusedLinear(Tensor.empty([2, 2]), x, Tensor.empty([5, 8]), { epilogue: 'siluPairs' }), 'ERR_SHAPE');
    expectCode(() => fusedLinear(y, x, w, { normWeight: Tensor.empty([7]) }), 'ERR_SHAPE');
    expectCode(() => fusedLinear(y, x, w, { eps: -1 }), 'ERR_ARG');
    expectCode(() => fusedLinear(y, x, w, { epilogue: 'nope' as FusedEpilogue }), 'ERR_ARG');
    const both = Tensor.empty([8, 8]);
    expectCode(() => fusedLinear(both, both, Tensor.empty([8, 8])), 'ERR_ARG');
  });
});

describeGpu('fusedLinear (cuda vs cpu)', () => {
  // [M, N, K]: both GEMV kernels (FMA at M <= 2, tensor cores above), K with 16-byte tails,
  // K not a multiple of 8 (the scalar path), odd N for store/residual.
  const shapes: Array<[number, number, number]> = [
    [1, 250, 4096], [2, 66, 1032], [1, 34, 1000], [5, 98, 4104], [9, 66, 520], [16, 40, 72],
    // the other launch shapes of 1-2 rows: wide N at short K, very long K, very wide N
    [1, 8194, 264], [2, 66, 16392], [2, 16386, 72],
  ];
  // The decoder's three uses: norm + store (q|k|v), residual (o, down), norm + silu pairs (gate|up).
  const uses: Array<[FusedEpilogue, boolean]> = [['store', true], ['residual', false], ['siluPairs', true]];
  for (const dt of ['f16', 'bf16'] as const)
    for (const [M, N, K] of shapes)
      for (const [epilogue, norm] of uses) {
          const Nn = epilogue !== 'siluPairs' ? N + (M % 2) : N;  // odd N where allowed
          test(`${dt} ${epilogue}${norm ? ' + norm' : ''}: M=${M} N=${Nn} K=${K}`, async () => {
            const seed = freshSeed();
            const r = rng(seed);
            const x = rand([M, K], r, dt), w = rand([Nn, K], r, dt, 0.05);
            const g = norm ? rand([K], r, dt) : undefined;
            const b = M % 3 === 0 ? rand([Nn], r, dt) : undefined;
            const yShape = [M, epilogue === 'siluPairs' ? Nn / 2 : Nn];
            const init = epilogue === 'residual' ? randn(yShape[0] * yShape[1], r) : new Float32Array(yShape[0] * yShape[1]).fill(NaN);
            const yc = Tensor.from(init, yShape, { dtype: 'f32' });
            fusedLinear(yc, x, w, { bias: b, normWeight: g, eps: 1e-5, epilogue });
            const y = await Tensor.from(init, yShape, { dtype: dt }).to('cuda');
            fusedLinear(y, (await onto(x, 'cuda'))!, (await onto(w, 'cuda'))!, {
              bias: await onto(b, 'cuda'), normWeight: await onto(g, 'cuda'), eps: 1e-5, epilogue,
            });
            const e = relErr(await y.toFloat32(), await yc.toFloat32());
            if (!(e <= (dt === 'f16' ? 2e-3 : 1e-2))) throw new Error(`rel err ${e} (seed ${seed})`);
          });
        }

  test('more than 16 rows is ERR_UNSUPPORTED on CUDA', async () => {
    const x = Tensor.empty([17, 8], { dtype: 'f16', device: 'cuda' }), w = Tensor.empty([4, 8], { dtype: 'f16', device: 'cuda' });
    expectCode(() => fusedLinear(Tensor.empty([17, 4], { dtype: 'f16', device: 'cuda' }), x, w), 'ERR_UNSUPPORTED');
  });
});
