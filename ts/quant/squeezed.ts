/**
 * Squeezed Attention's offline step: the keys of a fixed context, per kv head, clustered with
 * k-means (k-means++ seeding from a fixed seed, Lloyd iterations, fp32 on the host), and the
 * cluster index the decode op reads (csrc/cpu/squeezed.h): centroids [Hkv, C, D], clusterStart
 * [Hkv, C + 1], clusterTokens [Hkv, P] (each cluster's token positions, ascending).
 */
import { SqueezeError } from '../errors';
import { mulberry32 } from '../util/random';

export interface ClusterIndex {
  clusters: number;
  /** f32 [Hkv * C * D] */
  centroids: Float32Array;
  /** i32 [Hkv * (C + 1)] */
  clusterStart: Int32Array;
  /** i32 [Hkv * P] */
  clusterTokens: Int32Array;
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
    sums.fill(0);
    counts.fill(0);
    for (let i = 0; i < n; i++) {
      const c = assign[i];
      counts[c]++;
      for (let d = 0; d < D; d++) sums[c * D + d] += points[i * D + d];
    }
    for (let c = 0; c < k; c++) if (counts[c] > 0) for (let d = 0; d < D; d++) cen[c * D + d] = sums[c * D + d] / counts[c];
  }
  return { centroids: cen, assign };
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
    const counts = new Int32Array(k);
    for (let t = 0; t < P; t++) counts[assign[t]]++;
    const st = g * (k + 1);
    for (let c = 0; c < k; c++) clusterStart[st + c + 1] = clusterStart[st + c] + counts[c];
    const fill = Int32Array.from(clusterStart.subarray(st, st + k));
    for (let t = 0; t < P; t++) clusterTokens[g * P + fill[assign[t]]++] = t;
  }
  return { clusters: k, centroids, clusterStart, clusterTokens };
}
