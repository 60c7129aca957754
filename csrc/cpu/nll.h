// Next-token negative log-likelihood of logits rows on the host, for perplexity and the KV
// calibration's loss measurements (their logits are read back to the host).
#pragma once
#include <cstdint>

namespace sqz::cpu {

// out[r] = -log softmax(logits[r*V .. r*V + V))[targets[r]] for r < rows, in double, max-shifted:
// m + log(sum_v exp(x_v - m)) - x_target with the sum taken in v order (the same arithmetic, step
// for step, as the TypeScript reference tokenNll in ts/runtime/ppl.ts). Rows run in parallel;
// each row's sum is sequential, so the result does not depend on the thread count.
// Targets must lie in [0, V) (the caller checks).
void token_nll(const float* logits, int64_t V, const int32_t* targets, int64_t rows, double* out);

}  // namespace sqz::cpu
