// Turning sqz::Error into a JS SqueezeError (the class the TypeScript layer registers at
// load time), so errors made by native code carry `code` and pass `instanceof` in the
// library's own realm.
#pragma once
#include <napi.h>

#include "../core/error.h"

namespace sqz::napi {

// Registers the JS error class (called once by ts/native.ts).
void set_error_class(Napi::Env env, Napi::Function ctor);
Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& message);

// Runs fn and converts sqz::Error / std::exception into a thrown JS error.
template <class Fn>
Napi::Value guarded(const Napi::CallbackInfo& info, Fn&& fn) {
  try {
    return fn();
  } catch (const Error& e) {
    throw make_error(info.Env(), e.code, e.message);
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw make_error(info.Env(), "ERR_OUT_OF_MEMORY", "host memory exhausted");
  } catch (const std::exception& e) {
    throw make_error(info.Env(), "ERR_INTERNAL", e.what());
  }
}

}  // namespace sqz::napi
