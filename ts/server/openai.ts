/**
 * The OpenAI-compatible request bodies (/v1/completions, /v1/chat/completions): validated
 * into plain sampling plans, and the response and stream-chunk objects built from results.
 * No I/O here: server.ts feeds bodies in and writes what comes out.
 *
 * What is supported: prompt as a string, strings, token ids or lists of token ids; chat
 * messages with string or text-part content; max_tokens / max_completion_tokens, temperature,
 * top_p, top_k (an extension), seed, stop, n, stream with stream_options.include_usage.
 * What is not (each refused with a 400 naming the field, never silently ignored):
 * logprobs, echo, suffix, best_of > n, non-zero presence/frequency penalties, logit_bias,
 * tools, non-text response formats and content parts.
 */
import { randomBytes } from 'crypto';
import { isSqueezeError } from '../errors';
import type { ChatMessage } from '../model/tokenizer';
import type { FinishReason } from '../runtime/scheduler';

/** An error with the HTTP status and the OpenAI error object it is reported as. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type = 'invalid_request_error',
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

/** The OpenAI error body for any error: ApiError as built, SqueezeError by its code. */
export function errorBody(e: unknown): { status: number; body: { error: { message: string; type: string; param: string | null; code: string | null } } } {
  const err = e as { name?: string; code?: unknown; message?: unknown; status?: number; type?: string; param?: string | null };
  const message = typeof err?.message === 'string' ? err.message : String(e);
  if (err?.name === 'ApiError')
    return { status: err.status!, body: { error: { message, type: err.type!, param: err.param ?? null, code: (err.code as string | null) ?? null } } };
  const code = isSqueezeError(e) ? e.code : 'ERR_INTERNAL';
  const map: Record<string, [number, string, string | null]> = {
    ERR_ARG: [400, 'invalid_request_error', null],
    ERR_UNSUPPORTED: [400, 'invalid_request_error', 'unsupported'],
    ERR_CONTEXT_LENGTH: [400, 'invalid_request_error', 'context_length_exceeded'],
    ERR_FORMAT: [400, 'invalid_request_error', 'invalid_format'],
    ERR_STATE: [409, 'invalid_request_error', 'conflict'],
    ERR_DISPOSED: [503, 'server_error', 'model_unavailable'],
    ERR_OUT_OF_MEMORY: [503, 'server_error', 'out_of_memory'],
  };
  const [status, type, oaCode] = map[code] ?? [500, 'server_error', null];
  return { status, body: { error: { message, type, param: null, code: oaCode ?? code } } };
}

/** Sampling settings shared by both endpoints (one plan per HTTP request). */
export interface SamplingPlan {
  /** undefined: the endpoint's default (completions 16, chat: the rest of the context). */
  maxTokens?: number;
  temperature: number;
  topP: number;
  topK: number;
  seed?: number;
  stop: string[];
  n: number;
  stream: boolean;
  includeUsage: boolean;
  model?: string;
}

export type PromptInput = { text: string } | { ids: number[] };

export interface CompletionPlan extends SamplingPlan {
  prompts: PromptInput[];
}

export interface ChatPlan extends SamplingPlan {
  messages: ChatMessage[];
}

/** Most choices one request may ask for (prompts x n). */
export const MAX_CHOICES = 64;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function bad(param: string, message: string): ApiError {
  return new ApiError(400, message, 'invalid_request_error', param);
}

function optNumber(b: Record<string, unknown>, name: string, lo: number, hi: number, integer = false): number | undefined {
  const v = b[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw bad(name, `'${name}' must be a number`);
  if (integer && !Number.isInteger(v)) throw bad(name, `'${name}' must be an integer`);
  if (v < lo || v > hi) throw bad(name, `'${name}' must be between ${lo} and ${hi}, got ${v}`);
  return v;
}

/** Fields we do not implement: absent, null or their neutral value, else a 400 naming them. */
function refuseUnsupported(b: Record<string, unknown>, chat: boolean): void {
  const neutral = (name: string, ok: (v: unknown) => boolean, what: string) => {
    const v = b[name];
    if (v !== undefined && v !== null && !ok(v)) throw bad(name, `'${name}' is not supported (${what})`);
  };
  neutral('presence_penalty', (v) => v === 0, 'only 0');
  neutral('frequency_penalty', (v) => v === 0, 'only 0');
  neutral('logit_bias', (v) => isObject(v) && Object.keys(v).length === 0, 'only an empty object');
  neutral('logprobs', (v) => v === false || v === 0, 'no log probabilities are computed');
  neutral('top_logprobs', (v) => v === 0, 'no log probabilities are computed');
  if (chat) {
    neutral('tools', (v) => Array.isArray(v) && v.length === 0, 'no tool calls');
    neutral('functions', (v) => Array.isArray(v) && v.length === 0, 'no tool calls');
    neutral('tool_choice', (v) => v === 'none', "only 'none'");
    neutral('response_format', (v) => isObject(v) && v.type === 'text', "only { type: 'text' }");
  } else {
    neutral('echo', (v) => v === false, 'the prompt is not echoed');
    neutral('suffix', (v) => v === '', 'no insertion');
  }
}

function samplingPlan(b: Record<string, unknown>, chat: boolean): SamplingPlan {
  refuseUnsupported(b, chat);
  if (b.model !== undefined && typeof b.model !== 'string') throw bad('model', "'model' must be a string");
  let maxTokens = optNumber(b, 'max_tokens', 1, Number.MAX_SAFE_INTEGER, true);
  if (chat) {
    const mct = optNumber(b, 'max_completion_tokens', 1, Number.MAX_SAFE_INTEGER, true);
    if (mct !== undefined) {
      if (maxTokens !== undefined && maxTokens !== mct) throw bad('max_completion_tokens', "'max_tokens' and 'max_completion_tokens' differ");
      maxTokens = mct;
    }
  }
  const n = optNumber(b, 'n', 1, MAX_CHOICES, true) ?? 1;
  const bestOf = optNumber(b, 'best_of', 1, MAX_CHOICES, true);
  if (!chat && bestOf !== undefined && bestOf !== n) throw bad('best_of', "'best_of' is not supported (only equal to 'n')");
  let stop: string[] = [];
  if (b.stop !== undefined && b.stop !== null) {
    const s = b.stop;
    if (typeof s === 'string') stop = s.length ? [s] : [];
    else if (Array.isArray(s) && s.every((x) => typeof x === 'string')) stop = (s as string[]).filter((x) => x.length > 0);
    else throw bad('stop', "'stop' must be a string or an array of strings");
    if (stop.length > 16) throw bad('stop', "'stop' takes at most 16 strings");
  }
  if (b.stream !== undefined && b.stream !== null && typeof b.stream !== 'boolean') throw bad('stream', "'stream' must be a boolean");
  const stream = b.stream === true;
  let includeUsage = false;
  if (b.stream_options !== undefined && b.stream_options !== null) {
    if (!stream) throw bad('stream_options', "'stream_options' is only allowed with 'stream': true");
    if (!isObject(b.stream_options)) throw bad('stream_options', "'stream_options' must be an object");
    const iu = b.stream_options.include_usage;
    if (iu !== undefined && typeof iu !== 'boolean') throw bad('stream_options.include_usage', "'include_usage' must be a boolean");
    includeUsage = iu === true;
  }
  const seed = b.seed === undefined || b.seed === null ? undefined : b.seed;
  if (seed !== undefined && (typeof seed !== 'number' || !Number.isSafeInteger(seed))) throw bad('seed', "'seed' must be an integer");
  if (b.user !== undefined && b.user !== null && typeof b.user !== 'string') throw bad('user', "'user' must be a string");
  return {
    maxTokens,
    temperature: optNumber(b, 'temperature', 0, 2) ?? 1,
    topP: optNumber(b, 'top_p', 0, 1) ?? 1,
    topK: Math.max(0, optNumber(b, 'top_k', -1, Number.MAX_SAFE_INTEGER, true) ?? 0),  // -1 (vLLM's 'off') and 0: no cut
    seed: seed as number | undefined,
    stop,
    n,
    stream,
    includeUsage,
    model: b.model as string | undefined,
  };
}

function isTokenList(v: unknown): v is number[] {
  return Array.isArray(v) && v.length > 0 && v.every((x) => typeof x === 'number');
}

/** A /v1/completions body. */
export function parseCompletion(body: unknown): CompletionPlan {
  if (!isObject(body)) throw bad('', 'the request body must be a JSON object');
  const plan = samplingPlan(body, false);
  const p = body.prompt;
  let prompts: PromptInput[];
  if (typeof p === 'string') prompts = [{ text: p }];
  else if (isTokenList(p)) prompts = [{ ids: p }];
  else if (Array.isArray(p) && p.length > 0 && p.every((x) => typeof x === 'string')) prompts = (p as string[]).map((text) => ({ text }));
  else if (Array.isArray(p) && p.length > 0 && p.every(isTokenList)) prompts = (p as number[][]).map((ids) => ({ ids }));
  else if (p === undefined || p === null) throw bad('prompt', "'prompt' is required");
  else throw bad('prompt', "'prompt' must be a string, an array of strings, an array of token ids or an array of such arrays (none empty)");
  for (const q of prompts) {
    if ('text' in q && q.text.length === 0) throw bad('prompt', "'prompt' must not be empty");
    if ('ids' in q && !q.ids.every((x) => Number.isInteger(x))) throw bad('prompt', 'token ids must be integers');
  }
  if (prompts.length * plan.n > MAX_CHOICES) throw bad('n', `at most ${MAX_CHOICES} choices per request (prompts x n)`);
  return { ...plan, prompts };
}

/** Text of a message's content: a string, or text parts (other part types are refused). */
function contentText(c: unknown, i: number, role: string): string {
  if (typeof c === 'string') return c;
  if ((c === null || c === undefined) && role === 'assistant') return '';
  if (Array.isArray(c)) {
    return c
      .map((part, j) => {
        if (!isObject(part) || part.type !== 'text' || typeof part.text !== 'string')
          throw bad(`messages[${i}].content[${j}]`, 'only text content parts are supported');
        return part.text;
      })
      .join('');
  }
  throw bad(`messages[${i}].content`, "a message's content must be a string or an array of text parts");
}

const ROLES = new Set(['system', 'developer', 'user', 'assistant', 'tool']);

/** A /v1/chat/completions body. */
export function parseChat(body: unknown): ChatPlan {
  if (!isObject(body)) throw bad('', 'the request body must be a JSON object');
  const plan = samplingPlan(body, true);
  const m = body.messages;
  if (!Array.isArray(m) || m.length === 0) throw bad('messages', "'messages' must be a non-empty array");
  const messages: ChatMessage[] = m.map((x, i) => {
    if (!isObject(x) || typeof x.role !== 'string') throw bad(`messages[${i}]`, 'each message needs a string role');
    if (!ROLES.has(x.role)) throw bad(`messages[${i}].role`, `unknown role '${x.role}' (system, developer, user, assistant, tool)`);
    // 'developer' is OpenAI's newer name for 'system'; chat templates know 'system'.
    const role = x.role === 'developer' ? 'system' : x.role;
    return { role, content: contentText(x.content, i, x.role) };
  });
  if (plan.n > MAX_CHOICES) throw bad('n', `at most ${MAX_CHOICES} choices per request`);
  return { ...plan, messages };
}

/** OpenAI's finish_reason for ours ('eos' and stop strings are both 'stop'). */
export function finishReason(r: FinishReason | undefined): 'stop' | 'length' | null {
  if (r === 'length') return 'length';
  if (r === 'eos' || r === 'stop') return 'stop';
  return null;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export function usage(prompt: number, completion: number): Usage {
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

/** Response ids: a prefix and 24 random hex digits. */
export function responseId(prefix: 'cmpl' | 'chatcmpl'): string {
  return `${prefix}-${randomBytes(12).toString('hex')}`;
}

/**
 * The number of tokens to generate for a prompt of `promptTokens` within `context`: the request's
 * max_tokens (a 400 where prompt + max_tokens exceed the context, as the OpenAI API answers), or the
 * endpoint's default cut to what the context leaves.
 */
export function tokenBudget(promptTokens: number, requested: number | undefined, fallback: number, context: number): number {
  if (promptTokens >= context)
    throw new ApiError(400, `This model's maximum context length is ${context} tokens; the prompt has ${promptTokens} and leaves no room to generate`,
      'invalid_request_error', 'prompt', 'context_length_exceeded');
  if (requested !== undefined) {
    if (promptTokens + requested > context)
      throw new ApiError(400, `This model's maximum context length is ${context} tokens; you requested ${promptTokens + requested} ` +
        `(${promptTokens} in the prompt, ${requested} to generate)`, 'invalid_request_error', 'max_tokens', 'context_length_exceeded');
    return requested;
  }
  return Math.min(fallback, context - promptTokens);
}

