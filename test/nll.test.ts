/**
 * The host NLL op (native.ops.tokenNll, csrc/cpu/nll.cc) that perplexity and the KV calibration's
 * loss measurements use: against the TypeScript reference tokenNll/windowNll on fresh random
 * logits, against closed forms, and its errors.
 */
import { isSqueezeError } from '../ts/errors';
import { tokenNll, tokenNllRows, windowNll, windowNllNative } from '../ts/runtime/ppl';

const Math = globalThis.Math;

function seeded(seed: number): () => number {
  let s = seed >>> 0;
  return () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
}
const SEED = Number(process.env.SQUEEZELM_TEST_SEED ?? Date.now() % 1e9);

async function codeOf(f: () => Promise<unknown>): Promise<string | undefined> {
  try { await f(); } catch (e) { return isSqueezeError(e) ? (e as { code: string }).code : `not a SqueezeError: ${e}`; }
  return undefined;
}

/** Relative difference (the native exp and log may differ from V8's in the last bit). */
const rel = (a: number, b: number) => Math.abs(a - b) / Math.max(1e-300, Math.abs(b));

describe(`host token NLL (seed ${SEED})`, () => {
  for (const [rows, V] of [[1, 7], [37, 4099], [300, 4096], [3, 32000]] as const) {
    test(`matches the TypeScript reference: ${rows} rows of ${V}`, async () => {
      const rnd = seeded(SEED + rows * 7919 + V);
      // a view into a larger buffer (non-zero byte offset), with wide and narrow rows alike
      const buf = new Float32Array(rows * V + 5);
      const x = buf.subarray(3, 3 + rows * V);
      for (let r = 0; r < rows; r++) {
        const scale = r % 3 === 0 ? 40 : r % 3 === 1 ? 4 : 0.01;
        for (let v = 0; v < V; v++) x[r * V + v] = (rnd() * 2 - 1) * scale;
      }
      const targets = Int32Array.from({ length: rows }, () => Math.floor(rnd() * V));
      const got = await tokenNllRows(x, V, targets);
      expect(ArrayBuffer.isView(got) && got.length).toBe(rows);
      for (let r = 0; r < rows; r++) {
        const want = tokenNll(x, r * V, V, targets[r]);
        if (!(rel(got[r], want) <= 1e-14)) throw new Error(`row ${r}: ${got[r]} vs ${want}`);
      }
    });
  }

  test('closed forms: equal logits give log V; one dominant logit gives ~0 and ~its margin', async () => {
    const V = 1000;
    const flat = new Float32Array(2 * V).fill(3.5);
    const [a, b] = await tokenNllRows(flat, V, Int32Array.from([0, 999]));
    expect(rel(a, Math.log(V))).toBeLessThan(1e-15);
    expect(rel(b, Math.log(V))).toBeLessThan(1e-15);
    const peak = new Float32Array(V).fill(-20);
    peak[5] = 30;
    const [hit] = await tokenNllRows(peak, V, Int32Array.from([5]));
    const [miss] = await tokenNllRows(peak, V, Int32Array.from([6]));
    // log(1 + 999 e^-50) and 50 + log(1 + 999 e^-50)
    expect(Math.abs(hit - Math.log1p(999 * Math.exp(-50)))).toBeLessThan(1e-15);
    expect(rel(miss, 50 + Math.log1p(999 * Math.exp(-50)))).toBeLessThan(1e-15);
  });

  test('windowNllNative is windowNll', async () => {
    const rnd = seeded(SEED + 1);
    const L = 65, V = 513;
    const logits = Float32Array.from({ length: L * V }, () => (rnd() * 2 - 1) * 8);
    const ids = Int32Array.from({ length: L }, () => Math.floor(rnd() * V));
    expect(rel(await windowNllNative(logits, ids, V), windowNll(logits, ids, V))).toBeLessThan(1e-14);
  });

  test('no rows gives an empty result', async () => {
    const r = await tokenNllRows(new Float32Array(0), 10, new Int32Array(0));
    expect(r.length).toBe(0);
  });

  test('bad input is a coded error, before any work', async () => {
    const x = new Float32Array(20);
    expect(await codeOf(() => tokenNllRows(x, 10, Int32Array.from([0, 10])))).toBe('ERR_ARG');
    expect(await codeOf(() => tokenNllRows(x, 10, Int32Array.from([-1])))).toBe('ERR_ARG');
    expect(await codeOf(() => tokenNllRows(x, 10, Int32Array.from([0, 1, 2])))).toBe('ERR_SHAPE');
    expect(await codeOf(() => tokenNllRows(x, 0, new Int32Array(0)))).toBe('ERR_ARG');
    expect(await codeOf(() => tokenNllRows(new Float64Array(20) as unknown as Float32Array, 10, Int32Array.from([0])))).toBe('ERR_ARG');
    expect(await codeOf(() => tokenNllRows(x, 10, Uint32Array.from([0]) as unknown as Int32Array))).toBe('ERR_ARG');
    await expect(tokenNllRows(x, 10, Int32Array.from([3, 12]))).rejects.toThrow(/target 12 of row 1 is outside the vocabulary/);
  });
});
