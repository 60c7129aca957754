// Batched LoRA on CUDA: the op of csrc/cpu/lora.h (same arguments, same skipping rules).
#pragma once
#include <cuda_runtime.h>

#include "core/tensor.h"

namespace sqz::cuda {

// work: f32 of at least T * min(R, kLoraMaxRank) elements, or null for the device's grow-only scratch.
void lora_apply(const Tensor& y, const Tensor& x, const Tensor& slots, const Tensor& a, const Tensor& bt,
                const Tensor& desc, const Tensor& scale, const Tensor* work, cudaStream_t s);

}  // namespace sqz::cuda
