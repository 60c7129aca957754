// cuBLAS as a benchmark baseline, loaded with dlopen at first use: the addon never links it
// (it is hundreds of megabytes and only the benchmarks want it). The few prototypes used are
// declared here with cuBLAS's ABI (handles are opaque pointers, enums are ints).
#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "core/cuda_stream.h"
#include "gemm.h"

namespace sqz::cuda {
namespace {

using Handle = void*;
using CreateFn = int (*)(Handle*);
using SetStreamFn = int (*)(Handle, cudaStream_t);
using GemmExFn = int (*)(Handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                         int Atype, int lda, const void* B, int Btype, int ldb, const void* beta, void* C, int Ctype,
                         int ldc, int computeType, int algo);

// Values from cublas_api.h / library_types.h.
constexpr int CUBLAS_OP_N = 0, CUBLAS_OP_T = 1;
constexpr int CUDA_R_16F = 2, CUDA_R_16BF = 14;
constexpr int CUBLAS_COMPUTE_32F = 68;
constexpr int CUBLAS_GEMM_DEFAULT = -1;

struct Lib {
  void* so = nullptr;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm = nullptr;
  std::string why;
  std::vector<Handle> handles;  // one per device
};

std::vector<std::string> fixed_candidates() {
  std::vector<std::string> c;
  if (const char* e = std::getenv("SQUEEZELM_CUBLAS"); e && *e) c.push_back(e);
  for (const char* n : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) c.push_back(n);
  c.push_back("/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cublas/lib/libcublas.so.13");
  for (const char* n : {"/usr/local/cuda/lib64/libcublas.so", "/usr/local/cuda/lib64/libcublas.so.13",
                        "/usr/local/cuda/lib64/libcublas.so.12"})
    c.push_back(n);
  return c;
}

// Only when nothing above loads (a directory walk is slow).
std::vector<std::string> scanned_candidates() {
  std::vector<std::string> c;
  // cuBLAS also ships inside pip wheels (nvidia-cublas-cu12/13): look through site-packages.
  namespace fs = std::filesystem;
  std::error_code ec;
  for (const char* root : {"/opt", "/usr/lib", "/usr/local/lib"}) {
    fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec), end;
    for (int seen = 0; it != end && seen < 200000; it.increment(ec), ++seen) {
      if (ec) break;
      if (it.depth() > 8) { it.disable_recursion_pending(); continue; }
      const fs::path& p = it->path();
      const std::string name = p.filename().string();
      if (name.rfind("libcublas.so", 0) == 0 && p.parent_path().string().find("nvidia/cublas/lib") != std::string::npos)
        c.push_back(p.string());
    }
  }
  return c;
}

Lib& lib() {
  static Lib l;
  static std::once_flag once;
  std::call_once(once, [] {
    std::string tried;
    auto try_load = [&](const std::string& path) {
      void* so = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!so) {
        tried += (tried.empty() ? "" : ", ") + path;
        return false;
      }
      auto create = reinterpret_cast<CreateFn>(dlsym(so, "cublasCreate_v2"));
      auto set_stream = reinterpret_cast<SetStreamFn>(dlsym(so, "cublasSetStream_v2"));
      auto gemm = reinterpret_cast<GemmExFn>(dlsym(so, "cublasGemmEx"));
      if (create && set_stream && gemm) {
        l.so = so;
        l.create = create;
        l.set_stream = set_stream;
        l.gemm = gemm;
        return true;
      }
      dlclose(so);
      tried += (tried.empty() ? "" : ", ") + path + " (symbols missing)";
      return false;
    };
    for (const auto& p : fixed_candidates())
      if (try_load(p)) return;
    for (const auto& p : scanned_candidates())
      if (try_load(p)) return;
    l.why = "no usable libcublas (tried " + tried + "; set SQUEEZELM_CUBLAS to its path)";
  });
  return l;
}

std::mutex handle_mutex;

Handle handle_for(int device) {
  Lib& l = lib();
  std::lock_guard<std::mutex> lk(handle_mutex);
  if ((int)l.handles.size() <= device) l.handles.resize(device + 1, nullptr);
  if (!l.handles[device]) {
    int prev = 0;
    cuda_check(cudaGetDevice(&prev), "cublasMatmul: cudaGetDevice");
    cuda_check(cudaSetDevice(device), "cublasMatmul: cudaSetDevice");
    Handle h = nullptr;
    int st = l.create(&h);
    cudaSetDevice(prev);
    if (st != 0) fail("ERR_CUDA", "cublasMatmul: cublasCreate failed with status " + std::to_string(st));
    l.handles[device] = h;
  }
  return l.handles[device];
}

}  // namespace

bool cublas_available() { return lib().so != nullptr; }
std::string cublas_unavailable_reason() { return lib().why; }

void cublas_matmul(const Tensor& y, const Tensor& x, const Tensor& w, int device, cudaStream_t stream) {
  Lib& l = lib();
  if (!l.so) fail("ERR_UNSUPPORTED", "cublasMatmul: " + l.why);
  const long long M = x.dim(0), K = x.dim(1), N = w.dim(0);
  if (M == 0 || N == 0) return;
  if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) fail("ERR_SHAPE", "cublasMatmul: dimensions above 2^31 - 1");
  const int dt = x.dtype == DType::F16 ? CUDA_R_16F : x.dtype == DType::BF16 ? CUDA_R_16BF : -1;
  if (dt < 0) fail("ERR_DTYPE", "cublasMatmul: f16 or bf16 only");
  Handle h = handle_for(device);
  int prev = 0;
  cuda_check(cudaGetDevice(&prev), "cublasMatmul: cudaGetDevice");
  cuda_check(cudaSetDevice(device), "cublasMatmul: cudaSetDevice");
  int st = l.set_stream(h, stream);
  // cuBLAS is column-major: row-major y[M,N] is a column-major [N,M] matrix C, w row-major
  // [N,K] is column-major [K,N] (ld K), x row-major [M,K] is column-major [K,M] (ld K), so
  // C = op_T(w) · x with m = N, n = M, k = K.
  const float alpha = 1.f, beta = 0.f;
  if (st == 0)
    st = l.gemm(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &alpha, w.data(), dt, (int)K, x.data(), dt,
                (int)K, &beta, y.data(), dt, (int)N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  cudaSetDevice(prev);
  if (st != 0) fail("ERR_CUDA", "cublasMatmul: cublasGemmEx failed with status " + std::to_string(st));
}

}  // namespace sqz::cuda
