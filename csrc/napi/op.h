// Defining an op binding:
//
//   SQZ_OP(rmsnorm) {           // exported as native.ops.rmsnorm(out, x, weight, eps)
//     Args a(info, "rmsnorm");
//     Tensor out = a.tensor(0, "out"), x = a.tensor(1, "x"), w = a.tensor(2, "weight");
//     ... checks ...
//     dispatch(x.device, "rmsnorm",
//              [=] { cpu::rmsnorm(out, x, w, eps); },
//              [&](int dev) { CUDA_ONLY(cuda::rmsnorm(out, x, w, eps, cuda_stream(dev))); });
//     return a.env().Undefined();
//   }
//
// Ops register themselves at static-initialisation time, so a family adds a file and
// touches nothing shared.
#pragma once
#include <napi.h>

#include <vector>

#include "args.h"
#include "errors.h"

#ifdef SQUEEZELM_WITH_CUDA
#define CUDA_ONLY(...) __VA_ARGS__
#include "../core/cuda_stream.h"
#else
#define CUDA_ONLY(...) ::sqz::fail("ERR_DEVICE", "this build has no CUDA backend")
#endif

namespace sqz::napi {

using OpFn = Napi::Value (*)(const Napi::CallbackInfo&);
struct OpEntry {
  const char* name;
  OpFn fn;
};
std::vector<OpEntry>& op_registry();
struct OpRegistrar {
  OpRegistrar(const char* name, OpFn fn) { op_registry().push_back({name, fn}); }
};

}  // namespace sqz::napi

#define SQZ_OP(name)                                                                          \
  static Napi::Value sqz_op_body_##name(const Napi::CallbackInfo& info);                     \
  static Napi::Value sqz_op_##name(const Napi::CallbackInfo& info) {                         \
    return ::sqz::napi::guarded(info, [&] { return sqz_op_body_##name(info); });              \
  }                                                                                           \
  static ::sqz::napi::OpRegistrar sqz_op_reg_##name(#name, sqz_op_##name);                   \
  static Napi::Value sqz_op_body_##name(const Napi::CallbackInfo& info)
