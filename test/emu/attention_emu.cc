// Runs the paged fp16/bf16 attention launchers (csrc/kernels/attention: append, the split-KV decode
// kernels and their in-kernel merge, the tensor-core decode, prefill) in the emulator against the CPU
// ops of the same signature (csrc/cpu/attention.cc): append byte for byte, attention to 2e-3 (fp16) /
// 1e-2 (bf16) relative error. The .cu files are compiled as their own translation units with
// cuda_emu.h in front (test/emu_build.ts). Prints one line per case and "emu: N passed, M failed".
#include "cuda_emu.h"

#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>

#include "cpu/attention.h"
#include "kernels/attention/attention.h"

// The CUDA runtime calls the launchers make: an H100-sized device; allocations (the decode merge's
// counters) are host memory.
extern "C" {
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 132 : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 227 * 1024 : a == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
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
  *p = std::malloc(n);
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

using sqz::DType;
using sqz::Tensor;

static int passed = 0, failed = 0;
static void report(const std::string& name, bool ok, const std::string& what) {
  (ok ? passed : failed)++;
  std::printf("%s %s: %s\n", ok ? "ok  " : "FAIL", name.c_str(), what.c_str());
  std::fflush(stdout);
}
static Tensor host(DType dt, std::vector<int64_t> shape) { return Tensor::empty(dt, shape, sqz::Device{}); }
static Tensor ints(const std::vector<int32_t>& v, std::vector<int64_t> shape) {
  Tensor t = host(DType::I32, shape);
  std::memcpy(t.data(), v.data(), v.size() * 4);
  return t;
}
static void fill_bytes(const Tensor& t, uint8_t b) { std::memset(t.data(), b, t.numel() * sqz::dtype_size(t.dtype)); }
static std::vector<float> floats(const Tensor& t) {
  std::vector<float> f(t.numel());
  sqz::convert_to_float(t.data(), t.dtype, f.data(), f.size());
  return f;
}
static void randomize(const Tensor& t, std::mt19937& r) {
  std::normal_distribution<float> nd;
  std::vector<float> f(t.numel());
  for (auto& v : f) v = nd(r);
  sqz::convert_from_float(f.data(), t.data(), t.dtype, f.size());
}
static double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double n = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    n += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    d += (double)b[i] * b[i];
  }
  return std::sqrt(n / std::max(d, 1e-30));
}

// Sequences of `lens` tokens in shuffled pages of 16, filled by a first append (each sequence's
// tokens but its last `rows`), then the last `rows` of each are appended by the CPU op and by the CUDA
// launcher (same bytes), and attended from: q rows per sequence = rows (decode for rows <= 4).
static void attention_case(int Hq, int Hkv, int D, std::vector<int> lens, int rows, DType dt, unsigned seed) {
  std::mt19937 r(seed);
  std::string name = "attention " + std::to_string(Hq) + "q/" + std::to_string(Hkv) + "kv D " + std::to_string(D) +
                     (dt == DType::F16 ? " f16" : " bf16") + " rows " + std::to_string(rows) + " L";
  for (int l : lens) name += " " + std::to_string(l);
  try {
    const int B = (int)lens.size(), P = 16;
    int maxp = 0;
    for (int l : lens) maxp = std::max(maxp, (l + P - 1) / P);
    const int pages = B * maxp + 1;
    Tensor kc = host(dt, {pages, P, Hkv, D}), vc = host(dt, {pages, P, Hkv, D});
    randomize(kc, r), randomize(vc, r);  // earlier tokens: whatever the pages hold
    std::vector<int32_t> perm(pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), r);
    Tensor pt = ints(std::vector<int32_t>(perm.begin(), perm.begin() + B * maxp), {B, maxp});
    std::vector<int32_t> cu{0};
    for (int b = 0; b < B; ++b) cu.push_back(cu.back() + std::min(rows, lens[b]));
    const int N = cu.back();
    Tensor lt = ints(std::vector<int32_t>(lens.begin(), lens.end()), {B}), cut = ints(cu, {B + 1});
    Tensor k = host(dt, {N, Hkv * D}), v = host(dt, {N, Hkv * D});
    randomize(k, r), randomize(v, r);
    Tensor kg = host(dt, {pages, P, Hkv, D}), vg = host(dt, {pages, P, Hkv, D});
    std::memcpy(kg.data(), kc.data(), (size_t)kc.numel() * sqz::dtype_size(dt));
    std::memcpy(vg.data(), vc.data(), (size_t)vc.numel() * sqz::dtype_size(dt));
    sqz::cpu::kv_append(kc, vc, k, v, pt, lt, cut);
    sqz::cuda::kv_append(kg, vg, k, v, pt, lt, cut, nullptr);
    const bool same = std::memcmp(kg.data(), kc.data(), (size_t)kc.numel() * sqz::dtype_size(dt)) == 0 &&
                      std::memcmp(vg.data(), vc.data(), (size_t)vc.numel() * sqz::dtype_size(dt)) == 0;
    report(name + " append", same, same ? "same bytes" : "differs");

    Tensor q = host(dt, {N, Hq, D});
    randomize(q, r);
    const float scale = 1.f / std::sqrt((float)D);
    Tensor want = host(dt, {N, Hq, D}), got = host(dt, {N, Hq, D});
    fill_bytes(got, 0xff);
    sqz::cpu::attention(want, q, kc, vc, pt, lt, cut, scale);
    const int maxlen = *std::max_element(lens.begin(), lens.end());
    const int64_t wf = sqz::cuda::attention_workspace_floats(0, B, Hq, Hkv, D, rows, maxlen);
    std::vector<float> ws((size_t)std::max<int64_t>(wf, 1), NAN);
    sqz::cuda::attention(got, q, kc, vc, pt, lt, cut, scale, rows, maxlen, ws.data(), wf, 0, nullptr);
    const double e = rel_err(floats(got), floats(want)), tol = dt == DType::F16 ? 2e-3 : 1e-2;
    char buf[80];
    std::snprintf(buf, sizeof buf, "%s, rel err %.3g (tol %.0e)",
                  sqz::cuda::attention_uses_decode(Hq, Hkv, D, rows) ? "decode" : "prefill", e, tol);
    report(name, e <= tol, buf);
  } catch (const std::exception& ex) {
    report(name, false, std::string("threw: ") + ex.what());
  }
}

int main(int argc, char** argv) {
  const unsigned seed = argc > 1 ? (unsigned)std::strtoul(argv[1], nullptr, 10) : std::random_device{}();
  std::printf("seed %u\n", seed);
  unsigned s = seed;
  attention_case(8, 2, 64, {1, 37, 300}, 1, DType::F16, s++);
  attention_case(4, 4, 128, {70, 129}, 1, DType::BF16, s++);
  attention_case(12, 3, 96, {45}, 1, DType::F16, s++);
  attention_case(8, 1, 128, {200, 17}, 3, DType::F16, s++);
  attention_case(4, 2, 64, {40, 90}, 40, DType::F16, s++);
  attention_case(8, 2, 128, {33}, 33, DType::BF16, s++);
  std::printf("emu: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
