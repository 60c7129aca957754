/** squeezelm: the public API. */
export { SqueezeError, isSqueezeError } from './errors';
export { Tensor, DType, DTYPES, TypedArray, TensorOptions, dtypeBytes } from './tensor';
export { devices, DeviceInfo, resolveDevice, synchronize, cudaAvailable, memoryStats, emptyCache } from './device';
export * as ops from './ops';
export { loadModel, createRandomModel, describeModel, Model, Tokenizer, StreamDecoder, parseConfig, loadConfig, computeInvFreq, parameterCount, SafetensorsFile, Checkpoint, writeSafetensors } from './model';
export type { LoadOptions, ModelConfig, RopeConfig, ChatMessage, TensorEntry, WriteTensor, LoadProgress, RandomQuantizeOptions, RandomQuantizeProgress, GenerateRequest, GenerateEvent, GenerateResult, GenerationStream, FinishReason } from './model';
export type { SqueezeLinear, QuantizeModelOptions } from './quant/squeezellm';
export { quantizeModel } from './quant/squeezellm';
export { convertCheckpoint } from './quant/convert';
export type { ConvertOptions, ConvertResult } from './quant/convert';
export { calibrateKv } from './quant/kvquant-calibrate';
export type { CalibrateKvOptions } from './quant/kvquant-calibrate';
export { loadKvqCalibration, saveKvqCalibration } from './quant/kvquant';
export type { KvqCalibration, KvqCalibrationLayer, LayerSlots } from './quant/kvquant';
export type { KvCacheOptions } from './runtime/kvq-attention';
export { perplexity, loadPplData } from './runtime/ppl';
export type { PplResult, PplOptions } from './runtime/ppl';
