/** fp16 / bf16 bit conversions on the host (tests, loaders, tokens of output). */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function f16ToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 5.960464477539063e-8;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

export function floatToF16(v: number): number {
  f32[0] = v;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const ax = x & 0x7fffffff;
  if (ax >= 0x7f800000) return sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0);
  if (ax >= 0x477ff000) return sign | 0x7c00;
  if (ax < 0x38800000) {
    f32[0] = Math.abs(v) + 0.5;
    return sign | ((u32[0] - 0x3f000000) & 0xffff);
  }
  const odd = (ax >>> 13) & 1;
  return sign | (((ax + 0xc8000fff + odd) >>> 13) & 0xffff);
}

export function bf16ToFloat(b: number): number {
  u32[0] = b << 16;
  return f32[0];
}

export function floatToBf16(v: number): number {
  f32[0] = v;
  const x = u32[0];
  if ((x & 0x7fffffff) > 0x7f800000) return (x >>> 16) | 0x40;
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

export function f16BitsToFloat32(a: Uint16Array): Float32Array {
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = f16ToFloat(a[i]);
  return out;
}

export function bf16BitsToFloat32(a: Uint16Array): Float32Array {
  const out = new Float32Array(a.length);
  const o32 = new Uint32Array(out.buffer);
  for (let i = 0; i < a.length; i++) o32[i] = a[i] << 16;
  return out;
}

export function float32ToF16Bits(a: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = floatToF16(a[i]);
  return out;
}

export function float32ToBf16Bits(a: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = floatToBf16(a[i]);
  return out;
}
