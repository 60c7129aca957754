/** squeezelm: the public API. */
export { SqueezeError, isSqueezeError } from './errors';
export { Tensor, DType, DTYPES, TypedArray, TensorOptions, dtypeBytes } from './tensor';
export { devices, DeviceInfo, resolveDevice, synchronize, cudaAvailable } from './device';
export * as ops from './ops';
