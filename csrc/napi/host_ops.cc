// Host ops: work on typed arrays already in host memory, no tensors, no device.
//
// native.ops.tokenNll(logits: Float32Array, vocab, targets: Int32Array) -> Promise<Float64Array>
//   The logits were read back from any device; the work runs on a libuv worker thread (with the
//   CPU pool inside), so the event loop stays free while a large batch of rows is scored. Row r of
//   logits ([rows, vocab] row-major, rows = targets.length) is scored against targets[r]; every
//   target is checked against the vocabulary first.
// native.ops.kmeans1d(samples: Float32Array, weights: Float32Array | null, init: Float32Array,
//                     iterations) -> Float32Array
//   The KV calibration's codebook k-means (csrc/cpu/kmeans1d.h), synchronous like the TypeScript
//   function it stands in for (tens of milliseconds at the calibration's 200,000 samples).
// native.ops.gptqFactor(h: Float64Array [K*K], K, damp, actOrder)
//     -> Promise<{ perm: Int32Array, h: Float64Array, u: Float64Array }>
//   GPTQ's factor of a second moment (csrc/cpu/gptq.h gptq_factor) on a libuv worker thread with the
//   CPU pool inside: seconds to minutes at K = 11008, where the event loop should stay free.
#include <algorithm>
#include <cstring>
#include <string>

#include "../cpu/gptq.h"
#include "../cpu/kmeans1d.h"
#include "../cpu/nll.h"
#include "op.h"

namespace sqz::napi {
namespace {

// A host op's work on a libuv worker thread (with the CPU pool inside), settling a promise: Run() off
// the main thread, Settle() back on it; an exception in Run() rejects with ERR_INTERNAL.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  explicit PromiseWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  // Queues the work; the promise settles when it is done.
  Napi::Promise start() {
    Napi::Promise p = deferred_.Promise();
    Queue();
    return p;
  }

 protected:
  virtual void Run() = 0;
  virtual Napi::Value Settle() = 0;

 private:
  void Execute() override {
    try {
      Run();
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override { deferred_.Resolve(Settle()); }
  void OnError(const Napi::Error& e) override { deferred_.Reject(make_error(Env(), "ERR_INTERNAL", e.Message()).Value()); }
  Napi::Promise::Deferred deferred_;
};

class NllWorker : public PromiseWorker {
 public:
  NllWorker(Napi::Env env, Napi::Float32Array logits, int64_t vocab, Napi::Int32Array targets)
      : PromiseWorker(env),
        logits_ref_(Napi::Persistent(logits.As<Napi::Object>())),
        targets_ref_(Napi::Persistent(targets.As<Napi::Object>())),
        logits_(logits.Data()),
        targets_(targets.Data()),
        vocab_(vocab),
        rows_((int64_t)targets.ElementLength()),
        out_((size_t)rows_) {}

 protected:
  void Run() override { cpu::token_nll(logits_, vocab_, targets_, rows_, out_.data()); }
  Napi::Value Settle() override {
    Napi::Float64Array r = Napi::Float64Array::New(Env(), (size_t)rows_);
    if (rows_) std::memcpy(r.Data(), out_.data(), out_.size() * sizeof(double));
    return r;
  }

 private:
  // the arrays stay referenced (and their memory in place) until the worker is done
  Napi::ObjectReference logits_ref_, targets_ref_;
  const float* logits_;
  const int32_t* targets_;
  int64_t vocab_, rows_;
  std::vector<double> out_;
};

class GptqFactorWorker : public PromiseWorker {
 public:
  // The outputs are made here, on the main thread, and filled in place by the worker.
  GptqFactorWorker(Napi::Env env, Napi::Float64Array h, int64_t K, double damp, bool act_order)
      : PromiseWorker(env),
        h_ref_(Napi::Persistent(h.As<Napi::Object>())),
        out_(Napi::Persistent(Napi::Object::New(env))),
        h_(h.Data()),
        K_(K),
        damp_(damp),
        act_order_(act_order) {
    Napi::Int32Array perm = Napi::Int32Array::New(env, (size_t)K);
    Napi::Float64Array a = Napi::Float64Array::New(env, (size_t)(K * K)), u = Napi::Float64Array::New(env, (size_t)(K * K));
    out_.Set("perm", perm);
    out_.Set("h", a);
    out_.Set("u", u);
    perm_ = perm.Data(), a_ = a.Data(), u_ = u.Data();
  }

 protected:
  void Run() override { cpu::gptq_factor(h_, K_, damp_, act_order_, perm_, a_, u_); }
  Napi::Value Settle() override { return out_.Value(); }

 private:
  // h and the outputs stay referenced (and their memory in place) until the worker is done
  Napi::ObjectReference h_ref_, out_;
  const double* h_;
  int64_t K_;
  double damp_;
  bool act_order_;
  int32_t* perm_ = nullptr;
  double *a_ = nullptr, *u_ = nullptr;
};

}  // namespace

SQZ_OP(gptqFactor) {
  Args a(info, "gptqFactor");
  if (a.size() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    a.error("ERR_ARG", "h must be a Float64Array");
  Napi::Float64Array h = info[0].As<Napi::Float64Array>();
  const int64_t K = a.integer(1, "K");
  if (K < 1 || K > (1 << 17)) a.error("ERR_ARG", "K must be 1 .. 131072, got " + std::to_string(K));
  if ((int64_t)h.ElementLength() != K * K)
    a.error("ERR_SHAPE", "h holds " + std::to_string(h.ElementLength()) + " values, expected " + std::to_string(K) + "x" + std::to_string(K));
  const double damp = a.opt_number(2, "damp", 0.01);
  if (!(damp >= 0)) a.error("ERR_ARG", "damp must be >= 0, got " + std::to_string(damp));
  const bool act_order = a.size() < 4 || info[3].IsUndefined() || info[3].ToBoolean().Value();
  return (new GptqFactorWorker(info.Env(), h, K, damp, act_order))->start();
}

SQZ_OP(tokenNll) {
  Args a(info, "tokenNll");
  if (a.size() < 3 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    a.error("ERR_ARG", "logits must be a Float32Array");
  if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    a.error("ERR_ARG", "targets must be an Int32Array");
  Napi::Float32Array logits = info[0].As<Napi::Float32Array>();
  Napi::Int32Array targets = info[2].As<Napi::Int32Array>();
  const int64_t V = a.integer(1, "vocab");
  if (V < 1) a.error("ERR_ARG", "vocab must be >= 1, got " + std::to_string(V));
  const int64_t rows = (int64_t)targets.ElementLength();
  if ((int64_t)logits.ElementLength() < rows * V)
    a.error("ERR_SHAPE", "logits hold " + std::to_string(logits.ElementLength()) + " values, " + std::to_string(rows) +
                             " rows of vocab " + std::to_string(V) + " need " + std::to_string(rows * V));
  const int32_t* t = targets.Data();
  for (int64_t r = 0; r < rows; ++r)
    if (t[r] < 0 || t[r] >= V)
      a.error("ERR_ARG", "target " + std::to_string(t[r]) + " of row " + std::to_string(r) + " is outside the vocabulary [0, " +
                             std::to_string(V) + ")");
  return (new NllWorker(info.Env(), logits, V, targets))->start();
}

SQZ_OP(kmeans1d) {
  Args a(info, "kmeans1d");
  auto f32 = [&](size_t i) { return i < a.size() && info[i].IsTypedArray() && info[i].As<Napi::TypedArray>().TypedArrayType() == napi_float32_array; };
  if (!f32(0)) a.error("ERR_ARG", "samples must be a Float32Array");
  const bool weighted = a.size() > 1 && !info[1].IsNull() && !info[1].IsUndefined();
  if (weighted && !f32(1)) a.error("ERR_ARG", "weights must be a Float32Array or null");
  if (!f32(2)) a.error("ERR_ARG", "init must be a Float32Array");
  Napi::Float32Array x = info[0].As<Napi::Float32Array>(), init = info[2].As<Napi::Float32Array>();
  const int64_t n = (int64_t)x.ElementLength(), E = (int64_t)init.ElementLength();
  if (E < 1 || E > 256) a.error("ERR_ARG", "init must hold 1..256 entries, got " + std::to_string(E));
  const float* w = nullptr;
  if (weighted) {
    Napi::Float32Array wa = info[1].As<Napi::Float32Array>();
    if ((int64_t)wa.ElementLength() != n)
      a.error("ERR_SHAPE", "weights hold " + std::to_string(wa.ElementLength()) + " values for " + std::to_string(n) + " samples");
    w = wa.Data();
  }
  const int64_t iters = a.integer(3, "iterations");
  if (iters < 0) a.error("ERR_ARG", "iterations must be >= 0");
  Napi::Float32Array out = Napi::Float32Array::New(info.Env(), (size_t)E);
  cpu::kmeans_1d(x.Data(), w, n, init.Data(), (int)E, (int)std::min<int64_t>(iters, 1 << 30), out.Data());
  return out;
}

}  // namespace sqz::napi
