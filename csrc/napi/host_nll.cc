// native.ops.tokenNll(logits: Float32Array, vocab, targets: Int32Array) -> Promise<Float64Array>
//
// A host op: the logits are already in host memory (read back from any device), and the work
// runs on a libuv worker thread (with the CPU pool inside), so the event loop stays free while a
// large batch of rows is scored. Row r of logits ([rows, vocab] row-major, rows = targets.length)
// is scored against targets[r]; every target is checked against the vocabulary first.
#include <cstring>
#include <string>

#include "../cpu/nll.h"
#include "op.h"

namespace sqz::napi {
namespace {

class NllWorker : public Napi::AsyncWorker {
 public:
  NllWorker(Napi::Env env, Napi::Float32Array logits, int64_t vocab, Napi::Int32Array targets)
      : Napi::AsyncWorker(env),
        deferred_(Napi::Promise::Deferred::New(env)),
        logits_ref_(Napi::Persistent(logits.As<Napi::Object>())),
        targets_ref_(Napi::Persistent(targets.As<Napi::Object>())),
        logits_(logits.Data()),
        targets_(targets.Data()),
        vocab_(vocab),
        rows_((int64_t)targets.ElementLength()),
        out_((size_t)rows_) {}
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      cpu::token_nll(logits_, vocab_, targets_, rows_, out_.data());
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override {
    Napi::Float64Array r = Napi::Float64Array::New(Env(), (size_t)rows_);
    if (rows_) std::memcpy(r.Data(), out_.data(), out_.size() * sizeof(double));
    deferred_.Resolve(r);
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(make_error(Env(), "ERR_INTERNAL", e.Message()).Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  // the arrays stay referenced (and their memory in place) until the worker is done
  Napi::ObjectReference logits_ref_, targets_ref_;
  const float* logits_;
  const int32_t* targets_;
  int64_t vocab_, rows_;
  std::vector<double> out_;
};

}  // namespace

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
  auto* w = new NllWorker(info.Env(), logits, V, targets);
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

}  // namespace sqz::napi
