// Where a packed row lands in a paged cache: rows cu_q[b] .. cu_q[b+1] belong to sequence b and
// sit at positions seq_lens[b] - n_b + j (seq_lens are the lengths after the append). Shared by
// kvAppend and the fused ropeAppend so both map rows the same way.
#pragma once

namespace sqz::cuda {

// Finds the sequence of `row` (binary search for the last b with cu_q[b] <= row) and its
// position. Returns false when the row belongs to no sequence (including B == 0); *pos may
// still be negative for a row whose sequence is shorter than its query count.
__device__ __forceinline__ bool paged_row_position(const int* cu_q, const int* seq_lens, int B, int row, int* seq,
                                                   int* pos) {
  if (B <= 0) return false;
  int lo = 0, hi = B - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(cu_q + mid) <= row) lo = mid;
    else hi = mid - 1;
  }
  const int start = __ldg(cu_q + lo), end = __ldg(cu_q + lo + 1);
  if (row < start || row >= end) return false;
  *seq = lo;
  *pos = __ldg(seq_lens + lo) - (end - start) + (row - start);
  return true;
}

}  // namespace sqz::cuda
