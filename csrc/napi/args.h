// Argument parsing and validation shared by every op binding. Each check throws a coded
// sqz::Error naming the op and the argument, before anything is queued or launched.
#pragma once
#include <napi.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../core/tensor.h"

namespace sqz::napi {

Device parse_device(const std::string& s);  // "cpu", "cuda", "cuda:N"; ERR_DEVICE otherwise

class Args {
 public:
  Args(const Napi::CallbackInfo& info, const char* op) : info_(info), op_(op) {}
  Napi::Env env() const { return info_.Env(); }
  const char* op() const { return op_; }
  size_t size() const { return info_.Length(); }

  Tensor tensor(size_t i, const char* name) const;
  std::optional<Tensor> opt_tensor(size_t i, const char* name) const;  // undefined/null -> none
  int64_t integer(size_t i, const char* name) const;
  int64_t opt_integer(size_t i, const char* name, int64_t fallback) const;
  double number(size_t i, const char* name) const;
  double opt_number(size_t i, const char* name, double fallback) const;
  bool boolean(size_t i, const char* name, bool fallback) const;
  std::string string(size_t i, const char* name) const;
  std::vector<int64_t> shape(size_t i, const char* name) const;

  // Validation helpers ("op: argument ..." messages).
  void dtype_in(const Tensor& t, const char* name, std::initializer_list<DType> allowed) const;
  void same_dtype(const Tensor& a, const char* an, const Tensor& b, const char* bn) const;
  void same_device(std::initializer_list<std::pair<const Tensor*, const char*>> ts) const;
  void ndim(const Tensor& t, const char* name, int n) const;
  // Expected shape; -1 matches anything.
  void shape_is(const Tensor& t, const char* name, const std::vector<int64_t>& expected) const;
  // A caller-provided f32 scratch tensor on q's device with at least `need` elements (size_fn:
  // the TypeScript function that computes the size, named in the error).
  void workspace(const Tensor& ws, const Tensor& q, int64_t need, const char* size_fn) const;
  // Both: dtype first (ERR_DTYPE), then shape (ERR_SHAPE).
  void tensor_is(const Tensor& t, const char* name, DType dtype, const std::vector<int64_t>& shape) const;
  [[noreturn]] void error(const char* code, const std::string& msg) const;

 private:
  const Napi::CallbackInfo& info_;
  const char* op_;
};

// Runs an op on the tensors' device: CPU work is queued on the CPU stream (captured tensors
// keep their storage alive until it ran); CUDA work is launched right away on the device
// stream, then the launch is checked.
template <class CpuFn, class CudaFn>
void dispatch(const Device& dev, const char* op, CpuFn&& cpu, CudaFn&& cuda);

}  // namespace sqz::napi

#include "../core/backend.h"
#include "../core/cpu_queue.h"

namespace sqz::napi {
template <class CpuFn, class CudaFn>
void dispatch(const Device& dev, const char* op, CpuFn&& cpu, CudaFn&& cuda) {
  if (dev.is_cpu()) {
    cpu_enqueue(std::function<void()>(std::forward<CpuFn>(cpu)));
  } else {
    cuda(dev.index);
    cuda_check_launch(dev.index, op);
  }
}
}  // namespace sqz::napi
