#include "js_tensor.h"

#include <cstring>
#include <exception>
#include <memory>
#include <vector>

#include "../core/backend.h"
#include "../core/cpu_queue.h"
#include "args.h"
#include "errors.h"

namespace sqz::napi {

static const napi_type_tag kTensorTag = {0x5e7a1e3c0ffee001ULL, 0x7e45042d5a9b11eeULL};
static Napi::FunctionReference* g_ctor = nullptr;

Napi::Function JsTensor::Init(Napi::Env env) {
  Napi::Function f = DefineClass(env, "NativeTensor",
                                 {InstanceMethod("dispose", &JsTensor::Dispose),
                                  InstanceAccessor("dtype", &JsTensor::GetDtype, nullptr),
                                  InstanceAccessor("shape", &JsTensor::GetShape, nullptr),
                                  InstanceAccessor("device", &JsTensor::GetDevice, nullptr),
                                  InstanceAccessor("disposed", &JsTensor::GetDisposed, nullptr),
                                  InstanceAccessor("byteLength", &JsTensor::GetByteLength, nullptr),
                                  InstanceMethod("toHost", &JsTensor::ToHost),
                                  InstanceMethod("readback", &JsTensor::Readback),
                                  InstanceMethod("write", &JsTensor::Write),
                                  InstanceMethod("view", &JsTensor::View),
                                  InstanceMethod("to", &JsTensor::To)});
  g_ctor = new Napi::FunctionReference(Napi::Persistent(f));
  return f;
}

JsTensor::JsTensor(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsTensor>(info) {
  // Only native code creates tensors: it passes a marker External first.
  if (info.Length() < 1 || !info[0].IsExternal())
    throw make_error(info.Env(), "ERR_ARG", "NativeTensor cannot be constructed directly; use Tensor.from or empty");
  info.This().As<Napi::Object>().TypeTag(&kTensorTag);
}

JsTensor::~JsTensor() {
  // Finalizer: storage is released with `tensor`; V8's count is adjusted if still owed.
  if (reported_) Napi::MemoryManagement::AdjustExternalMemory(Env(), -reported_);
}

Napi::Object JsTensor::Wrap(Napi::Env env, Tensor t) {
  Napi::Object o = g_ctor->New({Napi::External<int>::New(env, nullptr)});
  JsTensor* self = Napi::ObjectWrap<JsTensor>::Unwrap(o);
  // Report the whole storage once, from the handle that created it (views report nothing).
  bool owner = t.offset == 0 && t.storage && t.storage.use_count() == 1;
  self->tensor = std::move(t);
  if (owner && self->tensor.storage->bytes) {
    self->reported_ = (int64_t)self->tensor.storage->bytes;
    Napi::MemoryManagement::AdjustExternalMemory(env, self->reported_);
  }
  return o;
}

bool JsTensor::Is(Napi::Value v) { return v.IsObject() && v.As<Napi::Object>().CheckTypeTag(&kTensorTag); }

Tensor& JsTensor::From(Napi::Value v, const char* what) {
  if (!Is(v)) fail("ERR_ARG", std::string(what) + " is not a squeezelm tensor");
  JsTensor* t = Napi::ObjectWrap<JsTensor>::Unwrap(v.As<Napi::Object>());
  if (t->disposed) fail("ERR_DISPOSED", std::string(what) + " was disposed");
  return t->tensor;
}

void JsTensor::release(Napi::Env env) {
  if (disposed) return;
  disposed = true;
  tensor.storage.reset();
  if (reported_) {
    Napi::MemoryManagement::AdjustExternalMemory(env, -reported_);
    reported_ = 0;
  }
}

Napi::Value JsTensor::Dispose(const Napi::CallbackInfo& info) {
  release(info.Env());
  return info.Env().Undefined();
}

Napi::Value JsTensor::GetDtype(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), dtype_name(tensor.dtype)); }

Napi::Value JsTensor::GetShape(const Napi::CallbackInfo& info) {
  Napi::Array a = Napi::Array::New(info.Env(), tensor.shape.size());
  for (size_t i = 0; i < tensor.shape.size(); ++i) a.Set((uint32_t)i, Napi::Number::New(info.Env(), (double)tensor.shape[i]));
  return a;
}

Napi::Value JsTensor::GetDevice(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), tensor.device.str()); }
Napi::Value JsTensor::GetDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), disposed); }
Napi::Value JsTensor::GetByteLength(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), disposed ? 0.0 : (double)tensor.nbytes());
}

namespace {

// Base for async native work that settles a promise with a coded error on failure.
class CodedWorker : public Napi::AsyncWorker {
 public:
  explicit CodedWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    try {
      run();
    } catch (const Error& e) {
      code_ = e.code;
      SetError(e.message);
    } catch (const std::exception& e) {
      code_ = "ERR_INTERNAL";
      SetError(e.what());
    }
  }
  void OnError(const Napi::Error& e) override {
    deferred_.Reject(make_error(Env(), code_, e.Message()).Value());
  }
  virtual void run() = 0;
  Napi::Promise::Deferred deferred_;
  std::string code_ = "ERR_INTERNAL";
};

// The bytes of a CPU tensor as of a task queued now (behind the ops queued before it, ahead of
// any queued later, which may overwrite the tensor). The task keeps its own error (an allocation
// that fails), so the failure rejects this read instead of the next unrelated wait on the queue.
struct HostSnapshot {
  std::vector<uint8_t> bytes;
  std::exception_ptr error;
};
std::shared_ptr<HostSnapshot> snapshot_cpu(const Tensor& t, uint64_t& ticket) {
  auto snap = std::make_shared<HostSnapshot>();
  Tensor src = t;
  ticket = cpu_enqueue([snap, src] {
    try {
      const uint8_t* p = static_cast<const uint8_t*>(src.data());
      snap->bytes.assign(p, p + src.nbytes());
    } catch (...) {
      snap->error = std::current_exception();
    }
  });
  return snap;
}
void wait_snapshot(const HostSnapshot& snap, uint64_t ticket) {
  cpu_wait(ticket);
  if (snap.error) std::rethrow_exception(snap.error);
}

// A fresh ArrayBuffer holding `bytes` (what the reading workers resolve with).
Napi::ArrayBuffer array_buffer(Napi::Env env, const std::vector<uint8_t>& bytes) {
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, bytes.size());
  if (!bytes.empty()) std::memcpy(ab.Data(), bytes.data(), bytes.size());
  return ab;
}

// Waits for a tensor's pending writes and copies its bytes into a fresh ArrayBuffer: a CPU tensor
// through a snapshot taken in order on the CPU queue, a CUDA tensor by a synchronous read here
// (the buffer is sized off the JS thread either way).
class ToHostWorker : public CodedWorker {
 public:
  ToHostWorker(Napi::Env env, Tensor t) : CodedWorker(env), t_(std::move(t)) {
    if (t_.device.is_cpu()) snap_ = snapshot_cpu(t_, ticket_);
    else snap_ = std::make_shared<HostSnapshot>();
  }
  void run() override {
    if (t_.device.is_cpu()) {
      wait_snapshot(*snap_, ticket_);
    } else {
      snap_->bytes.resize(t_.nbytes());
      cuda_copy_d2h_sync(t_.device.index, snap_->bytes.data(), t_.data(), snap_->bytes.size());
    }
  }
  void OnOK() override {
    t_.storage.reset();
    deferred_.Resolve(array_buffer(Env(), snap_->bytes));
  }

 private:
  Tensor t_;
  uint64_t ticket_ = 0;
  std::shared_ptr<HostSnapshot> snap_;
};

// A small CUDA tensor's bytes as of the call: the copy into pinned memory is queued on the
// device stream here, on the JS thread, so work queued after the call (the next decode step)
// neither delays nor changes what is read; this worker only waits for it to land.
class ReadbackWorker : public CodedWorker {
 public:
  ReadbackWorker(Napi::Env env, Tensor t) : CodedWorker(env), t_(std::move(t)) {
    bytes_.resize(t_.nbytes());
    handle_ = cuda_readback_begin(t_.device.index, t_.data(), bytes_.size());
  }
  ~ReadbackWorker() override { cuda_readback_release(handle_); }
  void run() override {
    void* h = handle_;
    handle_ = nullptr;
    cuda_readback_wait(h, bytes_.data(), bytes_.size());
  }
  void OnOK() override {
    t_.storage.reset();
    deferred_.Resolve(array_buffer(Env(), bytes_));
  }

 private:
  Tensor t_;
  std::vector<uint8_t> bytes_;
  void* handle_ = nullptr;
};

// Copies a tensor to another device once its pending writes are done. A CPU source is read in
// order on the CPU queue, like ToHostWorker's: the copy holds the tensor as of this call. To
// another CPU tensor the queued task copies it; to a device the task only snapshots it and the
// upload happens here, on this worker thread, so the CPU queue never waits on a GPU stream and
// never touches one (a graph capture may be open on it).
class ToDeviceWorker : public CodedWorker {
 public:
  ToDeviceWorker(Napi::Env env, Tensor src, Tensor dst) : CodedWorker(env), src_(std::move(src)), dst_(std::move(dst)) {
    if (src_.device.is_cpu() && dst_.device.is_cpu()) {
      Tensor s = src_, d = dst_;
      ticket_ = cpu_enqueue([s, d] {
        if (s.nbytes() > 0) std::memcpy(d.data(), s.data(), s.nbytes());
      });
    } else if (src_.device.is_cpu()) {
      snap_ = snapshot_cpu(src_, ticket_);
    }
  }
  void run() override {
    size_t n = src_.nbytes();
    if (snap_) {
      wait_snapshot(*snap_, ticket_);
      if (n > 0) {
        cuda_copy_h2d(dst_.device.index, dst_.data(), snap_->bytes.data(), n);
        cuda_synchronize(dst_.device.index);
      }
    } else if (src_.device.is_cpu()) {
      cpu_wait(ticket_);
    } else if (dst_.device.is_cpu()) {
      cuda_copy_d2h_sync(src_.device.index, dst_.data(), src_.data(), n);
    } else if (dst_.device == src_.device) {
      cuda_copy_d2d(src_.device.index, dst_.data(), src_.data(), n);
      cuda_synchronize(src_.device.index);
    } else {
      std::vector<uint8_t> tmp(n);
      cuda_copy_d2h_sync(src_.device.index, tmp.data(), src_.data(), n);
      cuda_copy_h2d(dst_.device.index, dst_.data(), tmp.data(), n);
      cuda_synchronize(dst_.device.index);
    }
  }
  void OnOK() override {
    src_.storage.reset();
    deferred_.Resolve(JsTensor::Wrap(Env(), std::move(dst_)));
  }

 private:
  Tensor src_, dst_;
  uint64_t ticket_ = 0;
  std::shared_ptr<HostSnapshot> snap_;  // CPU source to a device
};

}  // namespace

Napi::Value JsTensor::ToHost(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (disposed) fail("ERR_DISPOSED", "tensor was disposed");
    auto* w = new ToHostWorker(info.Env(), tensor);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  });
}

// CUDA: the bytes as of this call (at most kReadbackMax); CPU: toHost (already as of the call).
Napi::Value JsTensor::Readback(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (disposed) fail("ERR_DISPOSED", "tensor was disposed");
    CodedWorker* w = tensor.device.is_cpu() ? static_cast<CodedWorker*>(new ToHostWorker(info.Env(), tensor))
                                            : new ReadbackWorker(info.Env(), tensor);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  });
}

Napi::Value JsTensor::To(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (disposed) fail("ERR_DISPOSED", "tensor was disposed");
    Args a(info, "to");
    Device dev = parse_device(a.string(0, "device"));
    Tensor dst = Tensor::empty(tensor.dtype, tensor.shape, dev);
    auto* w = new ToDeviceWorker(info.Env(), tensor, std::move(dst));
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  });
}

// Overwrites the tensor's contents from host bytes, in stream order (used to update
// lengths and page tables between graph replays).
Napi::Value JsTensor::Write(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (disposed) fail("ERR_DISPOSED", "tensor was disposed");
    if (info.Length() < 1 || !info[0].IsTypedArray()) fail("ERR_ARG", "write: data must be a TypedArray");
    Napi::TypedArray ta = info[0].As<Napi::TypedArray>();
    if (ta.ArrayBuffer().IsDetached()) fail("ERR_ARG", "write: the data's ArrayBuffer is detached");
    size_t n = ta.ByteLength();
    if (n != tensor.nbytes())
      fail("ERR_SHAPE", "write: data has " + std::to_string(n) + " bytes, tensor " + tensor.shape_str() + " " +
                            dtype_name(tensor.dtype) + " needs " + std::to_string(tensor.nbytes()));
    const uint8_t* src = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    if (tensor.device.is_cpu()) {
      auto copy = std::make_shared<std::vector<uint8_t>>(src, src + n);
      Tensor t = tensor;
      cpu_enqueue([t, copy] { std::memcpy(t.data(), copy->data(), copy->size()); });
    } else {
      cuda_copy_h2d(tensor.device.index, tensor.data(), src, n);
    }
    return info.Env().Undefined();
  });
}

Napi::Value JsTensor::View(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (disposed) fail("ERR_DISPOSED", "tensor was disposed");
    Args a(info, "view");
    int64_t off = a.integer(0, "offset");
    std::vector<int64_t> shape = a.shape(1, "shape");
    DType dt = tensor.dtype;
    Tensor v = tensor.view(off, shape);
    v.dtype = dt;
    return Wrap(info.Env(), std::move(v));
  });
}

}  // namespace sqz::napi
