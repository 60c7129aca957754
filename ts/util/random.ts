// Math.imul bound once: inside a vm context (a test runner's sandbox) every lookup of the global
// `Math` goes through the context's interceptor, which made each draw ~100x slower.
const imul = Math.imul;

/** A small seeded generator of uniform numbers in [0, 1) (mulberry32): the same sequence for the same seed. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = imul(t ^ (t >>> 15), t | 1);
    t ^= t + imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
