export { createServer, SqueezeServer } from './server';
export type { ServerOptions, ListenInfo } from './server';
export { ApiError, parseChat, parseCompletion } from './openai';
