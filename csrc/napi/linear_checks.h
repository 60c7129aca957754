// Argument checks shared by the bindings of the fused linear ops (fusedLinear, linearRopeAppend).
#pragma once
#include <cstdint>
#include <optional>

#include "args.h"

namespace sqz::napi {

struct LinearShape {
  int64_t M, K, N;
};

// The operands of y = epilogue(rmsnorm?(x) · wᵀ + bias): x [M, K], w [N, K] (n < 0: N is w's own
// row count), bias [N], gamma [K] (the RMSNorm weight), eps finite and >= 0; all on out's device.
// CPU takes f32/f16/bf16 in any mix; CUDA one of f16/bf16 for x, w, bias, gamma and out alike, and
// at most `cuda_rows` rows (ERR_UNSUPPORTED beyond).
LinearShape check_linear_operands(const Args& a, const Tensor& out, const char* out_name, const Tensor& x,
                                  const Tensor& w, const std::optional<Tensor>& bias,
                                  const std::optional<Tensor>& gamma, double eps, int64_t n, int64_t cuda_rows);

// The operands of a SqueezeLLM matmul (lutMatmulPacked, lutRopeAppend): x [M, K], codes in the packed
// layout of an N-row weight (N = lut's rows), lut [N, 2^bits], the outlier CSR (all three or none), a
// pair half that pairs N rows (0: none); all on x's device. Returns N.
int64_t check_lut_operands(const Args& a, const Tensor& x, const Tensor& codes, const Tensor& lut,
                           const std::optional<Tensor>& rows, const std::optional<Tensor>& cols,
                           const std::optional<Tensor>& vals, int64_t bits, int64_t pair_half);

// Whether the bytes of a and b overlap (an output that a kernel writes while it reads the other).
bool overlap(const Tensor& a, const Tensor& b);

// The RMSNorm fused in front of a SqueezeLLM matmul: gamma [K] on x's device (x's dtype on CUDA; f32,
// f16 or bf16 on the CPU), eps finite and >= 0.
void check_lut_norm(const Args& a, const Tensor& x, const std::optional<Tensor>& gamma, double eps);

}  // namespace sqz::napi
