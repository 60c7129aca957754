/**
 * Squeezed Attention's offline step: the keys of a fixed context, per kv head, clustered with
 * k-means (k-means++ seeding from a fixed seed, Lloyd iterations, fp32 on the host), and the
 * cluster index the decode op reads (csrc/cpu/squeezed.h): centroids [Hkv, C, D], clusterStart
 * [Hkv, C + 1], clusterTokens [Hkv, P] (each cluster's token positions, ascending).
 */
import { SqueezeError } from '../errors';
import { mulberry32 } from '../util/random';
import { Tensor } from '../tensor';
import { matmul } from '../ops/gemm';
import { argmax, gatherRows } from '../ops/elementwise';

export interface ClusterIndex {
  clusters: number;
  /** f32 [Hkv * C * D] */
  centroids: Float32Array;
  /** i32 [Hkv * (C + 1)] */
  clusterStart: Int32Array;
  /** i32 [Hkv * P] */
  clusterTokens: Int32Array;
}

/** Lloyd's update: each centroid to the mean of its points (an emptied cluster keeps its centroid). sums/counts: scratch. */
function moveToMeans(points: Float32Array, D: number, assign: Int32Array, cen: Float32Array, sums: Float64Array, counts: Int32Array): void {
  const k = counts.length;
  sums.fill(0);
  counts.fill(0);
  for (let i = 0; i < assign.length; i++) {
    const c = assign[i];
    counts[c]++;
    for (let d = 0; d < D; d++) sums[c * D + d] += points[i * D + d];
  }
  for (let c = 0; c < k; c++) if (counts[c] > 0) for (let d = 0; d < D; d++) cen[c * D + d] = sums[c * D + d] / counts[c];
}

/**
 * k-means of n points of dimension D (points [n * D]) into k clusters: k-means++ seeding, then up
 * to `iterations` Lloyd steps (stops when no assignment changes). An emptied cluster keeps its
 * centroid. Returns the centroids [k * D] and each point's cluster.
 */
export function kmeans(points: Float32Array, n: number, D: number, k: number, iterations = 20, seed = 1): { centroids: Float32Array; assign: Int32Array } {
  if (!Number.isInteger(k) || k < 1 || k > n) throw new SqueezeError('ERR_ARG', `kmeans: ${k} clusters for ${n} points`);
  const r = mulberry32(seed), cen = new Float32Array(k * D), assign = new Int32Array(n).fill(-1);
  const d2 = new Float64Array(n).fill(Infinity);
  const dist = (i: number, c: number) => {
    let s = 0;
    for (let d = 0; d < D; d++) {
      const x = points[i * D + d] - cen[c * D + d];
      s += x * x;
    }
    return s;
  };
  // k-means++: each next seed drawn with probability proportional to the squared distance to the nearest
  let first = Math.min(n - 1, Math.floor(r() * n));
  cen.set(points.subarray(first * D, first * D + D), 0);
  for (let c = 1; c < k; c++) {
    let total = 0;
    for (let i = 0; i < n; i++) {
      d2[i] = Math.min(d2[i], dist(i, c - 1));
      total += d2[i];
    }
    let pick = n - 1;
    if (total > 0) {
      let u = r() * total;
      for (let i = 0; i < n; i++) {
        u -= d2[i];
        if (u <= 0) {
          pick = i;
          break;
        }
      }
    } else pick = c % n;
    first = pick;
    cen.set(points.subarray(pick * D, pick * D + D), c * D);
  }
  const sums = new Float64Array(k * D), counts = new Int32Array(k);
  for (let it = 0; it < iterations; it++) {
    let changed = 0;
    for (let i = 0; i < n; i++) {
      let best = 0, bd = Infinity;
      for (let c = 0; c < k; c++) {
        const x = dist(i, c);
        if (x < bd) {
          bd = x;
          best = c;
        }
      }
      if (assign[i] !== best) {
        assign[i] = best;
        changed++;
      }
    }
    if (changed === 0 && it > 0) break;
    moveToMeans(points, D, assign, cen, sums, counts);
  }
  return { centroids: cen, assign };
}

/** One head's index from its tokens' clusters: start [k + 1] offsets, tokens [P] by cluster, ascending. */
function listClusters(assign: Int32Array, k: number, start: Int32Array, tokens: Int32Array): void {
  const counts = new Int32Array(k);
  for (let t = 0; t < assign.length; t++) counts[assign[t]]++;
  start[0] = 0;
  for (let c = 0; c < k; c++) start[c + 1] = start[c] + counts[c];
  const fill = Int32Array.from(start.subarray(0, k));
  for (let t = 0; t < assign.length; t++) tokens[fill[assign[t]]++] = t;
}

/**
 * The cluster index of a context's keys: keys [P, Hkv, D] (post-RoPE, as attention sees them),
 * C clusters per kv head.
 */
export function clusterKeys(keys: Float32Array, P: number, Hkv: number, D: number, C: number, iterations = 20): ClusterIndex {
  if (keys.length !== P * Hkv * D) throw new SqueezeError('ERR_SHAPE', `clusterKeys: ${keys.length} values for [${P}, ${Hkv}, ${D}]`);
  const k = Math.min(C, P);
  const centroids = new Float32Array(Hkv * k * D), clusterStart = new Int32Array(Hkv * (k + 1)), clusterTokens = new Int32Array(Hkv * P);
  const pts = new Float32Array(P * D);
  for (let g = 0; g < Hkv; g++) {
    for (let t = 0; t < P; t++) pts.set(keys.subarray((t * Hkv + g) * D, (t * Hkv + g + 1) * D), t * D);
    const { centroids: cg, assign } = kmeans(pts, P, D, k, iterations, 1 + g);
    centroids.set(cg, g * k * D);
    listClusters(assign, k, clusterStart.subarray(g * (k + 1), (g + 1) * (k + 1)), clusterTokens.subarray(g * P, (g + 1) * P));
  }
  return { clusters: k, centroids, clusterStart, clusterTokens };
}

/**
 * k-means of n points [n, D] (a device tensor in a float dtype) with the distances on that device:
 * per iteration one matmul of the points against the centroids (x·c - |c|²/2, argmax = the nearest
 * centroid) and the new centroids as means on the host. For contexts where the host loop of
 * `kmeans` (n·k·D per iteration in JavaScript) would take minutes. Points are scaled by their
 * largest norm first, so half-precision products stay in range. Seeds: k distinct points drawn at
 * random (k-means++ would cost the host loop it avoids). An emptied cluster keeps its centroid.
 */
export async function kmeansOnDevice(points: Tensor, k: number, iterations = 20, seed = 1): Promise<{ centroids: Float32Array; assign: Int32Array }> {
  const [n, D] = points.shape;
  if (!Number.isInteger(k) || k < 1 || k > n) throw new SqueezeError('ERR_ARG', `kmeansOnDevice: ${k} clusters for ${n} points`);
  const device = points.device, dtype = points.dtype;
  const host = await points.toFloat32();
  let s = 0;
  for (let i = 0; i < n; i++) {
    let q = 0;
    for (let d = 0; d < D; d++) q += host[i * D + d] * host[i * D + d];
    s = Math.max(s, Math.sqrt(q));
  }
  if (!(s > 0)) s = 1;
  const pn = host.map((x) => x / s);
  const r = mulberry32(seed);
  // k distinct seeds (a partial Fisher-Yates shuffle)
  const order = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = 0; i < k; i++) {
    const j = i + Math.floor(r() * (n - i));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const cen = new Float32Array(k * D);
  for (let c = 0; c < k; c++) cen.set(pn.subarray(order[c] * D, order[c] * D + D), c * D);
  const X = Tensor.from(pn, [n, D], { dtype, device });
  const scores = Tensor.empty([n, k], { dtype, device }), idx = Tensor.empty([n], { dtype: 'i32', device });
  let assign = new Int32Array(n).fill(-1);
  const sums = new Float64Array(k * D), counts = new Int32Array(k);
  try {
    for (let it = 0; it < iterations; it++) {
      const bias = new Float32Array(k);
      for (let c = 0; c < k; c++) {
        let q = 0;
        for (let d = 0; d < D; d++) q += cen[c * D + d] * cen[c * D + d];
        bias[c] = -0.5 * q;
      }
      const C = Tensor.from(cen, [k, D], { dtype, device }), B = Tensor.from(bias, [k], { dtype, device });
      try {
        matmul(scores, X, C, B);
        argmax(idx, scores);
        const next = Int32Array.from((await idx.toArray()) as Int32Array);
        let changed = 0;
        for (let i = 0; i < n; i++) if (next[i] !== assign[i]) changed++;
        assign = next;
        if (changed === 0) break;
      } finally {
        C.dispose();
        B.dispose();
      }
      moveToMeans(pn, D, assign, cen, sums, counts);
    }
  } finally {
    X.dispose();
    scores.dispose();
    idx.dispose();
  }
  return { centroids: cen.map((x) => x * s), assign };
}

/** clusterKeys with the distances on the keys' device (kmeansOnDevice); keys [P * Hkv, D] token-major, any float dtype. */
export async function clusterKeysOnDevice(keys: Tensor, P: number, Hkv: number, C: number, iterations = 20): Promise<ClusterIndex> {
  const D = keys.shape[1];
  if (keys.shape.length !== 2 || keys.shape[0] !== P * Hkv) throw new SqueezeError('ERR_SHAPE', `clusterKeysOnDevice: keys [${keys.shape}] for [${P} x ${Hkv}, D]`);
  const k = Math.min(C, P);
  const centroids = new Float32Array(Hkv * k * D), clusterStart = new Int32Array(Hkv * (k + 1)), clusterTokens = new Int32Array(Hkv * P);
  const pts = Tensor.empty([P, D], { dtype: keys.dtype, device: keys.device });
  try {
    for (let g = 0; g < Hkv; g++) {
      const rows = Tensor.from(Int32Array.from({ length: P }, (_, t) => t * Hkv + g), [P], { device: keys.device });
      gatherRows(pts, keys, rows);
      rows.dispose();
      const { centroids: cg, assign } = await kmeansOnDevice(pts, k, iterations, 1 + g);
      centroids.set(cg, g * k * D);
      listClusters(assign, k, clusterStart.subarray(g * (k + 1), (g + 1) * (k + 1)), clusterTokens.subarray(g * P, (g + 1) * P));
    }
  } finally {
    pts.dispose();
  }
  return { clusters: k, centroids, clusterStart, clusterTokens };
}
