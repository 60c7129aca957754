/**
 * The benchmark suites `npm run bench` knows, by name. A suite is an async function from a
 * BenchContext to result rows. To add one, add a line here; suites whose module does not
 * exist yet are skipped with a note, so this list may name work in progress.
 */
import { BenchContext, BenchResult } from './harness';

export type Suite = (ctx: BenchContext) => Promise<BenchResult[]>;

/** Loads `name` from `./module` if both exist. */
function optional(module: string, name: string): () => Suite | undefined {
  return () => {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const m = require(module) as Record<string, unknown>;
      return typeof m[name] === 'function' ? (m[name] as Suite) : undefined;
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === 'MODULE_NOT_FOUND' && String((e as Error).message).includes(module.replace('./', ''))) return undefined;
      throw e;
    }
  };
}

/** Suites in the order they run; `gpu` ones are skipped (with a note) where no GPU is usable. */
/** `manual` suites (tuning sweeps) run only when named with --only. */
export const suites: Record<string, { load: () => Suite | undefined; gpu: boolean; manual?: boolean }> = {
  api: { load: optional('./gemv', 'benchApi'), gpu: false },
  gemv: { load: optional('./gemv', 'benchGemv'), gpu: true },
  'gemv-tune': { load: optional('./gemv', 'benchGemvTune'), gpu: true, manual: true },
  lut: { load: optional('./lut', 'benchLut'), gpu: true },
  attention: { load: optional('./attention', 'benchAttention'), gpu: true },
  kvquant: { load: optional('./kvquant', 'benchKvquant'), gpu: true },
  lora: { load: optional('./lora', 'benchLora'), gpu: true },
  squeezed: { load: optional('./squeezed', 'benchSqueezed'), gpu: true },
  // Manual: a 7B-shaped model and four adapters written to disk.
  'decode-lora': { load: optional('./lora', 'benchDecodeLora'), gpu: true, manual: true },
  decode: { load: optional('./decode', 'benchDecode'), gpu: true },
  // Manual: quantizing two 7B-shaped models takes minutes.
  'decode-gqa': { load: optional('./decode', 'benchDecodeGqa'), gpu: true, manual: true },
  decodeq: { load: optional('./decode-quant', 'benchDecodeQuant'), gpu: true, manual: true },
  scale: { load: optional('./scale', 'benchScale'), gpu: true, manual: true },
};
