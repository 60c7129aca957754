// A tensor is a typed, shaped, contiguous view into reference-counted storage on one device.
// Views share storage (KV pages, weight slices); storage is freed when the last view and the
// last queued task holding it are gone, so disposing a tensor with pending work is safe.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dtype.h"

namespace sqz {

struct Device {
  enum Kind : int { CPU = 0, CUDA = 1 };
  Kind kind = CPU;
  int index = 0;
  bool is_cpu() const { return kind == CPU; }
  bool is_cuda() const { return kind == CUDA; }
  bool operator==(const Device& o) const { return kind == o.kind && (kind == CPU || index == o.index); }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const { return kind == CPU ? std::string("cpu") : "cuda:" + std::to_string(index); }
};

// Owns one allocation (host or device). Frees through the allocator of its device.
struct Storage {
  Device device;
  void* ptr = nullptr;
  size_t bytes = 0;
  Storage(Device d, size_t n);  // allocates; throws ERR_OUT_OF_MEMORY
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
};

struct Tensor {
  std::shared_ptr<Storage> storage;
  size_t offset = 0;  // bytes into storage
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  Device device;

  static Tensor empty(DType dt, const std::vector<int64_t>& shape, Device dev);

  int ndim() const { return (int)shape.size(); }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  size_t nbytes() const { return (size_t)numel() * dtype_size(dtype); }
  // dim(-1) is the last dimension.
  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : i]; }
  void* data() const { return static_cast<char*>(storage->ptr) + offset; }
  template <class T> T* ptr() const { return static_cast<T*>(data()); }
  std::string shape_str() const;
  // A view of `numel(new_shape)` elements starting `elem_offset` elements in.
  Tensor view(int64_t elem_offset, const std::vector<int64_t>& new_shape) const;
};

std::string shape_to_string(const std::vector<int64_t>& s);

}  // namespace sqz
