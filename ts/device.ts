/** Devices: what exists, and how device strings are read. */
import { SqueezeError } from './errors';
import { native } from './native';

export interface DeviceInfo {
  id: string;
  type: 'cpu' | 'cuda';
  name: string;
  threads?: number;
  totalMemory?: number;
  freeMemory?: number;
  smCount?: number;
  computeCapability?: string;
  l2Bytes?: number;
  /** Set on the cpu entry when no CUDA device can be used, saying why. */
  cudaUnavailable?: string;
}

/** Every device this process can use: cpu first, then cuda:0, cuda:1, ... */
export function devices(): DeviceInfo[] {
  const n = native();
  const list = n.devices() as unknown as DeviceInfo[];
  if (!list.some((d) => d.type === 'cuda')) list[0].cudaUnavailable = n.buildInfo().cudaReason;
  return list;
}

export function cudaAvailable(): boolean {
  return native().devices().length > 1;
}

/**
 * Normalises a device string: 'cpu', 'cuda' (= 'cuda:0'), 'cuda:N', or 'auto' (the first
 * CUDA device when one is usable, else cpu). Unknown strings are ERR_DEVICE.
 */
export function resolveDevice(device: string | undefined): string {
  const d = device ?? 'auto';
  if (typeof d !== 'string') throw new SqueezeError('ERR_DEVICE', `device must be a string, got ${typeof d}`);
  if (d === 'auto') return cudaAvailable() ? 'cuda:0' : 'cpu';
  if (d === 'cuda') return 'cuda:0';
  if (d === 'cpu' || /^cuda:\d+$/.test(d)) return d;
  throw new SqueezeError('ERR_DEVICE', `unknown device '${d}' (expected cpu, cuda, cuda:N or auto)`);
}

/** Waits until all work queued on a device has finished. */
export function synchronize(device: string): Promise<void> {
  return native().synchronize(resolveDevice(device));
}

/** Bytes of device memory held by tensors (allocated), kept for reuse after they were freed (cached), and the peak. */
export function memoryStats(device: string): { allocated: number; cached: number; reserved: number; peak: number } {
  return native().memoryStats(resolveDevice(device));
}

/**
 * Gives the device's cached blocks back to the driver once its queued work has finished (freed
 * tensors, and temporaries such as the dense weight copy of a large LUT matmul, stay cached for
 * reuse until then).
 */
export function emptyCache(device: string): void {
  native().emptyCache(resolveDevice(device));
}
