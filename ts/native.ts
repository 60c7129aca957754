/**
 * Loads the native addon: a local build first (build/Release), then prebuilds/ through
 * node-gyp-build. SQUEEZELM_BUILD_DIR points at another build folder.
 */
import * as fs from 'fs';
import * as path from 'path';
import { SqueezeError } from './errors';

/* eslint-disable @typescript-eslint/no-explicit-any */
export interface NativeTensor {
  readonly dtype: string;
  readonly shape: number[];
  readonly device: string;
  readonly disposed: boolean;
  readonly byteLength: number;
  dispose(): void;
  toHost(): Promise<ArrayBuffer>;
  readback(): Promise<ArrayBuffer>;
  to(device: string): Promise<NativeTensor>;
  write(data: ArrayBufferView): void;
  view(offset: number, shape: number[]): NativeTensor;
}

export interface NativeGraph {
  replay(): void;
  dispose(): void;
}

export interface NativeEvent {
  record(): void;
  dispose(): void;
}

export interface NativeModule {
  setErrorClass(ctor: unknown): void;
  devices(): Array<Record<string, unknown>>;
  buildInfo(): { cuda: boolean; cudaArchs: string; cudaReason: string; napiVersion: number };
  empty(dtype: string, shape: number[], device: string): NativeTensor;
  fromBuffer(data: ArrayBufferView, dtype: string, shape: number[], device: string): NativeTensor;
  synchronize(device: string): Promise<void>;
  memoryStats(device: string): { allocated: number; cached: number; reserved: number; peak: number };
  emptyCache(device: string): void;
  captureBegin(device: string): void;
  captureEnd(device: string): NativeGraph;
  createEvent(device: string): NativeEvent;
  elapsedMs(a: NativeEvent, b: NativeEvent): number;
  ops: Record<string, (...args: any[]) => any>;
}

export function packageRoot(): string {
  let dir = __dirname;
  for (;;) {
    const pj = path.join(dir, 'package.json');
    if (fs.existsSync(pj)) {
      try {
        if (JSON.parse(fs.readFileSync(pj, 'utf8')).name === 'squeezelm') return dir;
      } catch {
        /* keep looking */
      }
    }
    const up = path.dirname(dir);
    if (up === dir) throw new SqueezeError('ERR_INTERNAL', 'cannot find the squeezelm package root');
    dir = up;
  }
}

let loaded: NativeModule | undefined;

export function native(): NativeModule {
  if (loaded) return loaded;
  const root = packageRoot();
  let mod: NativeModule;
  try {
    const dir = process.env.SQUEEZELM_BUILD_DIR;
    if (dir) mod = require(path.resolve(root, dir, 'Release', 'squeezelm.node'));
    else mod = require('node-gyp-build')(root);
  } catch (e) {
    throw new SqueezeError(
      'ERR_NATIVE',
      `the squeezelm native addon could not be loaded (${(e as Error).message}); run 'npm run build'`,
    );
  }
  mod.setErrorClass(SqueezeError);
  loaded = mod;
  return mod;
}
