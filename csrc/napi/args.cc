#include "args.h"

#include <cmath>

#include "../core/backend.h"
#include "js_tensor.h"

namespace sqz::napi {

Device parse_device(const std::string& s) {
  Device d;
  if (s == "cpu") return d;
  if (s == "cuda" || s.rfind("cuda:", 0) == 0) {
    int idx = 0;
    if (s.size() > 4) {
      std::string n = s.substr(5);
      if (n.empty() || n.size() > 4 || n.find_first_not_of("0123456789") != std::string::npos)
        fail("ERR_DEVICE", "unknown device '" + s + "' (expected cpu, cuda or cuda:N)");
      idx = std::stoi(n);
    }
    int count = cuda_device_count();
    if (idx >= count) {
      std::string why = count == 0 ? cuda_unavailable_reason() : std::to_string(count) + " CUDA device(s) visible";
      fail("ERR_DEVICE", "device '" + s + "' is not available: " + why);
    }
    d.kind = Device::CUDA;
    d.index = idx;
    return d;
  }
  fail("ERR_DEVICE", "unknown device '" + s + "' (expected cpu, cuda or cuda:N)");
}

void Args::error(const char* code, const std::string& msg) const { fail(code, std::string(op_) + ": " + msg); }

Tensor Args::tensor(size_t i, const char* name) const {
  if (i >= info_.Length() || !JsTensor::Is(info_[i])) error("ERR_ARG", std::string(name) + " must be a Tensor");
  return JsTensor::From(info_[i], name);
}

std::optional<Tensor> Args::opt_tensor(size_t i, const char* name) const {
  if (i >= info_.Length() || info_[i].IsUndefined() || info_[i].IsNull()) return std::nullopt;
  return tensor(i, name);
}

int64_t Args::integer(size_t i, const char* name) const {
  if (i >= info_.Length() || !info_[i].IsNumber()) error("ERR_ARG", std::string(name) + " must be an integer");
  double v = info_[i].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(v) || v != std::floor(v) || std::fabs(v) > 9007199254740991.0)
    error("ERR_ARG", std::string(name) + " must be an integer, got " + std::to_string(v));
  return (int64_t)v;
}

int64_t Args::opt_integer(size_t i, const char* name, int64_t fallback) const {
  if (i >= info_.Length() || info_[i].IsUndefined() || info_[i].IsNull()) return fallback;
  return integer(i, name);
}

double Args::number(size_t i, const char* name) const {
  if (i >= info_.Length() || !info_[i].IsNumber()) error("ERR_ARG", std::string(name) + " must be a number");
  double v = info_[i].As<Napi::Number>().DoubleValue();
  if (std::isnan(v)) error("ERR_ARG", std::string(name) + " must not be NaN");
  return v;
}

double Args::opt_number(size_t i, const char* name, double fallback) const {
  if (i >= info_.Length() || info_[i].IsUndefined() || info_[i].IsNull()) return fallback;
  return number(i, name);
}

bool Args::boolean(size_t i, const char* name, bool fallback) const {
  if (i >= info_.Length() || info_[i].IsUndefined() || info_[i].IsNull()) return fallback;
  if (!info_[i].IsBoolean()) error("ERR_ARG", std::string(name) + " must be a boolean");
  return info_[i].As<Napi::Boolean>().Value();
}

std::string Args::string(size_t i, const char* name) const {
  if (i >= info_.Length() || !info_[i].IsString()) error("ERR_ARG", std::string(name) + " must be a string");
  return info_[i].As<Napi::String>().Utf8Value();
}

std::vector<int64_t> Args::shape(size_t i, const char* name) const {
  if (i >= info_.Length() || !info_[i].IsArray()) error("ERR_SHAPE", std::string(name) + " must be an array of sizes");
  Napi::Array a = info_[i].As<Napi::Array>();
  if (a.Length() > 8) error("ERR_SHAPE", std::string(name) + " has more than 8 dimensions");
  std::vector<int64_t> s;
  for (uint32_t k = 0; k < a.Length(); ++k) {
    Napi::Value v = a.Get(k);
    double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
    if (!(d >= 0) || d != std::floor(d) || d > 1e15)
      error("ERR_SHAPE", std::string(name) + "[" + std::to_string(k) + "] must be a non-negative integer");
    s.push_back((int64_t)d);
  }
  return s;
}

void Args::dtype_in(const Tensor& t, const char* name, std::initializer_list<DType> allowed) const {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::string list;
  for (DType d : allowed) list += std::string(list.empty() ? "" : ", ") + dtype_name(d);
  error("ERR_DTYPE", std::string(name) + " has dtype " + dtype_name(t.dtype) + ", expected one of " + list);
}

void Args::same_dtype(const Tensor& a, const char* an, const Tensor& b, const char* bn) const {
  if (a.dtype != b.dtype)
    error("ERR_DTYPE", std::string(an) + " (" + dtype_name(a.dtype) + ") and " + bn + " (" + dtype_name(b.dtype) +
                           ") must have the same dtype");
}

void Args::same_device(std::initializer_list<std::pair<const Tensor*, const char*>> ts) const {
  const std::pair<const Tensor*, const char*>* first = nullptr;
  for (auto& p : ts) {
    if (!first) { first = &p; continue; }
    if (p.first->device != first->first->device)
      error("ERR_DEVICE", std::string(p.second) + " is on " + p.first->device.str() + " but " + first->second + " is on " +
                              first->first->device.str());
  }
}

void Args::ndim(const Tensor& t, const char* name, int n) const {
  if (t.ndim() != n)
    error("ERR_SHAPE", std::string(name) + " must have " + std::to_string(n) + " dimensions, got " + t.shape_str());
}

void Args::shape_is(const Tensor& t, const char* name, const std::vector<int64_t>& expected) const {
  bool ok = t.ndim() == (int)expected.size();
  for (size_t k = 0; ok && k < expected.size(); ++k)
    if (expected[k] >= 0 && expected[k] != t.shape[k]) ok = false;
  if (!ok) {
    std::string e = "[";
    for (size_t k = 0; k < expected.size(); ++k) e += (k ? ", " : "") + (expected[k] < 0 ? std::string("*") : std::to_string(expected[k]));
    error("ERR_SHAPE", std::string(name) + " has shape " + t.shape_str() + ", expected " + e + "]");
  }
}

void Args::workspace(const Tensor& ws, const Tensor& q, int64_t need, const char* size_fn) const {
  dtype_in(ws, "workspace", {DType::F32});
  same_device({{&q, "q"}, {&ws, "workspace"}});
  if (ws.numel() < need)
    error("ERR_SHAPE", "workspace has " + std::to_string(ws.numel()) + " f32, needs " + std::to_string(need) + " (" +
                           size_fn + ")");
}

void Args::tensor_is(const Tensor& t, const char* name, DType dtype, const std::vector<int64_t>& shape) const {
  dtype_in(t, name, {dtype});
  shape_is(t, name, shape);
}

}  // namespace sqz::napi
