#include "tensor.h"

#include <cstdlib>
#include <new>

#include "backend.h"
#include "error.h"

namespace sqz {

static void* host_alloc(size_t bytes) {
  // 64-byte alignment keeps vector loads aligned in the CPU kernels.
  size_t n = (bytes + 63) & ~size_t(63);
  if (n == 0) n = 64;
  void* p = std::aligned_alloc(64, n);
  if (!p) fail("ERR_OUT_OF_MEMORY", "host allocation of " + std::to_string(bytes) + " bytes failed");
  return p;
}

Storage::Storage(Device d, size_t n) : device(d), bytes(n) {
  if (d.is_cpu()) ptr = host_alloc(n);
  else ptr = cuda_alloc(d.index, n);
}

Storage::~Storage() {
  if (!ptr) return;
  if (device.is_cpu()) std::free(ptr);
  else cuda_free(device.index, ptr, bytes);
}

Tensor Tensor::empty(DType dt, const std::vector<int64_t>& shape, Device dev) {
  Tensor t;
  t.dtype = dt;
  t.shape = shape;
  t.device = dev;
  int64_t n = 1;
  for (auto s : shape) {
    if (s < 0) fail("ERR_SHAPE", "negative dimension in shape " + shape_to_string(shape));
    if (s > 0 && n > (int64_t(1) << 50) / s) fail("ERR_OUT_OF_MEMORY", "shape " + shape_to_string(shape) + " is too large");
    n *= s;
  }
  t.storage = std::make_shared<Storage>(dev, (size_t)n * dtype_size(dt));
  return t;
}

std::string shape_to_string(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) r += ", ";
    r += std::to_string(s[i]);
  }
  return r + "]";
}

std::string Tensor::shape_str() const { return shape_to_string(shape); }

Tensor Tensor::view(int64_t elem_offset, const std::vector<int64_t>& new_shape) const {
  Tensor v = *this;
  int64_t n = 1;
  for (auto s : new_shape) {
    if (s < 0) fail("ERR_SHAPE", "negative dimension in view shape " + shape_to_string(new_shape));
    n *= s;
  }
  size_t begin = offset + (size_t)elem_offset * dtype_size(dtype);
  if (elem_offset < 0 || begin + (size_t)n * dtype_size(dtype) > storage->bytes)
    fail("ERR_SHAPE", "view of " + std::to_string(n) + " elements at offset " + std::to_string(elem_offset) +
                          " runs past the end of a tensor of " + shape_str());
  v.offset = begin;
  v.shape = new_shape;
  return v;
}

void convert_to_float(const void* src, DType t, float* dst, size_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); break;
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
      break;
    }
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      break;
    }
    default: fail("ERR_DTYPE", std::string("cannot convert ") + dtype_name(t) + " to float");
  }
}

void convert_from_float(const float* src, void* dst, DType t, size_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); break;
    case DType::F16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
      break;
    }
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
      break;
    }
    default: fail("ERR_DTYPE", std::string("cannot convert float to ") + dtype_name(t));
  }
}

}  // namespace sqz
