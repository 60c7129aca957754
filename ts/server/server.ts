/**
 * An OpenAI-compatible HTTP server over one loaded Model (node:http, no framework):
 *   GET  /health                 {"status":"ok", ...}
 *   GET  /v1/models              the served model and its loaded LoRA adapters
 *   POST /v1/completions         text completions (stream: server-sent events)
 *   POST /v1/chat/completions    chat through the model's chat template
 * A request's `model` may name a loaded LoRA adapter: it then runs with that adapter.
 * Every request becomes one or more model.generate() streams, so concurrent requests share
 * the continuous-batching scheduler (and its KV pages) like any other caller. A client that
 * disconnects aborts its generations at once (their pages go back); a request the model
 * refuses gets the OpenAI error object with a 4xx status and touches nothing else. The server
 * never disposes the model: its owner does, after close().
 */
import { timingSafeEqual } from 'crypto';
import * as http from 'http';
import type { AddressInfo } from 'net';
import { SqueezeError } from '../errors';
import type { Model } from '../model/model';
import type { GenerationStream } from '../runtime/scheduler';
import {
  ApiError, ChatPlan, CompletionPlan, PromptInput, SamplingPlan, Usage, errorBody, finishReason, parseChat, parseCompletion,
  responseId, tokenBudget, usage,
} from './openai';

export interface ServerOptions {
  /** The model's name in /v1/models and in requests' `model` (default 'squeezelm'). */
  modelName?: string;
  /** When set, every route but /health needs `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Largest request body accepted, bytes (default 4 MiB); larger gets 413. */
  maxBodyBytes?: number;
  /** Generations (choices) running or waiting, over all requests, beyond which a request gets 429 (default 256). */
  maxPending?: number;
  /** Completion tokens when a /v1/completions request gives no max_tokens (default 16, as OpenAI). */
  defaultMaxTokens?: number;
  /** Access-Control-Allow-Origin for browsers: true for '*', or an origin (default: no CORS headers). */
  cors?: boolean | string;
  /** One line per finished request (method, path, status, milliseconds, tokens). */
  log?: (line: string) => void;
  /**
   * Lets clients load and unload LoRA adapters (POST /v1/load_lora_adapter, /v1/unload_lora_adapter,
   * as vLLM names them) from paths on this machine. Off by default: those routes answer 403.
   */
  allowAdapterLoading?: boolean;
}

export interface ListenInfo {
  host: string;
  port: number;
  url: string;
}

type Handler = (req: http.IncomingMessage, res: http.ServerResponse) => Promise<number | void>;

/** Whether an Authorization header equals the expected bytes, in time independent of where they differ. */
function sameBytes(header: string | undefined, want: Buffer): boolean {
  const got = Buffer.from(header ?? '');
  return got.length === want.length && timingSafeEqual(got, want);
}

interface Choice {
  index: number;
  stream: GenerationStream;
  promptTokens: number;
}

export class SqueezeServer {
  readonly modelName: string;
  private readonly http: http.Server;
  private readonly o: Required<Omit<ServerOptions, 'apiKey' | 'log' | 'cors'>> & Pick<ServerOptions, 'apiKey' | 'log' | 'cors'>;
  private readonly controllers = new Set<AbortController>();
  private readonly handlers = new Set<Promise<void>>();
  private pendingChoices = 0;
  private closing = false;
  private readonly created = Math.floor(Date.now() / 1000);
  /** `Bearer <apiKey>` as bytes, compared in constant time. */
  private readonly apiKey: Buffer | undefined;
  private readonly routes: Record<string, Record<string, Handler>> = {
    '/health': {
      GET: async (_req, res) => {
        const st = this.model.stats;
        this.json(res, 200, {
          status: 'ok', model: this.modelName, pending: this.pendingChoices,
          stats: { steps: st.steps, prefills: st.prefills, prefixHits: st.prefixHits, prefixTokens: st.prefixTokens },
        });
      },
    },
    '/v1/models': { GET: async (_req, res) => this.json(res, 200, { object: 'list', data: [this.modelCard(), ...this.model.adapters.map((a) => this.modelCard(a))] }) },
    '/v1/completions': { POST: async (req, res) => this.completions(res, parseCompletion(await this.body(req))) },
    '/v1/chat/completions': { POST: async (req, res) => this.chat(res, parseChat(await this.body(req))) },
    '/v1/load_lora_adapter': { POST: async (req, res) => this.loadAdapter(res, await this.body(req)) },
    '/v1/unload_lora_adapter': { POST: async (req, res) => this.unloadAdapter(res, await this.body(req)) },
  };

  constructor(private readonly model: Model, opts: ServerOptions = {}) {
    const posInt = (v: number | undefined, name: string, d: number) => {
      if (v === undefined) return d;
      if (!Number.isInteger(v) || v < 1) throw new SqueezeError('ERR_ARG', `createServer: ${name} must be a positive integer, got ${v}`);
      return v;
    };
    this.modelName = opts.modelName ?? 'squeezelm';
    this.apiKey = opts.apiKey === undefined ? undefined : Buffer.from(`Bearer ${opts.apiKey}`);
    this.o = {
      modelName: this.modelName,
      apiKey: opts.apiKey,
      maxBodyBytes: posInt(opts.maxBodyBytes, 'maxBodyBytes', 4 << 20),
      maxPending: posInt(opts.maxPending, 'maxPending', 256),
      defaultMaxTokens: posInt(opts.defaultMaxTokens, 'defaultMaxTokens', 16),
      cors: opts.cors,
      log: opts.log,
      allowAdapterLoading: opts.allowAdapterLoading === true,
    };
    this.http = http.createServer((req, res) => {
      const p = this.handle(req, res).catch(() => undefined);
      this.handlers.add(p);
      p.finally(() => this.handlers.delete(p));
    });
    // Generations stream for as long as they take: no request timeout of Node's own.
    this.http.requestTimeout = 0;
  }

  /** Starts listening (port 0: any free port); resolves with the address. */
  listen(port = 8080, host = '127.0.0.1'): Promise<ListenInfo> {
    return new Promise((resolve, reject) => {
      const onError = (e: Error) => reject(e);
      this.http.once('error', onError);
      this.http.listen(port, host, () => {
        this.http.off('error', onError);
        const a = this.http.address() as AddressInfo;
        const h = a.family === 'IPv6' ? `[${a.address}]` : a.address;
        resolve({ host: a.address, port: a.port, url: `http://${h}:${a.port}` });
      });
    });
  }

  /** Generations running or waiting for this server's requests. */
  get pending(): number {
    return this.pendingChoices;
  }

  /**
   * Stops accepting connections, aborts the generations in flight (their streams end) and
   * resolves once every request has been answered and every connection closed.
   */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const closed = new Promise<void>((res) => this.http.close(() => res()));
    for (const c of this.controllers) c.abort();
    this.http.closeIdleConnections();
    await Promise.allSettled([...this.handlers]);
    this.http.closeAllConnections();
    await closed;
  }

  // ---- routing

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const t0 = Date.now();
    let tokens = 0;
    const path = (req.url ?? '/').split('?')[0].replace(/\/+$/, '') || '/';
    try {
      if (this.o.cors) {
        res.setHeader('Access-Control-Allow-Origin', this.o.cors === true ? '*' : this.o.cors);
        res.setHeader('Access-Control-Allow-Headers', 'Authorization, Content-Type');
        res.setHeader('Access-Control-Allow-Methods', 'GET, POST, OPTIONS');
      }
      if (req.method === 'OPTIONS') {
        res.writeHead(204).end();
        return;
      }
      if (this.closing) throw new ApiError(503, 'the server is shutting down', 'server_error', null, 'shutting_down');
      if (path !== '/health' && this.apiKey !== undefined && !sameBytes(req.headers.authorization, this.apiKey))
        throw new ApiError(401, 'missing or wrong API key (Authorization: Bearer <key>)', 'invalid_request_error', null, 'invalid_api_key');
      const m = /^\/v1\/models\/(.+)$/.exec(path);
      if (m && req.method === 'GET') {
        let id: string;
        try {
          id = decodeURIComponent(m[1]);
        } catch {
          throw new ApiError(400, `'${m[1]}' is not a valid URL component`, 'invalid_request_error', 'model');
        }
        this.json(res, 200, this.modelCard(this.adapterFor(id)));
        return;
      }
      const route = this.routes[path];
      if (!route) throw new ApiError(404, `no route ${req.method} ${path}`, 'invalid_request_error', null, 'not_found');
      const fn = route[req.method ?? ''];
      if (!fn) {
        res.setHeader('Allow', Object.keys(route).join(', '));
        throw new ApiError(405, `${req.method} is not allowed on ${path} (${Object.keys(route).join(', ')})`, 'invalid_request_error', null, 'method_not_allowed');
      }
      tokens = (await fn(req, res)) ?? 0;
    } catch (e) {
      this.fail(req, res, e);
    } finally {
      this.o.log?.(`${req.method} ${path} ${res.statusCode} ${Date.now() - t0} ms${tokens ? ` ${tokens} tokens` : ''}`);
    }
  }

  private adapterRoute(body: unknown, needPath: boolean): { name: string; path?: string } {
    if (!this.o.allowAdapterLoading)
      throw new ApiError(403, 'loading adapters at run time is off (createServer allowAdapterLoading, serve --allow-adapter-loading)',
        'invalid_request_error', null, 'adapter_loading_disabled');
    const b = body as { lora_name?: unknown; lora_path?: unknown } | null;
    if (!b || typeof b !== 'object' || typeof b.lora_name !== 'string' || !b.lora_name)
      throw new ApiError(400, "'lora_name' (a non-empty string) is required", 'invalid_request_error', 'lora_name');
    if (needPath && (typeof b.lora_path !== 'string' || !b.lora_path))
      throw new ApiError(400, "'lora_path' (a PEFT adapter folder on the server) is required", 'invalid_request_error', 'lora_path');
    if (b.lora_name === this.modelName) throw new ApiError(400, `'${b.lora_name}' is the base model's name`, 'invalid_request_error', 'lora_name');
    return { name: b.lora_name, path: b.lora_path as string | undefined };
  }

  /** POST /v1/load_lora_adapter {lora_name, lora_path}: the adapter is then served under lora_name. */
  private async loadAdapter(res: http.ServerResponse, body: unknown): Promise<void> {
    const { name, path } = this.adapterRoute(body, true);
    const info = await this.model.loadAdapter(path!, { name });
    this.json(res, 200, { ...this.modelCard(name), ranks: info.ranks });
  }

  /** POST /v1/unload_lora_adapter {lora_name}: 409 while requests use it. */
  private async unloadAdapter(res: http.ServerResponse, body: unknown): Promise<void> {
    const { name } = this.adapterRoute(body, false);
    if (!this.model.adapters.includes(name)) throw new ApiError(404, `no adapter named '${name}' is loaded`, 'invalid_request_error', 'lora_name', 'model_not_found');
    this.model.unloadAdapter(name);
    this.json(res, 200, { id: name, object: 'model', deleted: true });
  }

  /** The model card of the base model, or of a LoRA adapter served under its own name. */
  private modelCard(adapter?: string) {
    const base = { object: 'model', created: this.created, owned_by: 'squeezelm', max_model_len: this.model.maxContext };
    return adapter === undefined ? { id: this.modelName, ...base } : { id: adapter, ...base, parent: this.modelName };
  }

  /**
   * A request's `model`: absent or the served name is the base model; the name of a loaded LoRA
   * adapter selects that adapter (as vLLM serves them); anything else is a 404.
   */
  private adapterFor(requested: string | undefined): string | undefined {
    if (requested === undefined || requested === this.modelName) return undefined;
    if (this.model.adapters.includes(requested)) return requested;
    throw new ApiError(404, `The model '${requested}' does not exist (this server serves '${this.modelName}')`, 'invalid_request_error', 'model', 'model_not_found');
  }

  private json(res: http.ServerResponse, status: number, body: unknown): void {
    const s = JSON.stringify(body);
    res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(s) });
    res.end(s);
  }

  /** The error as the OpenAI error object: a plain response, or an event where a stream has begun. */
  private fail(req: http.IncomingMessage, res: http.ServerResponse, e: unknown): void {
    const { status, body } = errorBody(e);
    if (res.headersSent) {
      if (!res.writableEnded && !res.destroyed) {
        res.write(`data: ${JSON.stringify(body)}\n\n`);
        res.end();
      }
      return;
    }
    // A body left unread (refused before it was read) would otherwise stall the connection.
    if (!req.complete) res.setHeader('Connection', 'close');
    this.json(res, status, body);
  }

  /** The request body as JSON (413 past maxBodyBytes, 400 where it does not parse). */
  private body(req: http.IncomingMessage): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const limit = this.o.maxBodyBytes;
      const declared = Number(req.headers['content-length']);
      if (Number.isFinite(declared) && declared > limit) {
        reject(new ApiError(413, `the request body (${declared} bytes) is larger than ${limit} bytes`, 'invalid_request_error', null, 'body_too_large'));
        return;
      }
      const parts: Buffer[] = [];
      let size = 0, done = false;
      req.on('data', (c: Buffer) => {
        if (done) return;
        size += c.length;
        if (size > limit) {
          done = true;
          reject(new ApiError(413, `the request body is larger than ${limit} bytes`, 'invalid_request_error', null, 'body_too_large'));
          return;
        }
        parts.push(c);
      });
      req.on('end', () => {
        if (done) return;
        done = true;
        const text = Buffer.concat(parts).toString('utf8');
        try {
          resolve(JSON.parse(text));
        } catch (e) {
          reject(new ApiError(400, `the request body is not valid JSON (${(e as Error).message})`));
        }
      });
      req.on('error', (e) => {
        if (!done) {
          done = true;
          reject(e);
        }
      });
    });
  }

  // ---- generation

  /**
   * Submits the choices: each prompt n times (seeds seed, seed + 1, ... where a seed is given).
   * All or nothing: a prompt the model refuses aborts the ones already submitted. The
   * controller aborts them all when the client goes away or the server closes.
   */
  private submit(plan: SamplingPlan, prompts: Int32Array[], fallbackTokens: number, ctl: AbortController, adapter: string | undefined): Choice[] {
    const choices = prompts.length * plan.n;
    if (this.pendingChoices + choices > this.o.maxPending)
      throw new ApiError(429, `the server has ${this.pendingChoices} generations pending (at most ${this.o.maxPending}); try again later`,
        'rate_limit_error', null, 'too_many_requests');
    const context = this.model.maxContext;
    const budgets = prompts.map((p) => tokenBudget(p.length, plan.maxTokens, fallbackTokens, context));
    const out: Choice[] = [];
    try {
      prompts.forEach((ids, pi) => {
        for (let j = 0; j < plan.n; j++) {
          const stream = this.model.generate({
            ids,
            maxTokens: budgets[pi],
            temperature: plan.temperature,
            topP: plan.topP,
            topK: plan.topK,
            seed: plan.seed === undefined ? undefined : plan.seed + j,
            stop: plan.stop,
            signal: ctl.signal,
            adapter,
          });
          out.push({ index: pi * plan.n + j, stream, promptTokens: ids.length });
        }
      });
    } catch (e) {
      ctl.abort();
      throw e;
    }
    this.pendingChoices += out.length;
    return out;
  }

  private tokenize(input: PromptInput): Int32Array {
    if ('ids' in input) {
      const vocab = this.model.config.vocabSize;
      input.ids.forEach((v, i) => {
        if (v < 0 || v >= vocab) throw new ApiError(400, `prompt token ids[${i}] = ${v} is outside the vocabulary [0, ${vocab})`, 'invalid_request_error', 'prompt');
      });
      return Int32Array.from(input.ids);
    }
    const tok = this.model.tokenizer;
    if (!tok) throw new ApiError(400, 'this model has no tokenizer: pass the prompt as token ids', 'invalid_request_error', 'prompt');
    const ids = tok.encode(input.text);
    if (ids.length === 0) throw new ApiError(400, 'the prompt encodes to no tokens', 'invalid_request_error', 'prompt');
    return ids;
  }

  /** Runs the choices to the end (stream: one event per piece of text), answering the client. */
  private async run(
    res: http.ServerResponse, plan: SamplingPlan, prompts: Int32Array[], fallbackTokens: number,
    shape: ResponseShape, adapter: string | undefined,
  ): Promise<number> {
    const ctl = new AbortController();
    const choices = this.submit(plan, prompts, fallbackTokens, ctl, adapter);
    // The tokens generated for the request, all choices together (its usage and the server's count).
    const completionTokens = (): number => choices.reduce((n, c) => n + c.stream.tokens, 0);
    this.controllers.add(ctl);
    // The client went away before the answer was complete: stop generating for it.
    const onClose = () => {
      if (!res.writableFinished) ctl.abort();
    };
    res.on('close', onClose);
    // each choice leaves the pending count once, when its stream has ended (or never started)
    const live = new Set(choices);
    const ended = (c: Choice) => {
      if (live.delete(c)) this.pendingChoices--;
    };
    const promptTokens = prompts.reduce((s, p) => s + p.length, 0);
    try {
      if (plan.stream) {
        res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache', Connection: 'keep-alive', 'X-Accel-Buffering': 'no' });
        res.flushHeaders();
        const send = (o: unknown) => {
          if (!res.writableEnded && !res.destroyed) res.write(`data: ${JSON.stringify(o)}\n\n`);
        };
        choices.forEach((c) => shape.first && send(shape.chunk(c.index, shape.first, null)));
        await Promise.all(
          choices.map(async (c) => {
            try {
              for await (const e of c.stream) if (e.text) send(shape.chunk(c.index, shape.piece(e.text), null));
            } finally {
              ended(c);
            }
            if (ctl.signal.aborted) return;
            send(shape.chunk(c.index, shape.last, finishReason(c.stream.finishReason)));
          }),
        );
        // Cut short by close(): an error event instead of [DONE], so the client knows the text is incomplete.
        if (ctl.signal.aborted && this.closing) throw new ApiError(503, 'the server shut down while generating', 'server_error', null, 'shutting_down');
        const completion = completionTokens();
        if (plan.includeUsage) send(shape.usageChunk(usage(promptTokens, completion)));
        if (!res.writableEnded && !res.destroyed) res.end('data: [DONE]\n\n');
        return completion;
      }
      const texts = choices.map(() => '');
      await Promise.all(
        choices.map(async (c, k) => {
          try {
            for await (const e of c.stream) texts[k] += e.text;
          } finally {
            ended(c);
          }
        }),
      );
      if (ctl.signal.aborted) {
        // Closed by the server (the client is gone otherwise): say so where anyone still listens.
        if (this.closing) throw new ApiError(503, 'the server shut down while generating', 'server_error', null, 'shutting_down');
        return 0;
      }
      const completion = completionTokens();
      this.json(res, 200, shape.full(choices.map((c, k) => ({ index: c.index, text: texts[k], finish: finishReason(c.stream.finishReason) })), usage(promptTokens, completion)));
      return completion;
    } catch (e) {
      ctl.abort();
      throw e;
    } finally {
      for (const c of [...live]) ended(c);
      res.off('close', onClose);
      this.controllers.delete(ctl);
    }
  }

  private async completions(res: http.ServerResponse, plan: CompletionPlan): Promise<number> {
    const adapter = this.adapterFor(plan.model);
    const prompts = plan.prompts.map((p) => this.tokenize(p));
    const id = responseId('cmpl'), created = Math.floor(Date.now() / 1000), model = plan.model ?? this.modelName;
    const head = { id, object: 'text_completion', created, model };
    return this.run(res, plan, prompts, this.o.defaultMaxTokens, {
      first: undefined,
      piece: (text) => ({ text }),
      last: { text: '' },
      chunk: (index, part, finish) => ({ ...head, choices: [{ index, ...(part as object), logprobs: null, finish_reason: finish }] }),
      usageChunk: (u) => ({ ...head, choices: [], usage: u }),
      full: (cs, u) => ({ ...head, choices: cs.map((c) => ({ index: c.index, text: c.text, logprobs: null, finish_reason: c.finish })), usage: u }),
    }, adapter);
  }

  private async chat(res: http.ServerResponse, plan: ChatPlan): Promise<number> {
    const adapter = this.adapterFor(plan.model);
    const tok = this.model.tokenizer;
    if (!tok) throw new ApiError(400, 'this model has no tokenizer, so it cannot chat', 'invalid_request_error', 'messages', 'no_tokenizer');
    if (!tok.hasChatTemplate)
      throw new ApiError(400, 'this model has no chat template (tokenizer_config.json chat_template or chat_template.jinja); use /v1/completions',
        'invalid_request_error', 'messages', 'no_chat_template');
    let text: string;
    try {
      text = tok.applyChatTemplate(plan.messages, { addGenerationPrompt: true });
    } catch (e) {
      throw new ApiError(400, `the chat template refused these messages: ${(e as Error).message}`, 'invalid_request_error', 'messages');
    }
    const ids = tok.encode(text);
    const id = responseId('chatcmpl'), created = Math.floor(Date.now() / 1000), model = plan.model ?? this.modelName;
    const head = { id, object: 'chat.completion.chunk', created, model };
    // Chat's default budget is what the context leaves (OpenAI has no small default there).
    return this.run(res, plan, [ids], Number.MAX_SAFE_INTEGER, {
      first: { delta: { role: 'assistant', content: '' } },
      piece: (content) => ({ delta: { content } }),
      last: { delta: {} },
      chunk: (index, part, finish) => ({ ...head, choices: [{ index, ...(part as object), logprobs: null, finish_reason: finish }] }),
      usageChunk: (u) => ({ ...head, choices: [], usage: u }),
      full: (cs, u) => ({
        id, object: 'chat.completion', created, model,
        choices: cs.map((c) => ({ index: c.index, message: { role: 'assistant', content: c.text }, logprobs: null, finish_reason: c.finish })),
        usage: u,
      }),
    }, adapter);
  }
}

/** How one endpoint's responses and stream chunks look. */
interface ResponseShape {
  /** The part of a choice's first chunk (chat: the assistant role), or none. */
  first: object | undefined;
  piece(text: string): object;
  last: object;
  chunk(index: number, part: object, finish: string | null): object;
  usageChunk(u: Usage): object;
  full(choices: Array<{ index: number; text: string; finish: string | null }>, u: Usage): object;
}

/** An OpenAI-compatible HTTP server for `model` (call listen(); close() before disposing the model). */
export function createServer(model: Model, opts: ServerOptions = {}): SqueezeServer {
  return new SqueezeServer(model, opts);
}
