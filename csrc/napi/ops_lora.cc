// Binding of the batched LoRA op (csrc/cpu/lora.h, csrc/kernels/lora).
#include <optional>
#include <string>

#include "../cpu/lora.h"
#include "op.h"
#ifdef SQUEEZELM_WITH_CUDA
#include "../kernels/lora/lora.h"
#endif

namespace sqz::napi {

static int64_t lora_workspace_floats(int64_t T, int64_t R) { return T * (R < cpu::kLoraMaxRank ? R : cpu::kLoraMaxRank); }

// loraApply(y[T,N], x[T,K], slots i32[T], A[R,K], Bt[R,N], desc i32[S,2], scale f32[S]):
// y[t] += scale[s] * Bt[off:off+rank]^T (A[off:off+rank] x[t]) for s = slots[t] and
// (off, rank) = desc[s]; rows whose slot or entry is out of range are left as they are.
// workspace? f32[T * min(R, kLoraMaxRank)] (CUDA: the rank products between the two kernels; without
// one a grow-only scratch of the device is used, which a graph capture may not allocate).
SQZ_OP(loraApply) {
  Args a(info, "loraApply");
  Tensor y = a.tensor(0, "y"), x = a.tensor(1, "x"), slots = a.tensor(2, "slots"), A = a.tensor(3, "A"), bt = a.tensor(4, "Bt"),
         desc = a.tensor(5, "desc"), scale = a.tensor(6, "scale");
  for (auto [t, n] : {std::pair{&y, "y"}, {&x, "x"}, {&A, "A"}, {&bt, "Bt"}}) a.dtype_in(*t, n, {DType::F32, DType::F16, DType::BF16});
  a.dtype_in(slots, "slots", {DType::I32});
  a.dtype_in(desc, "desc", {DType::I32});
  a.dtype_in(scale, "scale", {DType::F32});
  a.same_device({{&y, "y"}, {&x, "x"}, {&slots, "slots"}, {&A, "A"}, {&bt, "Bt"}, {&desc, "desc"}, {&scale, "scale"}});
  a.ndim(y, "y", 2);
  a.ndim(x, "x", 2);
  a.ndim(A, "A", 2);
  a.ndim(bt, "Bt", 2);
  a.shape_is(y, "y", {x.dim(0), -1});
  a.shape_is(slots, "slots", {x.dim(0)});
  a.shape_is(A, "A", {-1, x.dim(1)});
  a.shape_is(bt, "Bt", {A.dim(0), y.dim(1)});
  a.ndim(desc, "desc", 2);
  a.shape_is(desc, "desc", {-1, 2});
  a.shape_is(scale, "scale", {desc.dim(0)});
  if (y.device.is_cuda())
    for (auto [t, n] : {std::pair{&x, "x"}, {&A, "A"}, {&bt, "Bt"}})
      if (t->dtype != y.dtype)
        a.error("ERR_DTYPE", std::string("on CUDA ") + n + " (" + dtype_name(t->dtype) + ") must have y's dtype (" + dtype_name(y.dtype) + ")");
  std::optional<Tensor> ws = a.opt_tensor(7, "workspace");
  if (ws && y.device.is_cuda()) a.workspace(*ws, y, lora_workspace_floats(x.dim(0), A.dim(0)), "loraWorkspaceSize");
#ifdef SQUEEZELM_WITH_CUDA
  if (!ws && y.device.is_cuda() && cuda_capturing(y.device.index))
    a.error("ERR_STATE", "pass a workspace tensor (loraWorkspaceSize) when capturing a graph");
#endif
  dispatch(y.device, "loraApply", [=] { cpu::lora_apply(y, x, slots, A, bt, desc, scale); },
           [&](int dev) { CUDA_ONLY(cuda::lora_apply(y, x, slots, A, bt, desc, scale, ws ? &*ws : nullptr, cuda_stream(dev))); });
  return a.env().Undefined();
}

// loraWorkspaceSize(rows, poolRankRows): the f32 elements of loraApply's workspace (0 on CPU).
SQZ_OP(loraWorkspaceSize) {
  Args a(info, "loraWorkspaceSize");
  const int64_t T = a.integer(0, "rows"), R = a.integer(1, "poolRankRows");
  if (T < 0 || R < 0) a.error("ERR_ARG", "rows and poolRankRows must be >= 0");
  return Napi::Number::New(a.env(), (double)lora_workspace_floats(T, R));
}

}  // namespace sqz::napi
