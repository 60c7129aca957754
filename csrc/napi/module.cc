// Module init: the flat native surface. Everything richer is composed in TypeScript.
//   setErrorClass(ctor)                 the JS SqueezeError class native errors are made of
//   devices()                           [{id, name, ...}], cpu first
//   buildInfo()                         {cuda, cudaArchs, napiVersion}
//   empty(dtype, shape, device)         uninitialised tensor
//   fromBuffer(typedArray, dtype, shape, device)
//   synchronize(device) -> Promise      waits for queued work (CPU queue or CUDA stream)
//   memoryStats(device), emptyCache(device)
//   captureBegin(device), captureEnd(device) -> Graph {replay(), dispose()}
//   createEvent(device) -> Event {record(), dispose()}, elapsedMs(a, b)
//   ops.*                               every op registered with SQZ_OP
#include <napi.h>

#include <cstring>
#include <thread>

#include "../core/backend.h"
#include "../core/cpu_queue.h"
#include "../core/parallel.h"
#include "args.h"
#include "errors.h"
#include "js_tensor.h"
#include "op.h"

#ifndef SQUEEZELM_CUDA_ARCHS_STR
#define SQUEEZELM_CUDA_ARCHS_STR ""
#endif

namespace sqz::napi {

std::vector<OpEntry>& op_registry() {
  static std::vector<OpEntry> r;
  return r;
}

namespace {

std::string cpu_name() {
  FILE* f = std::fopen("/proc/cpuinfo", "r");
  std::string name = "CPU";
  if (!f) return name;
  char line[512];
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "model name", 10) == 0) {
      const char* c = std::strchr(line, ':');
      if (c) {
        name = c + 2;
        while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
      }
      break;
    }
  }
  std::fclose(f);
  return name;
}

Napi::Value Devices(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Napi::Array out = Napi::Array::New(env);
    Napi::Object cpu = Napi::Object::New(env);
    cpu.Set("id", "cpu");
    cpu.Set("type", "cpu");
    cpu.Set("name", cpu_name());
    cpu.Set("threads", cpu_threads());
    out.Set(0u, cpu);
    uint32_t k = 1;
    for (const DeviceInfo& d : cuda_device_infos()) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("id", d.id);
      o.Set("type", "cuda");
      o.Set("name", d.name);
      o.Set("totalMemory", (double)d.total_memory);
      o.Set("freeMemory", (double)d.free_memory);
      o.Set("smCount", d.sm_count);
      o.Set("computeCapability", std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor));
      o.Set("l2Bytes", (double)d.l2_bytes);
      out.Set(k++, o);
    }
    return out;
  });
}

Napi::Value BuildInfo(const Napi::CallbackInfo& info) {
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("cuda", cuda_compiled());
  o.Set("cudaArchs", SQUEEZELM_CUDA_ARCHS_STR);
  o.Set("cudaReason", cuda_unavailable_reason());
  o.Set("napiVersion", NAPI_VERSION);
  return o;
}

DType parse_dtype(const Args& a, size_t i) {
  std::string s = a.string(i, "dtype");
  DType d;
  if (!dtype_from_name(s, &d)) fail("ERR_DTYPE", "unknown dtype '" + s + "' (expected f32, f16, bf16, i32, u32, i8, u8)");
  return d;
}

Napi::Value Empty(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "empty");
    DType dt = parse_dtype(a, 0);
    std::vector<int64_t> shape = a.shape(1, "shape");
    Device dev = parse_device(a.string(2, "device"));
    return JsTensor::Wrap(info.Env(), Tensor::empty(dt, shape, dev));
  });
}

Napi::Value FromBuffer(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "fromBuffer");
    if (info.Length() < 1 || !info[0].IsTypedArray()) fail("ERR_ARG", "Tensor.from: data must be a TypedArray");
    Napi::TypedArray ta = info[0].As<Napi::TypedArray>();
    Napi::ArrayBuffer ab = ta.ArrayBuffer();
    if (ab.IsDetached()) fail("ERR_ARG", "Tensor.from: the data's ArrayBuffer is detached");
    DType dt = parse_dtype(a, 1);
    std::vector<int64_t> shape = a.shape(2, "shape");
    Device dev = parse_device(a.string(3, "device"));
    int64_t n = 1;
    for (auto s : shape) n *= s;
    bool convert = ta.TypedArrayType() == napi_float32_array && (dt == DType::F16 || dt == DType::BF16);
    size_t elem = convert ? 4 : dtype_size(dt);
    size_t want = (size_t)n * elem;
    size_t have = ta.ByteLength();
    if (!convert && ta.ElementSize() != dtype_size(dt))
      fail("ERR_DTYPE", std::string("Tensor.from: a ") + std::to_string(ta.ElementSize()) + "-byte element array cannot hold " +
                            dtype_name(dt) + " data");
    if (have != want)
      fail("ERR_SHAPE", "Tensor.from: data holds " + std::to_string(have / elem) + " elements but shape " +
                            shape_to_string(shape) + " needs " + std::to_string(n));
    const uint8_t* src = static_cast<const uint8_t*>(ab.Data()) + ta.ByteOffset();
    Tensor t = Tensor::empty(dt, shape, dev);
    std::vector<uint8_t> tmp;
    const void* bytes = src;
    if (convert) {
      tmp.resize(t.nbytes());
      convert_from_float(reinterpret_cast<const float*>(src), tmp.data(), dt, (size_t)n);
      bytes = tmp.data();
    }
    if (dev.is_cpu()) std::memcpy(t.data(), bytes, t.nbytes());
    else cuda_copy_h2d(dev.index, t.data(), bytes, t.nbytes());
    return JsTensor::Wrap(info.Env(), std::move(t));
  });
}

class SyncWorker : public Napi::AsyncWorker {
 public:
  SyncWorker(Napi::Env env, Device d)
      : Napi::AsyncWorker(env), dev_(d), deferred_(Napi::Promise::Deferred::New(env)) {
    if (d.is_cpu()) ticket_ = cpu_last_ticket();
  }
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      if (dev_.is_cpu()) cpu_wait(ticket_);
      else cuda_synchronize(dev_.index);
    } catch (const Error& e) {
      code_ = e.code;
      SetError(e.message);
    }
  }
  void OnOK() override { deferred_.Resolve(Env().Undefined()); }
  void OnError(const Napi::Error& e) override { deferred_.Reject(make_error(Env(), code_, e.Message()).Value()); }

 private:
  Device dev_;
  uint64_t ticket_ = 0;
  Napi::Promise::Deferred deferred_;
  std::string code_ = "ERR_INTERNAL";
};

Napi::Value Synchronize(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "synchronize");
    Device d = parse_device(a.string(0, "device"));
    auto* w = new SyncWorker(info.Env(), d);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  });
}

Napi::Value MemoryStats(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "memoryStats");
    Device d = parse_device(a.string(0, "device"));
    Napi::Object o = Napi::Object::New(info.Env());
    PoolStats s = d.is_cuda() ? cuda_pool_stats(d.index) : PoolStats{};
    o.Set("allocated", (double)s.allocated);
    o.Set("cached", (double)s.cached);
    o.Set("reserved", (double)s.reserved);
    o.Set("peak", (double)s.peak);
    return o;
  });
}

Napi::Value EmptyCache(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "emptyCache");
    Device d = parse_device(a.string(0, "device"));
    if (d.is_cuda()) cuda_empty_cache(d.index);
    return info.Env().Undefined();
  });
}

Device cuda_arg(const Args& a, size_t i) {
  Device d = parse_device(a.string(i, "device"));
  if (!d.is_cuda()) a.error("ERR_DEVICE", "needs a CUDA device, got " + d.str());
  return d;
}

// An instantiated CUDA graph. Tensors it touches must outlive it (callers allocate them
// before capture and keep them).
class JsGraph : public Napi::ObjectWrap<JsGraph> {
 public:
  static Napi::FunctionReference* ctor;
  static Napi::Function Init(Napi::Env env) {
    Napi::Function f = DefineClass(env, "NativeGraph",
                                   {InstanceMethod("replay", &JsGraph::Replay), InstanceMethod("dispose", &JsGraph::Dispose)});
    ctor = new Napi::FunctionReference(Napi::Persistent(f));
    return f;
  }
  explicit JsGraph(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsGraph>(info) {
    if (info.Length() < 1 || !info[0].IsExternal()) throw make_error(info.Env(), "ERR_ARG", "NativeGraph is made by captureEnd");
  }
  ~JsGraph() { cuda_graph_destroy(graph); }
  void* graph = nullptr;
  int device = 0;

 private:
  Napi::Value Replay(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      if (!graph) fail("ERR_DISPOSED", "graph was disposed");
      cuda_graph_launch(device, graph);
      return info.Env().Undefined();
    });
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    cuda_graph_destroy(graph);
    graph = nullptr;
    return info.Env().Undefined();
  }
};
Napi::FunctionReference* JsGraph::ctor = nullptr;

Napi::Value CaptureBegin(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "captureBegin");
    cuda_capture_begin(cuda_arg(a, 0).index);
    return info.Env().Undefined();
  });
}

Napi::Value CaptureEnd(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "captureEnd");
    Device d = cuda_arg(a, 0);
    void* g = cuda_capture_end(d.index);
    Napi::Object o = JsGraph::ctor->New({Napi::External<int>::New(info.Env(), nullptr)});
    JsGraph* jg = Napi::ObjectWrap<JsGraph>::Unwrap(o);
    jg->graph = g;
    jg->device = d.index;
    return o;
  });
}

class JsEvent : public Napi::ObjectWrap<JsEvent> {
 public:
  static Napi::FunctionReference* ctor;
  static Napi::Function Init(Napi::Env env) {
    Napi::Function f = DefineClass(env, "NativeEvent",
                                   {InstanceMethod("record", &JsEvent::Record), InstanceMethod("dispose", &JsEvent::Dispose)});
    ctor = new Napi::FunctionReference(Napi::Persistent(f));
    return f;
  }
  explicit JsEvent(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsEvent>(info) {
    if (info.Length() < 1 || !info[0].IsExternal()) throw make_error(info.Env(), "ERR_ARG", "NativeEvent is made by createEvent");
  }
  ~JsEvent() { cuda_event_destroy(ev); }
  void* ev = nullptr;
  int device = 0;

 private:
  Napi::Value Record(const Napi::CallbackInfo& info) {
    return guarded(info, [&]() -> Napi::Value {
      if (!ev) fail("ERR_DISPOSED", "event was disposed");
      cuda_event_record(device, ev);
      return info.Env().Undefined();
    });
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    cuda_event_destroy(ev);
    ev = nullptr;
    return info.Env().Undefined();
  }
};
Napi::FunctionReference* JsEvent::ctor = nullptr;

Napi::Value CreateEvent(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args a(info, "createEvent");
    Device d = cuda_arg(a, 0);
    Napi::Object o = JsEvent::ctor->New({Napi::External<int>::New(info.Env(), nullptr)});
    JsEvent* e = Napi::ObjectWrap<JsEvent>::Unwrap(o);
    e->ev = cuda_event_create(d.index);
    e->device = d.index;
    return o;
  });
}

// Milliseconds between two recorded events (waits for the second).
Napi::Value ElapsedMs(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsObject()) fail("ERR_ARG", "elapsedMs(a, b) takes two events");
    JsEvent* a = Napi::ObjectWrap<JsEvent>::Unwrap(info[0].As<Napi::Object>());
    JsEvent* b = Napi::ObjectWrap<JsEvent>::Unwrap(info[1].As<Napi::Object>());
    if (!a || !b || !a->ev || !b->ev) fail("ERR_ARG", "elapsedMs needs two live events");
    return Napi::Number::New(info.Env(), cuda_event_elapsed_ms(a->ev, b->ev));
  });
}

Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "setErrorClass(fn)");
  set_error_class(info.Env(), info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("setErrorClass", Napi::Function::New(env, SetErrorClass));
  exports.Set("devices", Napi::Function::New(env, Devices));
  exports.Set("buildInfo", Napi::Function::New(env, BuildInfo));
  exports.Set("NativeTensor", JsTensor::Init(env));
  JsGraph::Init(env);
  JsEvent::Init(env);
  exports.Set("empty", Napi::Function::New(env, Empty));
  exports.Set("fromBuffer", Napi::Function::New(env, FromBuffer));
  exports.Set("synchronize", Napi::Function::New(env, Synchronize));
  exports.Set("memoryStats", Napi::Function::New(env, MemoryStats));
  exports.Set("emptyCache", Napi::Function::New(env, EmptyCache));
  exports.Set("captureBegin", Napi::Function::New(env, CaptureBegin));
  exports.Set("captureEnd", Napi::Function::New(env, CaptureEnd));
  exports.Set("createEvent", Napi::Function::New(env, CreateEvent));
  exports.Set("elapsedMs", Napi::Function::New(env, ElapsedMs));
  Napi::Object ops = Napi::Object::New(env);
  for (const OpEntry& e : op_registry()) ops.Set(e.name, Napi::Function::New(env, e.fn, e.name));
  exports.Set("ops", ops);
  return exports;
}

}  // namespace
}  // namespace sqz::napi

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return sqz::napi::Init(env, exports); }
NODE_API_MODULE(squeezelm, InitModule)
