/** Typed op wrappers: each checks its arguments, then queues native work on the device. */
export * from './basic';
export * from './elementwise';
export * from './gemm';
export * from './lut';
export * from './kvquant';
export * from './attention';
export * from './fused';
export * from './lora';
export * from './squeezed';
