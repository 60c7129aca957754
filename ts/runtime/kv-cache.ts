/**
 * Paged KV cache: per layer a page pool k, v [pages, pageSize, kvHeads, headDim]; one page
 * allocator (free list) shared by all layers; per-sequence page tables. A sequence owns the
 * pages its length needs; finishing or aborting it returns them to the pool. fork() starts a
 * sequence on another's first tokens: their full pages are shared (counted references, never
 * written again, since a sequence only appends past its own start), a partial last page is copied.
 * With `storage: false` the cache only allocates pages and sequence slots: a quantized
 * cache (runtime/kvq-attention.ts) keeps its own per-layer page pools indexed by the same
 * page numbers, and its fp16 sink rows by each sequence's slot.
 */
import { SqueezeError } from '../errors';
import { DType, Tensor } from '../tensor';
import { copyRange } from '../ops/basic';

export interface KVCacheOptions {
  device: string;
  dtype: DType;
  numLayers: number;
  numKvHeads: number;
  headDim: number;
  /** Tokens per page (default 16). */
  pageSize?: number;
  /** The longest sequence (positions) any sequence may reach. */
  maxContext: number;
  /** Pages in the pool (default: maxSequences full-length sequences). */
  numPages?: number;
  maxSequences?: number;
  /** Allocate the fp16 k/v page pools (default true). */
  storage?: boolean;
  /**
   * Sequence slots (0..slots-1), one held by each live sequence (default: unlimited, no
   * slots). createSequence fails with ERR_BUSY when all are taken.
   */
  slots?: number;
}

interface Sequence {
  pages: number[];
  length: number;
  slot: number;
}

/**
 * Storage kept outside the fp16 pools but indexed by this cache's pages and slots (a quantized
 * cache): fork() asks it to copy a partial page and the parent's slot rows.
 */
export interface PageStore {
  copyPage(from: number, to: number): void;
  copySlot(from: number, to: number): void;
}

export class KVCache {
  readonly pageSize: number;
  readonly numPages: number;
  readonly maxContext: number;
  /** Page-table width: pages of one full-length sequence. */
  readonly maxPagesPerSeq: number;
  readonly k: Tensor[] = [];
  readonly v: Tensor[] = [];
  private freeList: number[] = [];
  /** Sequences holding each page (a page is free at 0). */
  private readonly refs: Int32Array;
  private freeSlots: number[] | undefined;
  private readonly stores: PageStore[] = [];
  private seqs = new Map<number, Sequence>();
  private nextId = 1;
  private disposed = false;

  constructor(o: KVCacheOptions) {
    this.pageSize = o.pageSize ?? 16;
    this.maxContext = o.maxContext;
    this.maxPagesPerSeq = Math.ceil(o.maxContext / this.pageSize);
    this.numPages = o.numPages ?? this.maxPagesPerSeq * (o.maxSequences ?? 1);
    if (!(this.numPages > 0)) throw new SqueezeError('ERR_ARG', `KV cache: ${this.numPages} pages`);
    const shape = [this.numPages, this.pageSize, o.numKvHeads, o.headDim];
    if (o.slots !== undefined) {
      if (!Number.isInteger(o.slots) || o.slots < 1) throw new SqueezeError('ERR_ARG', `KV cache: slots must be a positive integer, got ${o.slots}`);
      this.freeSlots = [];
      for (let i = o.slots - 1; i >= 0; i--) this.freeSlots.push(i);
    }
    try {
      for (let l = 0; l < (o.storage === false ? 0 : o.numLayers); l++) {
        this.k.push(Tensor.empty(shape, { dtype: o.dtype, device: o.device }));
        this.v.push(Tensor.empty(shape, { dtype: o.dtype, device: o.device }));
      }
    } catch (e) {
      this.dispose();
      throw e;
    }
    for (let p = this.numPages - 1; p >= 0; p--) this.freeList.push(p);
    this.refs = new Int32Array(this.numPages);
  }

  get freePages(): number {
    return this.freeList.length;
  }

  get bytes(): number {
    return this.k.reduce((a, t) => a + 2 * t.byteLength, 0);
  }

  /** Pages needed for `length` tokens. */
  pagesFor(length: number): number {
    return Math.ceil(length / this.pageSize);
  }

  createSequence(): number {
    if (this.disposed) throw new SqueezeError('ERR_DISPOSED', 'KV cache is disposed');
    let slot = -1;
    if (this.freeSlots) {
      if (!this.freeSlots.length) throw new SqueezeError('ERR_BUSY', 'KV cache: every sequence slot is in use');
      slot = this.freeSlots.pop()!;
    }
    const id = this.nextId++;
    this.seqs.set(id, { pages: [], length: 0, slot });
    return id;
  }

  /** The slot a sequence holds (-1 when the cache has no slots). */
  slot(seq: number): number {
    return this.get(seq).slot;
  }

  /** Sequence slots free now (Infinity when the cache has no slots). */
  get freeSequenceSlots(): number {
    return this.freeSlots ? this.freeSlots.length : Infinity;
  }

  has(seq: number): boolean {
    return this.seqs.has(seq);
  }

  length(seq: number): number {
    return this.get(seq).length;
  }

  private get(seq: number): Sequence {
    const s = this.seqs.get(seq);
    if (!s) throw new SqueezeError('ERR_STATE', `KV cache: no sequence ${seq}`);
    return s;
  }

  /** Whether `extra` more tokens fit (pages and context), without taking anything. */
  canGrow(seq: number, extra: number): boolean {
    const s = this.get(seq);
    const n = s.length + extra;
    return n <= this.maxContext && this.pagesFor(n) - s.pages.length <= this.freeList.length;
  }

  /**
   * Grows a sequence to `length` tokens, taking pages as needed. Past the context or out of
   * pages: ERR_CONTEXT_LENGTH, and the sequence keeps what it had.
   */
  grow(seq: number, length: number): void {
    const s = this.get(seq);
    if (length > this.maxContext)
      throw new SqueezeError('ERR_CONTEXT_LENGTH', `sequence of ${length} tokens is longer than the context (${this.maxContext})`);
    const need = this.pagesFor(length) - s.pages.length;
    if (need > this.freeList.length)
      throw new SqueezeError('ERR_CONTEXT_LENGTH', `KV cache is full: ${length} tokens need ${need} more pages, ${this.freeList.length} free`);
    for (let i = 0; i < need; i++) {
      const p = this.freeList.pop()!;
      this.refs[p] = 1;
      s.pages.push(p);
    }
    s.length = Math.max(s.length, length);
  }

  /** Storage that fork() must copy along with the fp16 pools (see PageStore). */
  addPageStore(store: PageStore): void {
    this.stores.push(store);
  }

  /**
   * A new sequence holding the first `length` tokens of `parent`: their full pages shared, a
   * partial last page copied into a page of its own (k and v of every layer, and of every page
   * store), the parent's slot rows copied to the new sequence's slot. Needs the fp16 pages
   * (storage) or a page store; ERR_CONTEXT_LENGTH when no page is free for the copy.
   */
  fork(parent: number, length: number): number {
    const src = this.get(parent);
    if (!Number.isInteger(length) || length < 1 || length > src.length)
      throw new SqueezeError('ERR_ARG', `KV cache: cannot fork ${length} tokens of a sequence of ${src.length}`);
    if (!this.k.length && !this.stores.length) throw new SqueezeError('ERR_UNSUPPORTED', 'KV cache: forking needs the fp16 page pools or a page store');
    const full = Math.floor(length / this.pageSize), partial = length % this.pageSize !== 0;
    if (partial && !this.freeList.length) throw new SqueezeError('ERR_CONTEXT_LENGTH', 'KV cache is full: no page for a forked sequence');
    const id = this.createSequence();
    const s = this.get(id);
    for (let i = 0; i < full; i++) {
      this.refs[src.pages[i]]++;
      s.pages.push(src.pages[i]);
    }
    if (partial) {
      const p = this.freeList.pop()!, q = src.pages[full];
      this.refs[p] = 1;
      s.pages.push(p);
      for (const pool of [this.k, this.v])
        for (const t of pool) {
          const n = t.numel / this.numPages;  // elements per page
          copyRange(t, p * n, t, q * n, n);
        }
      for (const st of this.stores) st.copyPage(q, p);
    }
    if (src.slot >= 0 && s.slot >= 0) for (const st of this.stores) st.copySlot(src.slot, s.slot);
    s.length = length;
    return id;
  }

  /** Pages a sequence shares with others (for tests and stats). */
  sharedPages(seq: number): number {
    return this.get(seq).pages.filter((p) => this.refs[p] > 1).length;
  }

  /** Writes this sequence's page table into `out` at `offset` (maxPagesPerSeq entries). */
  writePageTable(seq: number, out: Int32Array, offset: number): void {
    const s = this.get(seq);
    for (let i = 0; i < this.maxPagesPerSeq; i++) out[offset + i] = i < s.pages.length ? s.pages[i] : 0;
  }

  /** Returns a sequence's pages to the pool. Idempotent. */
  free(seq: number): void {
    const s = this.seqs.get(seq);
    if (!s) return;
    for (const p of s.pages) if (--this.refs[p] === 0) this.freeList.push(p);
    if (this.freeSlots && s.slot >= 0) this.freeSlots.push(s.slot);
    this.seqs.delete(seq);
  }

  get sequences(): number {
    return this.seqs.size;
  }

  dispose(): void {
    this.disposed = true;
    this.k.forEach((t) => t.dispose());
    this.v.forEach((t) => t.dispose());
    this.seqs.clear();
    this.freeList = [];
  }
}
