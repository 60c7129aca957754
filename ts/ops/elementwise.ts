/**
 * The decoder's small ops: embedding, RMSNorm (plain and fused with the residual add),
 * rotary embedding, SiLU-gated MLP activation, add, cast, fills, row gathers, argmax and
 * sampling. Outputs come first and are never allocated here; native code validates
 * shapes, dtypes and devices and throws coded SqueezeErrors naming the argument.
 */
import { SqueezeError } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';

function seedArg(op: string, seed: number): number {
  if (!Number.isSafeInteger(seed) || seed < 0)
    throw new SqueezeError('ERR_ARG', `${op}: seed must be a non-negative safe integer, got ${seed}`);
  return seed;
}

/** out[T,H] = table[ids[t]]; ids outside [0, V) give zero rows. */
export function embedding(out: Tensor, ids: Tensor, table: Tensor): void {
  native().ops.embedding(out.native, ids.native, table.native);
}

/** out[n,H] = x[index[i]]; indices outside [0, T) give zero rows. */
export function gatherRows(out: Tensor, x: Tensor, index: Tensor): void {
  native().ops.gatherRows(out.native, x.native, index.native);
}

/** out = x * rsqrt(mean(x^2) + eps) * weight, per row, in fp32. */
export function rmsNorm(out: Tensor, x: Tensor, weight: Tensor, eps: number): void {
  native().ops.rmsNorm(out.native, x.native, weight.native, eps);
}

/** residual += x (rounded to residual's dtype); out = rmsNorm(residual) * weight. */
export function addRmsNorm(residual: Tensor, x: Tensor, out: Tensor, weight: Tensor, eps: number): void {
  native().ops.addRmsNorm(residual.native, x.native, out.native, weight.native, eps);
}

/** Rotary embedding in place on x[T,heads,D] (rotate-half pairs i, i + D/2). */
export function rope(x: Tensor, positions: Tensor, invFreq: Tensor): void {
  native().ops.rope(x.native, positions.native, invFreq.native);
}

/** out[..., I] = silu(gateUp[..., :I]) * gateUp[..., I:]. */
export function siluMul(out: Tensor, gateUp: Tensor): void {
  native().ops.siluMul(out.native, gateUp.native);
}

/**
 * out = a + b. a has out's element count; b has it too, or is one row of out's last dimension,
 * added to every row (a bias: out[m, n] = a[m, n] + b[n]). out may alias a.
 */
export function add(out: Tensor, a: Tensor, b: Tensor): void {
  native().ops.add(out.native, a.native, b.native);
}

/** out = x converted between float dtypes (round to nearest even). */
export function cast(out: Tensor, x: Tensor): void {
  native().ops.cast(out.native, x.native);
}

/** Every element of t = value (an in-range integer for integer dtypes). */
export function fill(t: Tensor, value: number): void {
  native().ops.fill(t.native, value);
}

/** Normal values N(mean, std^2); the same seed gives the same tensor on CPU and CUDA. */
export function fillRandom(t: Tensor, seed: number, mean = 0, std = 1): void {
  native().ops.fillRandom(t.native, seedArg('fillRandom', seed), mean, std);
}

/** Uniform random bits in an integer tensor (i32, u32, i8, u8). */
export function fillRandomInt(t: Tensor, seed: number): void {
  native().ops.fillRandomInt(t.native, seedArg('fillRandomInt', seed));
}

/** out[b] = index of the largest logit of row b (ties: lowest index). */
export function argmax(out: Tensor, logits: Tensor): void {
  native().ops.argmax(out.native, logits.native);
}

/**
 * Samples one token per row: temperature (<= 0 greedy), topK (<= 0 no limit), topP
 * (>= 1 no limit); rng[b] = (seed, counter), counter incremented in place.
 */
export function sample(out: Tensor, logits: Tensor, temperature: Tensor, topK: Tensor, topP: Tensor, rng: Tensor): void {
  native().ops.sample(out.native, logits.native, temperature.native, topK.native, topP.native, rng.native);
}
