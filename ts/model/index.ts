/** Model loading and the decoder's public API. */
export { loadModel, createRandomModel, describeModel, Model } from './model';
export type { LoadOptions, AdapterInfo, CachedPrefix, SqueezeOptions } from './model';
export { parseConfig, loadConfig, computeInvFreq, parameterCount } from './config';
export type { ModelConfig, RopeConfig } from './config';
export { Tokenizer, StreamDecoder } from './tokenizer';
export type { ChatMessage } from './tokenizer';
export { SafetensorsFile, Checkpoint, writeSafetensors } from './safetensors';
export type { TensorEntry, WriteTensor } from './safetensors';
export type { LoadProgress, RandomQuantizeOptions, RandomQuantizeProgress } from './weights';
export type { GenerateRequest, GenerateEvent, GenerateResult, GenerationStream, FinishReason } from '../runtime/scheduler';
