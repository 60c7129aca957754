#include "errors.h"

namespace sqz::napi {

static Napi::FunctionReference* g_error_ctor = nullptr;

void set_error_class(Napi::Env env, Napi::Function ctor) {
  (void)env;
  if (!g_error_ctor) g_error_ctor = new Napi::FunctionReference();
  *g_error_ctor = Napi::Persistent(ctor);
}

Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& message) {
  if (g_error_ctor && !g_error_ctor->IsEmpty()) {
    Napi::Object e = g_error_ctor->New({Napi::String::New(env, code), Napi::String::New(env, message)});
    return Napi::Error(env, e);
  }
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  e.Set("name", Napi::String::New(env, "SqueezeError"));
  return e;
}

}  // namespace sqz::napi
