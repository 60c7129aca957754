// Weighted 1-D k-means per row (the SqueezeLLM quantizer), CPU reference.
#pragma once
#include "../core/tensor.h"

namespace sqz::cpu {

// For each row n of w [N,K]: 2^bits centroids (lut [N, 2^bits] f32, ascending) minimising
// sum_k sens[n,k] * (w[n,k] - lut[n, codes[n,k]])^2, and codes u8 [N,K] = the nearest centroid
// (ties: the lower one). sens is [N,K] or [K] (shared by all rows), >= 0; entries of weight 0
// do not move centroids (outliers kept exactly elsewhere), a row of total weight 0 is treated
// as uniformly weighted. Init: weighted quantiles; then up to `iters` Lloyd iterations (stops
// early when the assignment is stable). Deterministic.
void kmeans_rows(const Tensor& lut, const Tensor& codes, const Tensor& w, const Tensor& sens, int iters);

}  // namespace sqz::cpu
