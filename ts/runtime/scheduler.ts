/**
 * Continuous batching: requests queue up, join the running batch between steps (their
 * prompts prefilled together), decode one token per step together, and leave when they
 * finish, stop, hit the context, or are aborted (their KV pages go back at once).
 * Decode steps on CUDA replay a captured graph per batch size (and the LoRA sites the batch runs
 * deltas at) once it has run eagerly.
 * In the steady state (the same batch, nobody waiting, nobody at its token limit) the next step is
 * queued before this one's tokens are read: its input ids are copied on the device from the
 * tokens being sampled, so the device never idles while the host reads tokens, decodes text and
 * plans the next step. A request that ends on that token (eos, a stop string, an abort) has one
 * step computed for it and thrown away; its pages go back as usual.
 */
import { SqueezeError, isSqueezeError } from '../errors';
import { native, NativeGraph } from '../native';
import { Decoder, SqueezedContext, Workspace } from '../model/llama';
import { copy } from '../ops/basic';
import { StreamDecoder, Tokenizer } from '../model/tokenizer';

export interface GenerateRequest {
  prompt?: string;
  ids?: ArrayLike<number>;
  maxTokens: number;
  /** <= 0 or absent: greedy. */
  temperature?: number;
  topK?: number;
  topP?: number;
  seed?: number;
  /** Generation ends before the first occurrence of any of these strings. */
  stop?: string | string[];
  signal?: AbortSignal;
  /** A LoRA adapter loaded with model.loadAdapter (absent: the base model). */
  adapter?: string;
}

export interface GenerateEvent {
  id: number;
  /** Text that became complete with this token ('' while a character or stop string is pending). */
  text: string;
}

/** A request's tokens; finishReason is set once it has ended. */
export interface GenerationStream extends AsyncIterableIterator<GenerateEvent> {
  readonly finishReason?: FinishReason;
  /** Tokens sampled so far (an ending eos included, which the events may not show). */
  readonly tokens: number;
}

export type FinishReason = 'length' | 'eos' | 'stop' | 'abort' | 'error';

export interface GenerateResult {
  ids: number[];
  text: string;
  finishReason: FinishReason;
  error?: Error;
}

interface Req {
  prompt: Int32Array;
  maxTokens: number;
  temperature: number;
  topK: number;
  topP: number;
  seed: number;
  counter: number;
  stop: string[];
  signal?: AbortSignal;
  onAbort?: () => void;
  adapter?: string;
  /** The adapter's pool slot while the request holds it (-1: none). */
  loraSlot: number;
  /** Prompt tokens whose keys and values came from a cached prefix (not prefilled again). */
  cached: number;
  seq: number;
  last: number;
  generated: number[];
  stream?: StreamDecoder;
  text: string;
  emitted: number;
  events: GenerateEvent[];
  done: boolean;
  cancelled: boolean;
  finishReason?: FinishReason;
  error?: Error;
  wake?: () => void;
}

/** A decode step queued on the device whose tokens have not been read yet. */
interface Step {
  batch: Req[];
  tokens: Promise<Int32Array>;
}

interface DecodeSlot {
  ws: Workspace;
  graph?: NativeGraph;
  eagerRuns: number;
  /** Why this batch size could not be captured (it then runs eagerly). */
  captureError?: Error;
}

/** A prompt prefix whose keys and values stay in the cache (its own sequence), with the adapter it was computed with. */
export interface PrefixEntry {
  seq: number;
  ids: Int32Array;
  adapter?: string;
  /** Requests forked from it decode with Squeezed Attention over this context of the decoder. */
  squeezed?: SqueezedContext;
}

export interface SchedulerOptions {
  maxBatch: number;
  graphs: boolean;
  eosTokenIds: number[];
}

export class Scheduler {
  private pending: Req[] = [];
  private active: Req[] = [];
  private running: Promise<void> | undefined;
  /**
   * Decode workspaces and their graphs, per batch size and the LoRA sites the batch runs deltas at
   * (Workspace.loraSites, 4 bits): a batch on the base model takes other kernels (no deltas, the
   * fused GEMVs) than one with adapters, and adapters on q and v only run no delta at the other
   * sites, so each kind has its own graph (key 16 B + sites).
   */
  private slots = new Map<number, DecodeSlot>();
  private closed = false;
  /** The step queued ahead (same batch as the last one), read at the next round. */
  private inflight: Step | undefined;
  /** Decode steps run, and how many replayed a graph (for tests and benchmarks). */
  stats = { steps: 0, graphReplays: 0, prefills: 0, pipelined: 0, prefixHits: 0, prefixTokens: 0, captureError: undefined as string | undefined };
  /** Cached prompt prefixes (model.cachePrefix): a cache sequence each, forked by requests that start with them. */
  private prefixes = new Set<PrefixEntry>();

  constructor(private readonly dec: Decoder, private readonly tok: Tokenizer | undefined, readonly o: SchedulerOptions) {}

  addPrefix(p: PrefixEntry): void {
    this.prefixes.add(p);
  }

  removePrefix(p: PrefixEntry): void {
    this.prefixes.delete(p);
  }

  /**
   * The cached prefix sharing the most leading tokens with a request's prompt, and how many it
   * shares (at most all but the prompt's last token, which is prefilled for its logits). A prefix
   * counts when it shares all its tokens or at least a page of them: a text prefix whose last token
   * the tokenizer merges differently in the full prompt still lends everything before it.
   */
  private prefixFor(r: Req): { entry: PrefixEntry; length: number } | undefined {
    let best: { entry: PrefixEntry; length: number } | undefined;
    const ps = this.dec.cache.pageSize;
    for (const p of this.prefixes) {
      if (p.adapter !== r.adapter) continue;
      const max = Math.min(p.ids.length, r.prompt.length - 1);
      let n = 0;
      while (n < max && p.ids[n] === r.prompt[n]) n++;
      if (n > 0 && (n >= Math.min(p.ids.length, ps)) && (!best || n > best.length)) best = { entry: p, length: n };
    }
    return best;
  }

  get activeCount(): number {
    return this.active.length + this.pending.length;
  }

  /** Validates a request and queues it; the returned iterator yields its tokens. */
  submit(r: GenerateRequest): GenerationStream {
    if (this.closed) throw new SqueezeError('ERR_DISPOSED', 'model is disposed');
    const req = this.validate(r);
    this.pending.push(req);
    if (req.signal) {
      req.onAbort = () => {
        req.cancelled = true;
        req.wake?.();
      };
      req.signal.addEventListener('abort', req.onAbort, { once: true });
    }
    this.kick();
    const it = this.iterate(req) as GenerationStream;
    Object.defineProperty(it, 'finishReason', { get: () => req.finishReason });
    Object.defineProperty(it, 'tokens', { get: () => req.generated.length });
    return it;
  }

  private validate(r: GenerateRequest): Req {
    if (!r || typeof r !== 'object') throw new SqueezeError('ERR_ARG', 'generate: request must be an object');
    const cfg = this.dec.cfg;
    let prompt: Int32Array;
    if (r.ids !== undefined) {
      prompt = Int32Array.from(r.ids as ArrayLike<number>);
      if (prompt.length !== (r.ids as ArrayLike<number>).length) throw new SqueezeError('ERR_ARG', 'generate: ids must be integers');
      for (let i = 0; i < prompt.length; i++) {
        const v = (r.ids as ArrayLike<number>)[i];
        if (!Number.isInteger(v) || v < 0 || v >= cfg.vocabSize)
          throw new SqueezeError('ERR_ARG', `generate: ids[${i}] = ${v} is outside the vocabulary [0, ${cfg.vocabSize})`);
      }
    } else if (typeof r.prompt === 'string') {
      if (!this.tok) throw new SqueezeError('ERR_ARG', 'generate: this model has no tokenizer; pass ids');
      prompt = this.tok.encode(r.prompt);
    } else throw new SqueezeError('ERR_ARG', 'generate: pass prompt (a string) or ids');
    if (prompt.length === 0) throw new SqueezeError('ERR_ARG', 'generate: the prompt is empty');
    if (prompt.length > this.dec.cache.maxContext)
      throw new SqueezeError('ERR_CONTEXT_LENGTH', `generate: prompt of ${prompt.length} tokens is longer than the context (${this.dec.cache.maxContext})`);
    if (!Number.isInteger(r.maxTokens) || r.maxTokens < 1) throw new SqueezeError('ERR_ARG', `generate: maxTokens must be a positive integer, got ${r.maxTokens}`);
    const num = (v: unknown, name: string, d: number) => {
      if (v === undefined) return d;
      if (typeof v !== 'number' || !Number.isFinite(v)) throw new SqueezeError('ERR_ARG', `generate: ${name} must be a finite number`);
      return v;
    };
    if (r.adapter !== undefined) {
      if (typeof r.adapter !== 'string') throw new SqueezeError('ERR_ARG', 'generate: adapter must be a string (the name given to loadAdapter)');
      if (!this.dec.lora) throw new SqueezeError('ERR_ARG', "generate: this model was loaded without LoRA support (loadModel(dir, { lora: {} }))");
      if (!this.dec.lora.has(r.adapter))
        throw new SqueezeError('ERR_ARG', `generate: no adapter named '${r.adapter}' is loaded (loaded: ${this.dec.lora.names().join(', ') || 'none'})`);
    }
    const stop = r.stop === undefined ? [] : Array.isArray(r.stop) ? r.stop : [r.stop];
    if (!stop.every((s) => typeof s === 'string' && s.length > 0)) throw new SqueezeError('ERR_ARG', 'generate: stop must be non-empty strings');
    return {
      prompt,
      maxTokens: r.maxTokens,
      temperature: num(r.temperature, 'temperature', 0),
      topK: Math.trunc(num(r.topK, 'topK', 0)),
      topP: num(r.topP, 'topP', 1),
      seed: num(r.seed, 'seed', (Math.random() * 0xffffffff) >>> 0) >>> 0,
      counter: 0,
      stop,
      signal: r.signal,
      adapter: r.adapter,
      loraSlot: -1,
      cached: 0,
      seq: 0,
      last: 0,
      generated: [],
      stream: this.tok?.streamDecoder(),
      text: '',
      emitted: 0,
      events: [],
      done: false,
      cancelled: !!r.signal?.aborted,
    };
  }

  private async *iterate(req: Req): AsyncIterableIterator<GenerateEvent> {
    try {
      for (;;) {
        if (req.events.length) {
          yield req.events.shift()!;
          continue;
        }
        if (req.done) break;
        if (req.cancelled) {
          // Freed by the loop at its next step; nothing more is delivered.
          this.kick();
          break;
        }
        await new Promise<void>((res) => (req.wake = res));
        req.wake = undefined;
      }
      if (req.error) throw req.error;
    } finally {
      // A consumer that stops early cancels the request.
      if (!req.done) req.cancelled = true;
      if (req.signal && req.onAbort) req.signal.removeEventListener('abort', req.onAbort);
    }
  }

  private kick(): void {
    if (!this.running) {
      // The loop starts from a microtask, never inside submit(): requests submitted in one tick
      // (generateBatch, several generate() calls) are admitted together whether or not a loop was
      // already running, so the batches a request runs in, and with them its rounding and tokens,
      // do not depend on what ran before it in the process.
      this.running = Promise.resolve().then(() => this.loop()).finally(() => {
        this.running = undefined;
        if (!this.closed && (this.pending.length || this.active.length)) this.kick();
      });
    }
  }

  private finish(r: Req, reason: FinishReason, err?: Error): void {
    if (r.done) return;
    r.done = true;
    r.finishReason = reason;
    r.error = err;
    if (r.seq) this.dec.freeSequence(r.seq);
    r.seq = 0;
    if (r.loraSlot >= 0) this.dec.lora?.release(r.loraSlot);
    r.loraSlot = -1;
    this.active = this.active.filter((x) => x !== r);
    this.pending = this.pending.filter((x) => x !== r);
    r.wake?.();
  }

  private async loop(): Promise<void> {
    while (!this.closed && (this.pending.length || this.active.length || this.inflight)) {
      for (const r of [...this.pending, ...this.active]) if (r.cancelled) this.finish(r, 'abort');
      // A step queued ahead is read first when the batch it was queued for is no longer the
      // one to run (someone finished or left, or a request waits to join).
      if (this.inflight && (this.pending.length || !sameBatch(this.inflight.batch, this.active))) {
        const step = this.inflight;
        this.inflight = undefined;
        try {
          await this.settle(step);
        } catch (e) {
          for (const r of step.batch) this.finish(r, 'error', e as Error);
        }
        continue;
      }
      const cache = this.dec.cache;
      const admit: Req[] = [];
      // Requests are admitted in order, except that one waiting for an adapter slot (every slot
      // pinned by other adapters' running requests) lets later requests for the base model or for a
      // resident adapter go ahead; later requests for adapters not resident wait behind it.
      let i = 0, slotWait = false;
      while (i < this.pending.length && this.active.length + admit.length < this.o.maxBatch) {
        const r = this.pending[i];
        // Wait for pages while others run; alone, a request that cannot fit fails. A cached prefix
        // lends its full pages.
        const prefix = this.prefixFor(r);
        const shared = prefix ? Math.floor(prefix.length / cache.pageSize) : 0;
        if (cache.pagesFor(r.prompt.length + 1) - shared > cache.freePages && (this.active.length || admit.length)) break;
        if (r.adapter !== undefined) {
          const pool = this.dec.lora;
          if (!pool?.isResident(r.adapter) && (slotWait || !pool?.canAcquire(r.adapter))) {
            if (this.active.length || admit.length) {
              slotWait = true;
              i++;
              continue;
            }
            this.pending.splice(i, 1);
            this.finish(r, 'error', new SqueezeError('ERR_STATE', `no adapter slot is free for '${r.adapter}'`));
            continue;
          }
        }
        this.pending.splice(i, 1);
        try {
          if (prefix) {
            r.seq = cache.fork(prefix.entry.seq, prefix.length);
            r.cached = prefix.length;
            if (prefix.entry.squeezed) this.dec.bindSqueezed(r.seq, prefix.entry.squeezed, prefix.length);
            this.stats.prefixHits++;
            this.stats.prefixTokens += r.cached;
          } else r.seq = cache.createSequence();
          cache.grow(r.seq, r.prompt.length);
          if (r.adapter !== undefined) {
            r.loraSlot = this.dec.lora!.acquire(r.adapter)!;
            this.dec.bindAdapter(r.seq, r.loraSlot);
          }
          admit.push(r);
        } catch (e) {
          this.finish(r, 'error', e as Error);
        }
      }
      try {
        if (admit.length) await this.prefill(admit);
        const batch = this.active.filter((r) => !admit.includes(r));
        if (batch.length) await this.decode(batch);
      } catch (e) {
        for (const r of [...admit, ...this.active]) this.finish(r, 'error', e as Error);
      }
      await new Promise<void>((res) => setImmediate(res));
    }
  }

  /** Sampling settings; `ahead`: tokens each request will have taken before this step runs. */
  private writeSampling(ws: Workspace, reqs: Req[], ahead = 0): void {
    const B = reqs.length;
    const t = new Float32Array(B), k = new Int32Array(B), p = new Float32Array(B), rng = new Uint32Array(2 * B);
    reqs.forEach((r, b) => {
      t[b] = r.temperature;
      k[b] = r.topK;
      p[b] = r.topP;
      rng[2 * b] = r.seed;
      rng[2 * b + 1] = r.counter + ahead;
    });
    ws.temperature.write(t);
    ws.topK.write(k);
    ws.topP.write(p);
    ws.rng.write(rng);
  }

  private async prefill(reqs: Req[]): Promise<void> {
    this.stats.prefills++;
    // Only what a cached prefix did not already put in the cache is prefilled.
    const rest = reqs.map((r) => r.prompt.subarray(r.cached));
    const T = rest.reduce((a, t) => a + t.length, 0);
    const ws = this.dec.workspace(T, reqs.length, false);
    try {
      const inp = this.dec.inputs(reqs.map((r) => r.seq), rest, T);
      this.dec.write(ws, inp);
      this.writeSampling(ws, reqs);
      const maxQ = Math.max(...rest.map((t) => t.length));
      this.dec.forward(ws, maxQ, Math.max(...reqs.map((r) => r.prompt.length)));
      this.dec.sample(ws);
      const toks = (await ws.tokens.toArray()) as Int32Array;
      reqs.forEach((r, b) => {
        this.active.push(r);
        this.accept(r, toks[b]);
      });
    } finally {
      ws.dispose();
    }
  }

  private slotKey(batch: Req[]): number {
    return 16 * batch.length + this.dec.loraSites(batch.map((r) => r.seq));
  }

  private slot(batch: Req[]): DecodeSlot {
    const key = this.slotKey(batch);
    let s = this.slots.get(key);
    if (!s) {
      s = { ws: this.dec.decodeWorkspace(batch.length, this.dec.cache.maxContext), eagerRuns: 0 };
      this.slots.set(key, s);
    }
    return s;
  }

  private eager(s: DecodeSlot, maxSeqLen: number): void {
    this.dec.forward(s.ws, 1, maxSeqLen);
    this.dec.sample(s.ws);
    s.eagerRuns++;
  }

  private async decode(reqs: Req[]): Promise<void> {
    // The loop only gets here with a step in flight when it was queued for exactly this batch.
    let cur = this.inflight;
    this.inflight = undefined;
    if (!cur) {
      const cache = this.dec.cache;
      const batch: Req[] = [];
      for (const r of reqs) {
        if (r.cancelled) {
          this.finish(r, 'abort');
          continue;
        }
        try {
          cache.grow(r.seq, cache.length(r.seq) + 1);
          batch.push(r);
        } catch (e) {
          this.finish(r, 'error', e as Error);
        }
      }
      if (!batch.length) return;
      cur = this.launch(batch, false);
    }
    // Queue the next step before reading this one's tokens when nothing can change the batch.
    if (this.canRunAhead(cur.batch)) {
      const cache = this.dec.cache;
      for (const r of cur.batch) cache.grow(r.seq, cache.length(r.seq) + 1);
      this.inflight = this.launch(cur.batch, true);
      this.stats.pipelined++;
    }
    await this.settle(cur);
  }

  /** Reads a step's tokens and hands them to its requests (those still running). */
  private async settle(step: Step): Promise<void> {
    const toks = await step.tokens;
    step.batch.forEach((r, b) => {
      if (!r.done) this.accept(r, toks[b]);
    });
  }

  /**
   * Whether this step may replay or capture a graph: the user's setting, and no squeezed context
   * (which attention a step runs then depends on its batch, and the context arrays move when one is
   * added or removed). Graphs captured before a context came stay valid for when the last one goes.
   */
  private get graphsNow(): boolean {
    return this.o.graphs && this.dec.squeezedContexts === 0;
  }

  /**
   * Whether the step after the one in flight may be queued now: graphs settled for this batch
   * size (or graphs off), nobody waiting to join, every request of the batch still running and
   * below its token limit after the token in flight, and room in the cache for one more token each.
   */
  private canRunAhead(batch: Req[]): boolean {
    if (this.closed || this.pending.length || !sameBatch(batch, this.active)) return false;
    const s = this.slots.get(this.slotKey(batch));
    if (!s || (this.graphsNow && !s.graph && !s.captureError)) return false;
    const cache = this.dec.cache;
    let pages = 0;
    for (const r of batch) {
      if (r.done || r.cancelled || r.generated.length + 1 >= r.maxTokens) return false;
      const len = cache.length(r.seq);
      if (len + 1 > cache.maxContext) return false;
      pages += cache.pagesFor(len + 1) - cache.pagesFor(len);
    }
    return pages <= cache.freePages;
  }

  /**
   * Queues one decode step of `batch` (its sequences already grown by the token it appends) and
   * the read of its tokens. `ahead`: queued behind a step whose tokens are not read yet; its input
   * ids are copied on the device from that step's sampled tokens.
   */
  private launch(batch: Req[], ahead: boolean): Step {
    const B = batch.length;
    const s = this.slot(batch);
    const inp = this.dec.inputs(batch.map((r) => r.seq), batch.map((r) => [r.last]), B);
    this.dec.write(s.ws, inp);
    if (ahead) copy(s.ws.ids, s.ws.tokens);
    this.writeSampling(s.ws, batch, ahead ? 1 : 0);
    // One maxSeqLen for eager and graph steps so both run the same kernels.
    const maxSeqLen = this.dec.cache.maxContext;
    this.stats.steps++;
    if (s.graph && this.graphsNow) {
      s.graph.replay();
      this.stats.graphReplays++;
    } else if (this.graphsNow && s.eagerRuns >= 1 && !s.captureError && !ahead) {
      const n = native();
      let graph: NativeGraph | undefined;
      n.captureBegin(this.dec.device);
      try {
        this.dec.forward(s.ws, 1, maxSeqLen);
        this.dec.sample(s.ws);
      } catch (e) {
        s.captureError = e as Error;
      }
      try {
        graph = n.captureEnd(this.dec.device);
      } catch (e) {
        s.captureError ??= e as Error;
      }
      if (s.captureError) {
        this.stats.captureError = s.captureError.message;
        // Capture is an optimisation: this batch size runs eagerly from now on.
        graph?.dispose();
        this.eager(s, maxSeqLen);
      } else {
        s.graph = graph;
        s.graph!.replay();
        this.stats.graphReplays++;
      }
    } else {
      this.eager(s, maxSeqLen);
    }
    const tokens = s.ws.tokens.readback() as Promise<Int32Array>;
    tokens.catch(() => undefined);  // a step dropped at close() is never read: no unhandled rejection
    return { batch: [...batch], tokens };
  }

  /** Takes a sampled token: emits text, checks eos / stop / length. */
  private accept(r: Req, tok: number): void {
    r.counter++;
    if (r.done) return;
    if (r.cancelled) {
      this.finish(r, 'abort');
      return;
    }
    if (this.o.eosTokenIds.includes(tok)) {
      const rest = r.text.slice(r.emitted) + (r.stream?.flush() ?? '');
      if (rest) r.events.push({ id: tok, text: rest });
      this.finish(r, 'eos');
      return;
    }
    r.generated.push(tok);
    r.last = tok;
    r.text += r.stream?.push(tok) ?? '';
    // Stop strings: end before the first occurrence; hold back a possible prefix of one.
    let end = r.text.length;
    let stopped = false;
    for (const s of r.stop) {
      const i = r.text.indexOf(s, Math.max(0, r.emitted - s.length + 1));
      if (i >= 0 && i < end) {
        end = i;
        stopped = true;
      }
    }
    if (!stopped) {
      for (const s of r.stop)
        for (let n = Math.min(s.length - 1, r.text.length); n > 0; n--)
          if (r.text.endsWith(s.slice(0, n))) {
            end = Math.min(end, r.text.length - n);
            break;
          }
    }
    const lengthDone = r.generated.length >= r.maxTokens;
    let piece = r.text.slice(r.emitted, Math.max(end, r.emitted));
    r.emitted = Math.max(end, r.emitted);
    if (lengthDone && !stopped) {
      piece += r.text.slice(r.emitted) + (r.stream?.flush() ?? '');
      r.emitted = r.text.length;
    }
    r.events.push({ id: tok, text: piece });
    if (stopped) this.finish(r, 'stop');
    else if (lengthDone) this.finish(r, 'length');
    else r.wake?.();
  }

  /** Stops everything: requests end with ERR_DISPOSED; waits for the step in flight. */
  async close(): Promise<void> {
    this.closed = true;
    const err = new SqueezeError('ERR_DISPOSED', 'model was disposed while generating');
    for (const r of [...this.pending, ...this.active]) this.finish(r, 'error', err);
    if (this.running) await this.running.catch(() => undefined);
    // A step queued ahead is still read, so its workspace is not released under it.
    if (this.inflight) await this.inflight.tokens.catch(() => undefined);
    this.inflight = undefined;
    for (const s of this.slots.values()) {
      s.graph?.dispose();
      s.ws.dispose();
    }
    this.slots.clear();
  }
}

/** Whether two batches hold the same requests in the same order. */
function sameBatch(a: Req[], b: Req[]): boolean {
  return a.length === b.length && a.every((r, i) => r === b[i]);
}

/** Collects one request's stream into a result (errors become finishReason 'error'). */
export async function collect(it: GenerationStream): Promise<GenerateResult> {
  const ids: number[] = [];
  let text = '';
  try {
    for await (const e of it) {
      ids.push(e.id);
      text += e.text;
    }
  } catch (e) {
    return { ids, text, finishReason: isSqueezeError(e, 'ERR_DISPOSED') ? 'abort' : 'error', error: e as Error };
  }
  return { ids, text, finishReason: it.finishReason ?? 'abort' };
}
