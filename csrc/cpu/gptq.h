// Error compensation with table refits for the SqueezeLLM quantizer (after GPTQ and GPTVQ),
// CPU only: the quantizer runs once per model, on the host.
#pragma once
#include "../core/tensor.h"

namespace sqz::cpu {

// Per row n of w f32 [N,K], in the column order perm i32 [K] (column perm[i] is coded i-th),
// with h f32 [K,K] the damped second moment E[x xᵀ] of the input and u f32 [K,K] the upper
// factor of h⁻¹ = uᵀ u, both already in that order. Starts from lut f32 [N,E] and codes u8 [N,K]
// (k-means); out u8 [N,K] marks the weights kept exact (outliers). Minimises dᵀ h d, d = w − q:
//   optimise the outlier values; then `rounds` times: code the columns in order to the nearest
//   centroid with GPTQ error feedback, refit the table (least squares under h), optimise the
//   outlier values; keeping the best state seen.
// Writes lut, codes (original column order), q f32 [N,K] (what each weight stands for: its
// centroid, or the exact outlier value) and err f32 [N,2] (dᵀ h d before and after).
void gptq_refit_rows(const Tensor& lut, const Tensor& codes, const Tensor& q, const Tensor& err, const Tensor& w,
                     const Tensor& out, const Tensor& h, const Tensor& u, const Tensor& perm, int rounds);

// GPTQ's factor of a calibration second moment h f64 [K,K] (row-major, symmetric; ts/quant/gptq.ts
// gptqFactor is the reference). Writes perm [K] (column perm[i] is coded i-th: descending h_kk with
// act_order, ties to the lower column, a NaN diagonal last; identity without), a [K,K] = h in that
// order, damped (dead channels, h_kk <= 0, get a zero row and column and the mean diagonal; then
// damp x the mean diagonal on every diagonal entry), and u [K,K], upper, with a⁻¹ = uᵀ u.
// The reference inverts a and factors the inverse (four K³-order passes); here u comes from one
// Cholesky of a in reversed order, a = v vᵀ with v upper (so a⁻¹ = v⁻ᵀ v⁻¹ and u = v⁻¹), and one
// triangular inverse: a third of the work, blocked and on all cores. Each element is computed by one
// thread in a fixed order, so the result does not depend on the thread count.
void gptq_factor(const double* h, int64_t K, double damp, bool act_order, int32_t* perm, double* a, double* u);

}  // namespace sqz::cpu
