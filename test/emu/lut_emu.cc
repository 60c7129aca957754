// Runs the SqueezeLLM CUDA launchers (csrc/kernels/lut_gemm/lut_gemm.cu, whole: the repack, the
// pair-LUT GEMVs with their code rings, mbarriers and bulk copies, the tiled GEMM) in the emulator
// (cuda_emu.h; shim/ supplies ptx.cuh, pdl.cuh and bulk_copy.cuh) against the CPU ops of the same
// signature (csrc/cpu/lut_gemm.cc): the repack byte for byte, products to 2e-3 (f16) / 1e-2 (bf16)
// relative error. Prints one line per case and "emu: N passed, M failed".
#include "emu_main.h"

// As an sm_90a build: the emulated device is compute capability 9.0, so the launchers take the Hopper
// kernels (the code rings of bulk copies and mbarriers) where a GPU build for 90a would.
#define SQUEEZELM_CUDA_ARCHS_STR "90a"
#include "cpu/lut_gemm.h"
#include "kernels/lut_gemm/lut_gemm.cu"

namespace sqz::cuda {
void matmul(const Tensor&, const Tensor&, const Tensor&, const Tensor*, cudaStream_t) {
  fail("ERR_UNSUPPORTED", "emulated: the dense GEMM is not part of this program");
}
}  // namespace sqz::cuda

using emu::fill_bytes;
using emu::host;
using emu::report;
using emu::set_floats;
using sqz::DType;
using sqz::Tensor;

struct Weight {
  Tensor packed, lut, rows, cols, vals;
  bool sparse = false;
};

// Random codes in the interchange layout, repacked by the CPU op and by the CUDA launcher (the two
// must agree byte for byte); a row table per output row; outliers at sorted distinct columns.
static Weight make_weight(int N, int K, int bits, double share, DType table, std::mt19937& r, const std::string& name) {
  const sqz::cpu::LutPacked L(bits, N, K);
  Tensor q = host(DType::I32, {L.Kg * bits / 32, N});
  for (int64_t i = 0; i < q.numel(); ++i) q.ptr<uint32_t>()[i] = r();
  Weight w;
  w.packed = host(DType::I32, {L.Np, L.words_per_row()});
  Tensor g = host(DType::I32, {L.Np, L.words_per_row()});
  fill_bytes(w.packed, 0x5a), fill_bytes(g, 0xa5);
  sqz::cpu::lut_repack(w.packed, q, bits);
  sqz::cuda::lut_repack(g, q, bits, nullptr);
  const bool same = std::memcmp(g.data(), w.packed.data(), (size_t)g.numel() * 4) == 0;
  report(name + " repack", same, same ? "same bytes" : "differs");
  const int E = 1 << bits;
  std::normal_distribution<float> nd;
  std::vector<float> lut((size_t)N * E);
  for (int n = 0; n < N; ++n) {
    std::vector<float> row(E);
    for (auto& v : row) v = nd(r) * 0.5f;
    std::sort(row.begin(), row.end());
    std::copy(row.begin(), row.end(), lut.begin() + (size_t)n * E);
  }
  w.lut = host(table, {N, E});
  set_floats(w.lut, lut);
  if (share > 0) {
    std::vector<int32_t> rp{0}, cp;
    std::vector<float> vp;
    std::uniform_real_distribution<double> u(0, 1);
    for (int n = 0; n < N; ++n) {
      for (int k = 0; k < K; ++k)
        if (u(r) < share) {
          cp.push_back(k);
          vp.push_back(nd(r) * 2.f);
        }
      rp.push_back((int32_t)cp.size());
    }
    w.rows = host(DType::I32, {N + 1});
    std::memcpy(w.rows.data(), rp.data(), rp.size() * 4);
    w.cols = host(DType::I32, {(int64_t)cp.size()});
    if (!cp.empty()) std::memcpy(w.cols.data(), cp.data(), cp.size() * 4);
    w.vals = host(table, {(int64_t)vp.size()});
    set_floats(w.vals, vp);
    w.sparse = true;
  }
  return w;
}

static void matmul_case(int M, int N, int K, int bits, DType dt, double share, sqz::cpu::LutEpilogue epi, bool norm,
                        unsigned seed) {
  std::mt19937 r(seed);
  char buf[200];
  std::snprintf(buf, sizeof buf, "lut %d-bit %s M %d N %d K %d outliers %.3g%%%s%s%s", bits, dt == DType::F16 ? "f16" : "bf16", M,
                N, K, share * 100, epi == sqz::cpu::kLutSiluPairs ? " siluPairs" : epi == sqz::cpu::kLutResidual ? " residual" : "",
                norm ? " norm" : "", (seed & 1) ? " next named" : "");
  const std::string name = buf;
  try {
    Weight w = make_weight(N, K, bits, share, dt == DType::BF16 && (seed & 1) ? DType::F32 : DType::F16, r, name);
    const int half = epi == sqz::cpu::kLutSiluPairs ? N / 2 : 0;
    const int ny = epi == sqz::cpu::kLutSiluPairs ? N / 2 : N;
    std::normal_distribution<float> nd;
    Tensor x = host(dt, {M, K});
    std::vector<float> xf((size_t)M * K);
    for (auto& v : xf) v = nd(r);
    set_floats(x, xf);
    Tensor gamma = host(dt, {K});
    std::vector<float> gf(K);
    for (auto& v : gf) v = 1.f + 0.3f * nd(r);
    set_floats(gamma, gf);
    Tensor want = host(dt, {M, ny}), got = host(dt, {M, ny});
    if (epi == sqz::cpu::kLutResidual) {
      std::vector<float> y0((size_t)M * ny);
      for (auto& v : y0) v = nd(r);
      set_floats(want, y0), set_floats(got, y0);
    } else {
      fill_bytes(got, 0xff);  // NaN
    }
    const Tensor *rows = w.sparse ? &w.rows : nullptr, *cols = w.sparse ? &w.cols : nullptr, *vals = w.sparse ? &w.vals : nullptr;
    sqz::cpu::lut_matmul_packed(want, x, w.packed, w.lut, rows, cols, vals, bits, half, epi, norm ? &gamma : nullptr, 1e-6f);
    // Odd seeds name the weight's own codes as the next launch's: the decode GEMVs then take their NEXT
    // kernels (the L2 request itself is a no-op here; what it computes around it is not).
    sqz::cuda::lut_matmul_packed(got, x, w.packed, w.lut, rows, cols, vals, bits, half, epi, norm ? &gamma : nullptr, 1e-6f,
                                 (seed & 1) ? &w.packed : nullptr, nullptr);
    const double e = emu::rel_err(got, want), tol = dt == DType::F16 ? 2e-3 : 1e-2;
    std::snprintf(buf, sizeof buf, "rel err %.3g (tol %.0e)", e, tol);
    report(name, e <= tol, buf);
  } catch (const std::exception& ex) {
    report(name, false, std::string("threw: ") + ex.what());
  }
}

int main(int argc, char** argv) {
  const unsigned seed = emu::seed_of(argc, argv);
  // no xT buffer, so no launch with the outlier step's grid barrier: the emulator runs the blocks one
  // after another, and that barrier waits for all of them at once
  emu::g_device_allocations = false;
  setenv("SQUEEZELM_LUT_DENSE_MIN_M", "0", 1);  // past M = 64: the tiled LUT GEMM, not the dense copy
  using sqz::cpu::kLutResidual;
  using sqz::cpu::kLutSiluPairs;
  using sqz::cpu::kLutStore;
  unsigned s = seed;
  // the decode step's GEMV (M = 1, 2; ring or register buffers), with and without outliers, K with a
  // tail past whole units, odd N
  matmul_case(1, 100, 544, 4, DType::F16, 0.0045, kLutStore, false, s++);
  matmul_case(1, 37, 1056, 3, DType::F16, 0.0045, kLutStore, false, s++);
  matmul_case(2, 64, 288, 4, DType::BF16, 0, kLutStore, false, s++);
  matmul_case(1, 48, 640, 3, DType::BF16, 0.01, kLutStore, false, s++);
  // 4-bit with several runs of code units per warp: the outlier step inside the main loop, and rows
  // longer than the entries a lane requests early (3% of K), plain and behind the fused RMSNorm
  matmul_case(1, 40, 4128, 4, DType::F16, 0.03, kLutStore, false, s++);
  matmul_case(2, 40, 4128, 4, DType::BF16, 0.03, kLutStore, true, s++);
  // 3-bit with more runs of code units per warp than one (10 units over 8 warps): its in-loop step
  matmul_case(1, 40, 4640, 3, DType::F16, 0.03, kLutStore, false, s++);
  // the same split over 4 activation rows (the 4-bit ring kernel at M = 3-4; M = 3 leaves one empty)
  matmul_case(3, 40, 4128, 4, DType::F16, 0.03, kLutStore, false, s++);
  matmul_case(4, 40, 4128, 4, DType::BF16, 0.03, kLutStore, false, s++);
  // rows so long (12% of K) that a lane's entries after the main loop fill several batches of 4 and a part
  matmul_case(1, 40, 4128, 4, DType::F16, 0.12, kLutStore, false, s++);
  matmul_case(2, 40, 4640, 3, DType::BF16, 0.12, kLutStore, true, s++);
  matmul_case(4, 40, 4128, 4, DType::F16, 0.12, kLutStore, false, s++);
  // the register buffers instead of the rings (what builds for other GPUs take); on the device of one
  // SM (below) each block walks several row groups, so the buffers' cross-group refill runs too
  setenv("SQUEEZELM_LUT_RING", "0", 1);
  matmul_case(1, 100, 544, 4, DType::F16, 0.0045, kLutStore, false, s++);
  matmul_case(2, 37, 1056, 3, DType::F16, 0.0045, kLutStore, true, s++);
  emu::g_device = 1;
  matmul_case(1, 100, 2080, 4, DType::F16, 0.0045, kLutStore, false, s++);
  matmul_case(2, 90, 1056, 3, DType::F16, 0.0045, kLutStore, false, s++);
  emu::g_device = 0;
  unsetenv("SQUEEZELM_LUT_RING");
  // the fused RMSNorm and the epilogues
  matmul_case(1, 64, 256, 4, DType::F16, 0.0045, kLutStore, true, s++);
  matmul_case(2, 96, 544, 3, DType::F16, 0.0045, kLutSiluPairs, true, s++);
  matmul_case(1, 80, 512, 4, DType::F16, 0.0045, kLutResidual, false, s++);
  // a device of one SM: each block walks several row groups (the ring's copies run on into the block's
  // next group, whose tables and outlier bounds are requested during this one), with outliers in the
  // main loop and after it, 4 and 3 bits (3-bit: 4 warps, then 8)
  emu::g_device = 1;
  matmul_case(1, 100, 4128, 4, DType::F16, 0.03, kLutStore, false, s++);
  matmul_case(2, 90, 8224, 4, DType::BF16, 0.012, kLutResidual, true, s++);
  matmul_case(1, 70, 544, 4, DType::F16, 0.0045, kLutStore, false, s++);
  matmul_case(1, 90, 4640, 3, DType::F16, 0.03, kLutStore, false, s++);
  matmul_case(2, 90, 1056, 3, DType::BF16, 0.12, kLutStore, true, s++);
  setenv("SQUEEZELM_LUT_DECODE_WARPS", "8", 1);
  matmul_case(1, 90, 4640, 3, DType::F16, 0.03, kLutStore, false, s++);
  unsetenv("SQUEEZELM_LUT_DECODE_WARPS");
  matmul_case(8, 70, 1056, 4, DType::F16, 0.0045, kLutStore, false, s++);
  emu::g_device = 0;
  // more rows: M = 3..64 (the ring's and the outlier-split kernels), then the tiled GEMM
  matmul_case(5, 50, 384, 4, DType::F16, 0.0045, kLutStore, false, s++);
  matmul_case(16, 33, 320, 3, DType::BF16, 0.0045, kLutStore, false, s++);
  matmul_case(33, 40, 256, 4, DType::F16, 0.0045, kLutStore, false, s++);
  matmul_case(70, 24, 160, 3, DType::F16, 0.0045, kLutStore, false, s++);
  return emu::finish();
}
