// What every emulator program's main file shares: the CUDA runtime entry points the launchers call
// (an H100-sized device: 132 SMs, 227 KiB of shared memory per block, two blocks per SM), the case
// report, and host tensors. Included by one translation unit per program.
//   emu::g_device_allocations: whether cudaMalloc hands out (host) memory; off, the launches that
//   want a process buffer take their fallback, as on a device out of memory.
//   emu::g_device: the current device. Device 1 has one SM, so a launch's one wave is two blocks and
//   each block walks several row groups (what launchers cache per device stays apart).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "cuda_emu.h"

namespace emu {
inline bool g_device_allocations = true;
inline int g_device = 0;
}

extern "C" {
cudaError_t cudaGetDevice(int* d) {
  *d = emu::g_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev) {
  *v = a == cudaDevAttrMultiProcessorCount            ? (dev == 1 ? 1 : 132)
       : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 227 * 1024
       : a == cudaDevAttrComputeCapabilityMajor       ? 9
                                                      : 0;
  return cudaSuccess;
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* fa, const void*) {
  *fa = cudaFuncAttributes{};
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, const void*, int, size_t, unsigned) {
  *n = 2;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* s) {
  *s = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** p, size_t n) {
  *p = emu::g_device_allocations ? std::malloc(n) : nullptr;
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  std::memset(p, v, n);
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
}
namespace sqz {
cudaStream_t cuda_stream(int) { return nullptr; }
}  // namespace sqz

namespace emu {

inline int g_passed = 0, g_failed = 0;
inline void report(const std::string& name, bool ok, const std::string& what) {
  (ok ? g_passed : g_failed)++;
  std::printf("%s %s: %s\n", ok ? "ok  " : "FAIL", name.c_str(), what.c_str());
  std::fflush(stdout);
}
// The closing line the test reads; the exit status.
inline int finish() {
  std::printf("emu: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
// The seed of the run (argv[1], else a fresh one), printed first.
inline unsigned seed_of(int argc, char** argv) {
  const unsigned seed = argc > 1 ? (unsigned)std::strtoul(argv[1], nullptr, 10) : std::random_device{}();
  std::printf("seed %u\n", seed);
  return seed;
}

inline sqz::Tensor host(sqz::DType dt, std::vector<int64_t> shape) { return sqz::Tensor::empty(dt, shape, sqz::Device{}); }
inline sqz::Tensor ints(const std::vector<int32_t>& v, std::vector<int64_t> shape) {
  sqz::Tensor t = host(sqz::DType::I32, shape);
  std::memcpy(t.data(), v.data(), v.size() * 4);
  return t;
}
inline size_t nbytes(const sqz::Tensor& t) { return (size_t)t.numel() * sqz::dtype_size(t.dtype); }
inline void fill_bytes(const sqz::Tensor& t, uint8_t b) { std::memset(t.data(), b, nbytes(t)); }
inline bool same_bytes(const sqz::Tensor& a, const sqz::Tensor& b) { return std::memcmp(a.data(), b.data(), nbytes(a)) == 0; }
inline sqz::Tensor copy(const sqz::Tensor& t) {
  sqz::Tensor c = host(t.dtype, t.shape);
  std::memcpy(c.data(), t.data(), nbytes(t));
  return c;
}
inline std::vector<float> floats(const sqz::Tensor& t) {
  std::vector<float> f(t.numel());
  sqz::convert_to_float(t.data(), t.dtype, f.data(), f.size());
  return f;
}
inline void set_floats(const sqz::Tensor& t, const std::vector<float>& f) { sqz::convert_from_float(f.data(), t.data(), t.dtype, f.size()); }
// normal(0, scale) values, every `every`-th of them times `big` (outliers)
inline void randomize(const sqz::Tensor& t, std::mt19937& r, float scale = 1.f, float big = 1.f, int every = 1) {
  std::normal_distribution<float> nd;
  std::vector<float> f(t.numel());
  for (size_t i = 0; i < f.size(); ++i) f[i] = nd(r) * scale * (i % every == 0 ? big : 1.f);
  set_floats(t, f);
}
// ||got - want|| / ||want||, infinite where got holds a non-finite value
inline double rel_err(const sqz::Tensor& got, const sqz::Tensor& want) {
  const std::vector<float> a = floats(got), b = floats(want);
  double n = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    n += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    d += (double)b[i] * b[i];
  }
  return std::sqrt(n / std::max(d, 1e-30));
}

}  // namespace emu
