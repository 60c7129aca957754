// 1-D (weighted) k-means of the KV quantizer's codebooks on the host, the native form of
// kmeans1d / kmeans1dWeighted in ts/quant/kvquant.ts (the same steps in the same order, so the
// same codebook bit for bit).
#pragma once
#include <cstdint>

namespace sqz::cpu {

// Lloyd iterations over the n samples x (weights w >= 0, or all 1 when w is null) from the E entries
// of init, written to out[E] (float32, clamped to [-1, 1], sorted). The samples are taken in
// increasing order, equal values (-0 and +0 alike) in index order; each sample goes to the last of
// the nearest entries as a walk up the sorted entries finds it; an entry left without samples
// stays; the walk stops after `iterations` or once no entry moves by 1e-7. A result whose entries
// are not strictly increasing is replaced by init. With n < E, out = init.
void kmeans_1d(const float* x, const float* w, int64_t n, const float* init, int E, int iterations, float* out);

}  // namespace sqz::cpu
