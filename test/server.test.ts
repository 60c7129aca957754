/**
 * The OpenAI-compatible HTTP server (ts/server) over pycoder-mini on the CPU: response shapes,
 * streams, the same tokens as model.generate, batching of concurrent requests, chat through a
 * chat template, every refusal as a coded 4xx that leaves the model serving, client disconnects
 * and shutdown freeing their KV pages, and the `squeezelm serve` command.
 */
import * as fs from 'fs';
import * as http from 'http';
import * as os from 'os';
import * as path from 'path';
import { spawn } from 'child_process';
import { loadModel, Model } from '../ts/model/model';
import { createServer, SqueezeServer } from '../ts/server/server';
import { parseChat, parseCompletion } from '../ts/server/openai';

const PYCODER = path.join(__dirname, '..', 'models', 'pycoder-mini');
// tiny-llama's a8 adapter (q and v of layers 0-3) fits pycoder-mini's shapes: a LoRA to serve
const A8 = path.join(__dirname, 'fixtures', 'tiny-llama-gqa', 'adapters', 'a8');
const CONTEXT = 256;

interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  json: any;
}

function request(url: string, p: string, opts: { method?: string; body?: unknown; raw?: string; headers?: Record<string, string> } = {}): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const data = opts.raw ?? (opts.body === undefined ? undefined : JSON.stringify(opts.body));
    const req = http.request(url + p, {
      method: opts.method ?? (data === undefined ? 'GET' : 'POST'),
      headers: { 'Content-Type': 'application/json', ...(opts.headers ?? {}) },
    }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c) => (text += c));
      res.on('end', () => {
        let json: unknown;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
      });
    });
    req.on('error', reject);
    if (data !== undefined) req.write(data);
    req.end();
  });
}

/** The data events of a server-sent event stream, parsed (the final '[DONE]' as the string). */
function events(text: string): any[] {
  return text
    .split('\n\n')
    .filter((b) => b.startsWith('data: '))
    .map((b) => b.slice(6))
    .map((d) => (d === '[DONE]' ? d : JSON.parse(d)));
}

async function until(cond: () => boolean, ms = 20000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function generateText(model: Model, req: Parameters<Model['generate']>[0]): Promise<string> {
  let s = '';
  for await (const e of model.generate(req)) s += e.text;
  return s;
}

describe('OpenAI-compatible server', () => {
  let model: Model;
  let server: SqueezeServer;
  let url: string;

  beforeAll(async () => {
    model = await loadModel(PYCODER, { device: 'cpu', maxBatch: 4, maxContext: CONTEXT, lora: { maxAdapters: 2 } });
    await model.loadAdapter(A8, { name: 'py-a8' });
    server = createServer(model, { modelName: 'pycoder-mini' });
    url = (await server.listen(0)).url;
  });
  afterAll(async () => {
    await server.close();
    await model.dispose();
  });
  afterEach(async () => {
    // whatever a test did, nothing stays pending and every KV page is back
    await until(() => server.pending === 0 && model.freeKvPages === model.kvPages);
  });

  test('GET /health and /v1/models describe the served model', async () => {
    const h = await request(url, '/health');
    expect(h.status).toBe(200);
    expect(h.json).toMatchObject({ status: 'ok', model: 'pycoder-mini' });
    const m = await request(url, '/v1/models');
    expect(m.json.object).toBe('list');
    expect(m.json.data).toHaveLength(2);
    expect(m.json.data[0]).toMatchObject({ id: 'pycoder-mini', object: 'model', max_model_len: CONTEXT });
    expect(m.json.data[1]).toMatchObject({ id: 'py-a8', object: 'model', parent: 'pycoder-mini' });
    expect((await request(url, '/v1/models/py-a8')).json.parent).toBe('pycoder-mini');
    expect((await request(url, '/v1/models/pycoder-mini')).json.id).toBe('pycoder-mini');
    const other = await request(url, '/v1/models/gpt-4');
    expect(other.status).toBe(404);
    expect(other.json.error.code).toBe('model_not_found');
  });

  test('a greedy completion is what model.generate gives, with usage', async () => {
    const prompt = 'def fibonacci(n):';
    const want = await generateText(model, { prompt, maxTokens: 24, temperature: 0 });
    const r = await request(url, '/v1/completions', { body: { model: 'pycoder-mini', prompt, max_tokens: 24, temperature: 0 } });
    expect(r.status).toBe(200);
    expect(r.headers['content-type']).toMatch(/application\/json/);
    expect(r.json.object).toBe('text_completion');
    expect(r.json.id).toMatch(/^cmpl-[0-9a-f]{24}$/);
    expect(r.json.model).toBe('pycoder-mini');
    expect(r.json.choices).toHaveLength(1);
    expect(r.json.choices[0]).toEqual({ index: 0, text: want, logprobs: null, finish_reason: 'length' });
    const promptTokens = model.tokenizer!.encode(prompt).length;
    expect(r.json.usage).toEqual({ prompt_tokens: promptTokens, completion_tokens: 24, total_tokens: promptTokens + 24 });
    // the same prompt as token ids gives the same text
    const ids = Array.from(model.tokenizer!.encode(prompt));
    const r2 = await request(url, '/v1/completions', { body: { prompt: ids, max_tokens: 24, temperature: 0 } });
    expect(r2.json.choices[0].text).toBe(want);
    // without max_tokens: OpenAI's default of 16
    const r3 = await request(url, '/v1/completions', { body: { prompt, temperature: 0 } });
    expect(r3.json.usage.completion_tokens).toBe(16);
  });

  test('a LoRA adapter is served under its own name', async () => {
    const prompt = 'def fibonacci(n):';
    const want = await generateText(model, { prompt, maxTokens: 16, temperature: 0, adapter: 'py-a8' });
    const base = await generateText(model, { prompt, maxTokens: 16, temperature: 0 });
    expect(want).not.toBe(base);
    const r = await request(url, '/v1/completions', { body: { model: 'py-a8', prompt, max_tokens: 16, temperature: 0 } });
    expect(r.status).toBe(200);
    expect(r.json.model).toBe('py-a8');
    expect(r.json.choices[0].text).toBe(want);
    // base and adapter requests at once share the batch and each get their own text
    const [ra, rb] = await Promise.all(['py-a8', 'pycoder-mini'].map((m) =>
      request(url, '/v1/completions', { body: { model: m, prompt, max_tokens: 16, temperature: 0 } })));
    expect([ra.json.choices[0].text, rb.json.choices[0].text]).toEqual([want, base]);
  });

  test('a stream carries the same text as pieces, then the finish, usage and [DONE]', async () => {
    const body = { prompt: 'def add(a, b):', max_tokens: 20, temperature: 0 };
    const full = await request(url, '/v1/completions', { body });
    const r = await request(url, '/v1/completions', { body: { ...body, stream: true, stream_options: { include_usage: true } } });
    expect(r.status).toBe(200);
    expect(r.headers['content-type']).toMatch(/text\/event-stream/);
    const ev = events(r.text);
    expect(ev[ev.length - 1]).toBe('[DONE]');
    const chunks = ev.slice(0, -1);
    const usageChunk = chunks[chunks.length - 1];
    expect(usageChunk.choices).toEqual([]);
    expect(usageChunk.usage).toEqual(full.json.usage);
    const pieces = chunks.slice(0, -1);
    expect(pieces.length).toBeGreaterThan(2);
    expect(pieces.every((c: any) => c.id === pieces[0].id && c.object === 'text_completion')).toBe(true);
    expect(pieces.map((c: any) => c.choices[0].text).join('')).toBe(full.json.choices[0].text);
    expect(pieces[pieces.length - 1].choices[0].finish_reason).toBe('length');
    expect(pieces.slice(0, -1).every((c: any) => c.choices[0].finish_reason === null)).toBe(true);
    // without include_usage there is no usage chunk
    const r2 = await request(url, '/v1/completions', { body: { ...body, stream: true } });
    expect(events(r2.text).some((c: any) => c !== '[DONE]' && c.usage)).toBe(false);
  });

  test('stop strings end the text before them with finish_reason stop', async () => {
    const prompt = 'def fibonacci(n):';
    const free = (await request(url, '/v1/completions', { body: { prompt, max_tokens: 30, temperature: 0 } })).json.choices[0].text as string;
    // a stop string taken from the middle of the free-running text
    const stop = free.slice(8, 14);
    expect(stop.trim().length).toBeGreaterThan(0);
    const r = await request(url, '/v1/completions', { body: { prompt, max_tokens: 30, temperature: 0, stop: [stop, 'never-there'] } });
    expect(r.json.choices[0].finish_reason).toBe('stop');
    expect(r.json.choices[0].text).toBe(free.slice(0, free.indexOf(stop)));
    const s = await request(url, '/v1/completions', { body: { prompt, max_tokens: 30, temperature: 0, stop, stream: true } });
    const texts = events(s.text).filter((c: any) => c !== '[DONE]').map((c: any) => c.choices[0].text).join('');
    expect(texts).toBe(free.slice(0, free.indexOf(stop)));
  });

  test('n choices and several prompts: indexed choices, seeded sampling reproducible', async () => {
    const body = { prompt: ['import os', 'class A:'], n: 2, max_tokens: 10, temperature: 0.9, top_p: 0.95, top_k: 40, seed: 7 };
    const a = await request(url, '/v1/completions', { body });
    expect(a.status).toBe(200);
    expect(a.json.choices.map((c: any) => c.index)).toEqual([0, 1, 2, 3]);
    expect(a.json.usage.completion_tokens).toBeLessThanOrEqual(40);
    const b = await request(url, '/v1/completions', { body });
    expect(b.json.choices.map((c: any) => c.text)).toEqual(a.json.choices.map((c: any) => c.text));
    // a stream of several choices interleaves them; each one's pieces join to the same text
    const s = await request(url, '/v1/completions', { body: { ...body, stream: true } });
    const ev = events(s.text).filter((c: any) => c !== '[DONE]');
    for (const c of a.json.choices) {
      const mine = ev.filter((e: any) => e.choices[0].index === c.index);
      expect(mine.map((e: any) => e.choices[0].text).join('')).toBe(c.text);
      expect(mine[mine.length - 1].choices[0].finish_reason).toBe(c.finish_reason);
    }
  });

  test('concurrent requests are batched by the scheduler and all complete', async () => {
    const steps0 = model.stats.steps;
    const prompts = ['def a():', 'def b(x):', 'import sys', 'for i in range(10):'];
    const rs = await Promise.all(prompts.map((prompt) => request(url, '/v1/completions', { body: { prompt, max_tokens: 32, temperature: 0 } })));
    for (const r of rs) {
      expect(r.status).toBe(200);
      expect(r.json.choices[0].finish_reason === 'length' ? r.json.usage.completion_tokens : 32).toBe(32);
    }
    // 4 x 32 tokens took far fewer than 128 decode steps: they ran in one batch
    expect(model.stats.steps - steps0).toBeLessThan(80);
  });

  test('refusals are coded 4xx answers and leave the server serving', async () => {
    const bad = async (body: unknown, status: number, param?: string | null, code?: string | null, p = '/v1/completions') => {
      const r = await request(url, p, typeof body === 'string' ? { raw: body } : { body });
      expect(r.status).toBe(status);
      expect(typeof r.json.error.message).toBe('string');
      expect(r.json.error.type).toBeDefined();
      if (param !== undefined) expect(r.json.error.param).toBe(param);
      if (code !== undefined) expect(r.json.error.code).toBe(code);
      return r.json.error;
    };
    await bad('{"prompt": "x",', 400);
    await bad('[1, 2]', 400);
    await bad({ max_tokens: 4 }, 400, 'prompt');
    await bad({ prompt: '' }, 400, 'prompt');
    await bad({ prompt: [] }, 400, 'prompt');
    await bad({ prompt: [1.5, 2] }, 400, 'prompt');
    await bad({ prompt: [1, 2, 99999999] }, 400, 'prompt');
    await bad({ prompt: 'x', max_tokens: 0 }, 400, 'max_tokens');
    await bad({ prompt: 'x', max_tokens: '8' }, 400, 'max_tokens');
    await bad({ prompt: 'x', temperature: 3 }, 400, 'temperature');
    await bad({ prompt: 'x', top_p: -1 }, 400, 'top_p');
    await bad({ prompt: 'x', n: 0 }, 400, 'n');
    await bad({ prompt: 'x', stop: 5 }, 400, 'stop');
    await bad({ prompt: 'x', stream: 'yes' }, 400, 'stream');
    await bad({ prompt: 'x', stream_options: { include_usage: true } }, 400, 'stream_options');
    await bad({ prompt: 'x', seed: 1.5 }, 400, 'seed');
    expect((await bad({ prompt: 'x', logprobs: 3 }, 400, 'logprobs')).message).toMatch(/not supported/);
    await bad({ prompt: 'x', echo: true }, 400, 'echo');
    await bad({ prompt: 'x', presence_penalty: 0.5 }, 400, 'presence_penalty');
    await bad({ prompt: 'x', best_of: 3 }, 400, 'best_of');
    await bad({ prompt: 'x', model: 'gpt-4' }, 404, 'model', 'model_not_found');
    // the context: a prompt that fills it, and a prompt plus max_tokens past it
    const long = Array.from({ length: CONTEXT }, (_, i) => 10 + (i % 50));
    await bad({ prompt: long }, 400, 'prompt', 'context_length_exceeded');
    await bad({ prompt: long.slice(0, 200), max_tokens: 100 }, 400, 'max_tokens', 'context_length_exceeded');
    // without max_tokens the default is cut to what the context leaves
    const fit = await request(url, '/v1/completions', { body: { prompt: long.slice(0, CONTEXT - 5), temperature: 0 } });
    expect(fit.status).toBe(200);
    expect(fit.json.usage.completion_tokens).toBeLessThanOrEqual(5);
    // routes and methods
    const nf = await request(url, '/v1/embeddings', { body: {} });
    expect(nf.status).toBe(404);
    const get = await request(url, '/v1/completions');
    expect(get.status).toBe(405);
    expect(get.headers.allow).toBe('POST');
    // after all that, a plain request works and nothing leaked
    const ok = await request(url, '/v1/completions', { body: { prompt: 'x', max_tokens: 3 } });
    expect(ok.status).toBe(200);
    expect(server.pending).toBe(0);
  });

  test('a client that disconnects mid-stream stops its generation and frees its pages', async () => {
    const steps0 = model.stats.steps;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no data')), 20000);
      const req = http.request(url + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' } }, (res) => {
        res.once('data', () => {
          clearTimeout(timer);
          req.destroy();
          resolve();
        });
      });
      req.on('error', () => undefined);
      req.end(JSON.stringify({ prompt: 'def main():', max_tokens: CONTEXT - 10, temperature: 0, stream: true }));
    });
    await until(() => server.pending === 0 && model.freeKvPages === model.kvPages);
    // it stopped long before its max_tokens
    expect(model.stats.steps - steps0).toBeLessThan(CONTEXT - 30);
  });

  test('more pending generations than maxPending get 429', async () => {
    const small = createServer(model, { modelName: 'pycoder-mini', maxPending: 2 });
    const u = (await small.listen(0)).url;
    try {
      const r = await request(u, '/v1/completions', { body: { prompt: 'x', n: 3, max_tokens: 2 } });
      expect(r.status).toBe(429);
      expect(r.json.error.code).toBe('too_many_requests');
      expect((await request(u, '/v1/completions', { body: { prompt: 'x', n: 2, max_tokens: 2 } })).status).toBe(200);
    } finally {
      await small.close();
    }
  });

  test('bodies over maxBodyBytes get 413; an API key is required where set', async () => {
    const s2 = createServer(model, { modelName: 'm', maxBodyBytes: 512, apiKey: 'sekrit' });
    const u = (await s2.listen(0)).url;
    try {
      const auth = { Authorization: 'Bearer sekrit' };
      expect((await request(u, '/health')).status).toBe(200);
      const no = await request(u, '/v1/models');
      expect(no.status).toBe(401);
      expect(no.json.error.code).toBe('invalid_api_key');
      expect((await request(u, '/v1/models', { headers: { Authorization: 'Bearer nope' } })).status).toBe(401);
      expect((await request(u, '/v1/models', { headers: auth })).status).toBe(200);
      const big = await request(u, '/v1/completions', { body: { prompt: 'x'.repeat(2000) }, headers: auth });
      expect(big.status).toBe(413);
      expect((await request(u, '/v1/completions', { body: { prompt: 'x', max_tokens: 2 }, headers: auth })).status).toBe(200);
    } finally {
      await s2.close();
    }
  });

  test('adapters loaded and unloaded at run time where allowed (vLLM\'s routes)', async () => {
    const body = { lora_name: 'dyn', lora_path: A8 };
    expect((await request(url, '/v1/load_lora_adapter', { body })).json.error.code).toBe('adapter_loading_disabled');
    const s5 = createServer(model, { modelName: 'pycoder-mini', allowAdapterLoading: true });
    const u = (await s5.listen(0)).url;
    try {
      const r = await request(u, '/v1/load_lora_adapter', { body });
      expect(r.status).toBe(200);
      expect(r.json).toMatchObject({ id: 'dyn', parent: 'pycoder-mini', ranks: { q_proj: 8, v_proj: 8 } });
      expect((await request(u, '/v1/models')).json.data.map((d: { id: string }) => d.id)).toContain('dyn');
      const c = await request(u, '/v1/completions', { body: { model: 'dyn', prompt: 'def f(x):', max_tokens: 6, temperature: 0 } });
      expect(c.json.choices[0].text).toBe(await generateText(model, { prompt: 'def f(x):', maxTokens: 6, temperature: 0, adapter: 'py-a8' }));
      expect((await request(u, '/v1/load_lora_adapter', { body })).status).toBe(400);  // the name is taken
      expect((await request(u, '/v1/load_lora_adapter', { body: { lora_name: 'x', lora_path: '/nonexistent' } })).json.error.code).toBe('invalid_format');
      expect((await request(u, '/v1/load_lora_adapter', { body: { lora_path: A8 } })).json.error.param).toBe('lora_name');
      expect((await request(u, '/v1/unload_lora_adapter', { body: { lora_name: 'dyn' } })).status).toBe(200);
      expect((await request(u, '/v1/unload_lora_adapter', { body: { lora_name: 'dyn' } })).status).toBe(404);
      expect((await request(u, '/v1/completions', { body: { model: 'dyn', prompt: 'x' } })).json.error.code).toBe('model_not_found');
    } finally {
      await s5.close();
    }
  });

  test('close() ends generations in flight, answers them, and leaves the model usable', async () => {
    const s3 = createServer(model, { modelName: 'm' });
    const u = (await s3.listen(0)).url;
    const inflight = request(u, '/v1/completions', { body: { prompt: 'def main():', max_tokens: CONTEXT - 10, temperature: 0 } });
    await until(() => s3.pending === 1);
    await s3.close();
    const r = await inflight;
    expect(r.status).toBe(503);
    expect(r.json.error.code).toBe('shutting_down');
    await expect(request(u, '/health')).rejects.toThrow();
    // a stream cut short by close() ends with an error event, not [DONE]
    const s4 = createServer(model, { modelName: 'm' });
    const u4 = (await s4.listen(0)).url;
    const streamed = request(u4, '/v1/completions', { body: { prompt: 'def main():', max_tokens: CONTEXT - 10, temperature: 0, stream: true } });
    await until(() => s4.pending === 1);
    await s4.close();
    const ev = events((await streamed).text);
    expect(ev[ev.length - 1].error.code).toBe('shutting_down');
    expect(ev).not.toContain('[DONE]');
    await until(() => model.freeKvPages === model.kvPages);
    expect((await generateText(model, { prompt: 'x', maxTokens: 3 })).length).toBeGreaterThanOrEqual(0);
  });
});

describe('chat completions', () => {
  let dir: string;
  let model: Model;
  let server: SqueezeServer;
  let url: string;
  const TEMPLATE =
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

  beforeAll(async () => {
    // pycoder-mini with a chat template beside it
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-chat-'));
    for (const f of ['config.json', 'generation_config.json', 'tokenizer.json', 'model.safetensors'])
      fs.symlinkSync(path.join(PYCODER, f), path.join(dir, f));
    fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ chat_template: TEMPLATE }));
    model = await loadModel(dir, { device: 'cpu', maxBatch: 2, maxContext: CONTEXT });
    server = createServer(model, { modelName: 'chat' });
    url = (await server.listen(0)).url;
  });
  afterAll(async () => {
    await server.close();
    await model.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const messages = [
    { role: 'system', content: 'You write Python.' },
    { role: 'user', content: [{ type: 'text', text: 'A function that ' }, { type: 'text', text: 'adds two numbers.' }] },
  ];

  test('the reply is the greedy continuation of the rendered template', async () => {
    const rendered = model.tokenizer!.applyChatTemplate([
      { role: 'system', content: 'You write Python.' },
      { role: 'user', content: 'A function that adds two numbers.' },
    ]);
    expect(rendered.endsWith('<|assistant|>\n')).toBe(true);
    const want = await generateText(model, { prompt: rendered, maxTokens: 20, temperature: 0 });
    const r = await request(url, '/v1/chat/completions', { body: { model: 'chat', messages, max_tokens: 20, temperature: 0 } });
    expect(r.status).toBe(200);
    expect(r.json.object).toBe('chat.completion');
    expect(r.json.id).toMatch(/^chatcmpl-/);
    expect(r.json.choices[0]).toEqual({ index: 0, message: { role: 'assistant', content: want }, logprobs: null, finish_reason: 'length' });
    expect(r.json.usage.prompt_tokens).toBe(model.tokenizer!.encode(rendered).length);
    // max_completion_tokens is the newer name of max_tokens
    const r2 = await request(url, '/v1/chat/completions', { body: { messages, max_completion_tokens: 20, temperature: 0 } });
    expect(r2.json.choices[0].message.content).toBe(want);
  });

  test('a chat stream: the role first, content deltas, an empty final delta with the finish', async () => {
    const full = await request(url, '/v1/chat/completions', { body: { messages, max_tokens: 12, temperature: 0 } });
    const r = await request(url, '/v1/chat/completions', { body: { messages, max_tokens: 12, temperature: 0, stream: true } });
    const ev = events(r.text);
    expect(ev[ev.length - 1]).toBe('[DONE]');
    const chunks = ev.slice(0, -1);
    expect(chunks.every((c: any) => c.object === 'chat.completion.chunk')).toBe(true);
    expect(chunks[0].choices[0].delta).toEqual({ role: 'assistant', content: '' });
    const last = chunks[chunks.length - 1].choices[0];
    expect(last.delta).toEqual({});
    expect(last.finish_reason).toBe('length');
    expect(chunks.slice(1, -1).map((c: any) => c.choices[0].delta.content).join('')).toBe(full.json.choices[0].message.content);
  });

  test('bad messages and a model without a template are refused', async () => {
    const bad = async (body: unknown, param: string) => {
      const r = await request(url, '/v1/chat/completions', { body });
      expect(r.status).toBe(400);
      expect(r.json.error.param).toBe(param);
    };
    await bad({ messages: [] }, 'messages');
    await bad({ messages: [{ role: 'wizard', content: 'x' }] }, 'messages[0].role');
    await bad({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] }, 'messages[0].content[0]');
    await bad({ messages: [{ role: 'user', content: 5 }] }, 'messages[0].content');
    await bad({ messages, tools: [{ type: 'function' }] }, 'tools');
    await bad({ messages, max_tokens: 4, max_completion_tokens: 5 }, 'max_completion_tokens');
    // the main server's pycoder-mini has no template
    const plain = await loadModel(PYCODER, { device: 'cpu', maxBatch: 1, maxContext: 64 });
    const s = createServer(plain);
    const u = (await s.listen(0)).url;
    try {
      const r = await request(u, '/v1/chat/completions', { body: { messages } });
      expect(r.status).toBe(400);
      expect(r.json.error.code).toBe('no_chat_template');
    } finally {
      await s.close();
      await plain.dispose();
    }
  });
});

describe('request parsing', () => {
  test('defaults follow the OpenAI API; developer messages are system messages', () => {
    const c = parseCompletion({ prompt: 'x' });
    expect(c).toMatchObject({ temperature: 1, topP: 1, topK: 0, n: 1, stream: false, stop: [], maxTokens: undefined });
    expect(parseCompletion({ prompt: 'x', top_k: -1, stop: 'y' })).toMatchObject({ topK: 0, stop: ['y'] });
    expect(parseCompletion({ prompt: [[1, 2], [3]] }).prompts).toEqual([{ ids: [1, 2] }, { ids: [3] }]);
    expect(parseChat({ messages: [{ role: 'developer', content: 'be brief' }] }).messages).toEqual([{ role: 'system', content: 'be brief' }]);
    expect(parseChat({ messages: [{ role: 'assistant', content: null }] }).messages).toEqual([{ role: 'assistant', content: '' }]);
    expect(() => parseCompletion({ prompt: 'x', n: 40, best_of: 40, max_tokens: 1 })).not.toThrow();
    expect(() => parseCompletion({ prompt: ['a', 'b'], n: 40 })).toThrow(/at most 64 choices/);
  });
});

describe('squeezelm serve', () => {
  test('serves on a free port, answers, and stops cleanly on SIGTERM', async () => {
    const bin = path.join(__dirname, '..', 'bin', 'squeezelm.js');
    const prefixFile = path.join(os.tmpdir(), `sqz-prefix-${process.pid}.txt`);
    fs.writeFileSync(prefixFile, 'import os\nimport sys\n');
    const child = spawn(process.execPath, [bin, 'serve', '--port', '0', '--device', 'cpu', '--max-context', '128', '--name', 'pm', '--lora', `lo=${A8}`, '--lora-slots', '1',
      '--cache-prefix', prefixFile],
      { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    child.stdout.on('data', (d) => (out += d.toString()));
    child.stderr.on('data', (d) => (err += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
    try {
      await until(() => /at (http:\/\/\S+)/.test(out) || child.exitCode !== null, 60000);
      const m = /serving 'pm' \(adapters: lo\) on cpu at (http:\/\/\S+)/.exec(out);
      expect(m).not.toBeNull();
      const u = m![1];
      const r = await request(u, '/v1/completions', { body: { model: 'pm', prompt: 'def f(x):', max_tokens: 4, temperature: 0 } });
      expect(r.status).toBe(200);
      expect(r.json.usage.completion_tokens).toBe(4);
      expect((await request(u, '/v1/models')).json.data.map((d: { id: string }) => d.id)).toEqual(['pm', 'lo']);
      expect((await request(u, '/v1/completions', { body: { model: 'lo', prompt: 'def f(x):', max_tokens: 4 } })).status).toBe(200);
      // a request that starts with the cached prefix starts from its pages
      expect((await request(u, '/v1/completions', { body: { prompt: 'import os\nimport sys\nimport json', max_tokens: 4 } })).status).toBe(200);
      expect((await request(u, '/health')).json.stats.prefixHits).toBe(1);
      expect(err).toMatch(/cached a \d+-token prefix/);
      await until(() => /POST \/v1\/completions 200/.test(err));
    } finally {
      child.kill('SIGTERM');
    }
    expect(await exited).toBe(0);
    fs.rmSync(prefixFile, { force: true });
    expect(err).toMatch(/shutting down/);
    expect(err).not.toMatch(/Error|at Object/);
  });

  test('a port in use is a coded error', async () => {
    const blocker = http.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    const port = (blocker.address() as { port: number }).port;
    const bin = path.join(__dirname, '..', 'bin', 'squeezelm.js');
    const child = spawn(process.execPath, [bin, 'serve', '--port', String(port), '--device', 'cpu', '--max-context', '64'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d) => (err += d.toString()));
    const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
    blocker.close();
    expect(code).toBe(1);
    expect(err).toMatch(/^squeezelm: ERR_ARG serve: cannot listen on 127\.0\.0\.1:\d+ \(.*EADDRINUSE/m);
  });
});
