/**
 * The adapter pool of a model (S-LoRA's serving side, in a simpler form): any number of LoRA
 * adapters are registered on the host; `slots` of them are resident on the device at a time, each
 * slot holding up to `maxRank` rows per layer and site. A request names its adapter; acquire()
 * makes it resident (copying it over the least recently used idle slot when it is not) and pins
 * it while the request runs. Every row of a batch carries its slot (-1: none), so one batched op
 * per linear serves a batch that mixes adapters of different ranks, and a captured decode graph
 * stays valid whichever adapters the next step uses (the slots and the pool are device memory).
 *
 * Per layer and site the pool holds A [slots * maxRank, K] and Bt [slots * maxRank, N] in the
 * activation dtype, and desc i32 [slots, 2] = (first row, rank) of the slot's adapter there (rank 0
 * where it leaves that site alone). Each target's scale is folded into its Bt rows (model/lora.ts).
 */
import { SqueezeError } from '../errors';
import { DType, Tensor } from '../tensor';
import * as ops from '../ops';
import { ModelConfig } from '../model/config';
import { LORA_SITES, LoraAdapter, LoraSite, siteDims } from '../model/lora';
import { float32ToBf16Bits, float32ToF16Bits } from '../util/half';

export interface LoraPoolOptions {
  /** Adapters resident on the device at once (default 4). */
  maxAdapters?: number;
  /** Rows per layer and site one resident adapter may use: the sum of the ranks of the site's targets (q|k|v, gate|up; default 64). */
  maxRank?: number;
}

interface Slot {
  name?: string;
  refs: number;
  lastUse: number;
  /** Bit i: the resident adapter has weights at site LORA_SITES[i] in some layer. */
  sites: number;
}

export class LoraPool {
  readonly slots: number;
  readonly maxRank: number;
  private readonly a: Array<Record<LoraSite, Tensor>> = [];
  private readonly bt: Array<Record<LoraSite, Tensor>> = [];
  /** i32 [layers, sites, slots, 2], and one view per (layer, site). */
  private readonly descAll: Tensor;
  private readonly desc: Array<Record<LoraSite, Tensor>> = [];
  private readonly descHost: Int32Array;
  private readonly scale: Tensor;
  /** Registered adapters, their weights already in the pool's dtype (encoded once, copied in on each swap). */
  private readonly registry = new Map<string, EncodedAdapter>();
  private readonly resident: Slot[];
  private clock = 0;
  private readonly all: Tensor[] = [];

  constructor(private readonly cfg: ModelConfig, readonly device: string, readonly dtype: DType, o: LoraPoolOptions = {}) {
    const posInt = (v: number | undefined, name: string, d: number, max: number) => {
      if (v === undefined) return d;
      if (!Number.isInteger(v) || v < 1 || v > max) throw new SqueezeError('ERR_ARG', `lora.${name} must be an integer in 1..${max}, got ${v}`);
      return v;
    };
    this.slots = posInt(o.maxAdapters, 'maxAdapters', 4, 4096);
    this.maxRank = posInt(o.maxRank, 'maxRank', 64, 1024);
    this.resident = Array.from({ length: this.slots }, () => ({ refs: 0, lastUse: 0, sites: 0 }));
    const dims = siteDims(cfg), S = this.slots, R = S * this.maxRank;
    const mk = (shape: number[], dt: DType = dtype) => {
      const t = Tensor.empty(shape, { dtype: dt, device });
      this.all.push(t);
      return t;
    };
    try {
      for (let l = 0; l < cfg.numLayers; l++) {
        const a = {} as Record<LoraSite, Tensor>, bt = {} as Record<LoraSite, Tensor>;
        for (const site of LORA_SITES) {
          a[site] = mk([R, dims[site].K]);
          bt[site] = mk([R, dims[site].N]);
        }
        this.a.push(a);
        this.bt.push(bt);
      }
      this.descAll = mk([cfg.numLayers, LORA_SITES.length, S, 2], 'i32');
      this.descHost = new Int32Array(cfg.numLayers * LORA_SITES.length * S * 2);
      this.descAll.write(this.descHost);
      for (let l = 0; l < cfg.numLayers; l++) {
        const d = {} as Record<LoraSite, Tensor>;
        LORA_SITES.forEach((site, i) => (d[site] = this.descAll.view((l * LORA_SITES.length + i) * S * 2, [S, 2])));
        this.desc.push(d);
      }
      this.scale = mk([S], 'f32');
      this.scale.write(new Float32Array(S).fill(1));
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  /** Device bytes of the pool. */
  get bytes(): number {
    return this.all.reduce((s, t) => s + t.byteLength, 0);
  }

  /** Registered adapter names. */
  names(): string[] {
    return [...this.registry.keys()];
  }

  has(name: string): boolean {
    return this.registry.has(name);
  }

  /** Adds an adapter under its name (ERR_ARG if the name is taken or a site needs more than maxRank rows). */
  register(ad: LoraAdapter): void {
    if (this.registry.has(ad.name)) throw new SqueezeError('ERR_ARG', `an adapter named '${ad.name}' is already loaded`);
    if (ad.layers.length !== this.cfg.numLayers) throw new SqueezeError('ERR_FORMAT', `adapter '${ad.name}' has ${ad.layers.length} layers, the model ${this.cfg.numLayers}`);
    if (ad.maxSiteRank > this.maxRank)
      throw new SqueezeError('ERR_ARG', `adapter '${ad.name}' needs ${ad.maxSiteRank} rows at one site (the sum of the ranks of q|k|v or gate|up), ` +
        `the pool holds ${this.maxRank} per adapter (loadModel's lora.maxRank; --lora-rank on the command line)`);
    this.registry.set(ad.name, {
      name: ad.name,
      layers: ad.layers.map((sites) => {
        const out: EncodedAdapter['layers'][number] = {};
        for (const site of LORA_SITES) {
          const w = sites[site];
          if (w) out[site] = { rank: w.rank, a: this.encode(w.a), bt: this.encode(w.bt) };
        }
        return out;
      }),
    });
  }

  /** Removes an adapter (ERR_STATE while requests use it). */
  unregister(name: string): void {
    if (!this.registry.has(name)) throw new SqueezeError('ERR_ARG', `no adapter named '${name}' is loaded`);
    const s = this.resident.findIndex((x) => x.name === name);
    if (s >= 0) {
      if (this.resident[s].refs > 0) throw new SqueezeError('ERR_STATE', `adapter '${name}' is in use by ${this.resident[s].refs} request(s)`);
      this.clear(s);
    }
    this.registry.delete(name);
  }

  /** Whether adapter `name` is in a device slot now (acquire then copies nothing). */
  isResident(name: string): boolean {
    return this.resident.some((x) => x.name === name);
  }

  /** Whether acquire(name) would succeed now (resident, or an idle slot to load it into). */
  canAcquire(name: string): boolean {
    return this.resident.some((x) => x.name === name || x.refs === 0);
  }

  /**
   * The slot of adapter `name`, pinned until release(): resident already, or copied into the
   * least recently used idle slot. undefined when every slot is pinned by other adapters.
   */
  acquire(name: string): number | undefined {
    const ad = this.registry.get(name);
    if (!ad) throw new SqueezeError('ERR_ARG', `no adapter named '${name}' is loaded (loaded: ${this.names().join(', ') || 'none'})`);
    let s = this.resident.findIndex((x) => x.name === name);
    if (s < 0) {
      // an idle slot: an empty one first, else the least recently used
      const age = (x: Slot) => (x.name === undefined ? -1 : x.lastUse);
      let best = -1;
      this.resident.forEach((x, i) => {
        if (x.refs === 0 && (best < 0 || age(x) < age(this.resident[best]))) best = i;
      });
      if (best < 0) return undefined;
      s = best;
      this.upload(s, ad);
    }
    this.resident[s].refs++;
    this.resident[s].lastUse = ++this.clock;
    return s;
  }

  release(slot: number): void {
    const x = this.resident[slot];
    if (!x || x.refs <= 0) throw new SqueezeError('ERR_INTERNAL', `lora pool: slot ${slot} released more often than acquired`);
    x.refs--;
  }

  /** Which adapter each slot holds (for stats and tests). */
  residentNames(): Array<string | undefined> {
    return this.resident.map((x) => x.name);
  }

  /**
   * The sites (bit i: LORA_SITES[i]) where the adapter resident in `slot` has weights in some layer;
   * 0 for an empty slot or one out of range. A pass need not run the deltas of the other sites.
   */
  siteMask(slot: number): number {
    return this.resident[slot]?.sites ?? 0;
  }

  /** Rank rows per layer and site (every slot's maxRank rows). */
  get rankRows(): number {
    return this.slots * this.maxRank;
  }

  /**
   * y[t] += the LoRA delta of row t's adapter at (layer, site); rows with slot -1 are left alone.
   * `work`: loraApply's workspace for y's rows (required where the call is captured into a graph).
   */
  apply(l: number, site: LoraSite, y: Tensor, x: Tensor, rowSlots: Tensor, work?: Tensor): void {
    ops.loraApply(y, x, rowSlots, this.a[l][site], this.bt[l][site], this.desc[l][site], this.scale, work);
  }

  private encode(v: Float32Array): ArrayBufferView {
    if (this.dtype === 'f32') return v;
    if (this.dtype === 'f16') return float32ToF16Bits(v);
    if (this.dtype === 'bf16') return float32ToBf16Bits(v);
    throw new SqueezeError('ERR_DTYPE', `lora pool: unsupported dtype ${this.dtype}`);
  }

  private upload(s: number, ad: EncodedAdapter): void {
    const S = this.slots, dims = siteDims(this.cfg), row0 = s * this.maxRank;
    let sites = 0;
    for (let l = 0; l < this.cfg.numLayers; l++) {
      LORA_SITES.forEach((site, i) => {
        const w = ad.layers[l][site], { K, N } = dims[site];
        const at = (l * LORA_SITES.length + i) * S * 2 + 2 * s;
        this.descHost[at] = row0;
        this.descHost[at + 1] = w ? w.rank : 0;
        if (!w) return;
        if (w.rank > 0) sites |= 1 << i;
        const av = this.a[l][site].view(row0 * K, [w.rank, K]), bv = this.bt[l][site].view(row0 * N, [w.rank, N]);
        av.write(w.a);
        bv.write(w.bt);
        av.dispose();
        bv.dispose();
      });
    }
    this.descAll.write(this.descHost);
    this.resident[s].name = ad.name;
    this.resident[s].sites = sites;
  }

  private clear(s: number): void {
    const S = this.slots;
    for (let l = 0; l < this.cfg.numLayers; l++)
      for (let i = 0; i < LORA_SITES.length; i++) this.descHost[(l * LORA_SITES.length + i) * S * 2 + 2 * s + 1] = 0;
    this.descAll.write(this.descHost);
    this.resident[s].name = undefined;
    this.resident[s].sites = 0;
  }

  dispose(): void {
    for (const d of this.desc) for (const t of Object.values(d)) t.dispose();
    this.all.forEach((t) => t.dispose());
    this.all.length = 0;
  }
}

/** An adapter as the pool keeps it: per layer and site, its rank and A / Bt rows in the pool's dtype. */
interface EncodedAdapter {
  name: string;
  layers: Array<Partial<Record<LoraSite, { rank: number; a: ArrayBufferView; bt: ArrayBufferView }>>>;
}
