// The JS handle of a native tensor. Type-tagged so a forged object is rejected, idempotent
// dispose, finalizer as a safety net, and its bytes reported to V8 while it owns storage.
#pragma once
#include <napi.h>

#include "../core/tensor.h"

namespace sqz::napi {

class JsTensor : public Napi::ObjectWrap<JsTensor> {
 public:
  static Napi::Function Init(Napi::Env env);
  static Napi::Object Wrap(Napi::Env env, Tensor t);
  // Unwraps a tensor argument; throws ERR_ARG (not a tensor) or ERR_DISPOSED.
  static Tensor& From(Napi::Value v, const char* what);
  static bool Is(Napi::Value v);

  explicit JsTensor(const Napi::CallbackInfo& info);
  ~JsTensor();

  Tensor tensor;
  bool disposed = false;

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value GetDtype(const Napi::CallbackInfo& info);
  Napi::Value GetShape(const Napi::CallbackInfo& info);
  Napi::Value GetDevice(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
  Napi::Value GetByteLength(const Napi::CallbackInfo& info);
  Napi::Value ToHost(const Napi::CallbackInfo& info);
  Napi::Value Readback(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value To(const Napi::CallbackInfo& info);
  void release(Napi::Env env);
  int64_t reported_ = 0;
};

}  // namespace sqz::napi
