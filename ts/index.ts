/** squeezelm: the public API. */
export { SqueezeError, isSqueezeError } from './errors';
export { Tensor, DType, DTYPES, TypedArray, TensorOptions, dtypeBytes } from './tensor';
export { devices, DeviceInfo, resolveDevice, synchronize, cudaAvailable, memoryStats, emptyCache } from './device';
export * as ops from './ops';
export { loadModel, createRandomModel, describeModel, Model, Tokenizer, StreamDecoder, parseConfig, loadConfig, computeInvFreq, parameterCount, SafetensorsFile, Checkpoint, writeSafetensors } from './model';
export type { LoadOptions, ModelConfig, RopeConfig, ChatMessage, TensorEntry, WriteTensor, LoadProgress, RandomQuantizeOptions, RandomQuantizeProgress, GenerateRequest, GenerateEvent, GenerateResult, GenerationStream, FinishReason } from './model';
export type { SqueezeLinear } from './quant/squeezellm';
export { perplexity, loadPplData } from './runtime/ppl';
export type { PplResult, PplOptions } from './runtime/ppl';
