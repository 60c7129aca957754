// Bindings of the decoder's small ops: embedding, norms, rope, siluMul, add, cast, fills,
// gatherRows, argmax, sample. CPU accepts any float dtype per tensor; CUDA wants the
// activations and weights of one call in one dtype (f32, f16 or bf16).
#include <cmath>
#include <string>

#include "../cpu/elementwise.h"
#include "op.h"
#ifdef SQUEEZELM_WITH_CUDA
#include "../kernels/common/common.h"
#endif

namespace sqz::napi {
namespace {

constexpr std::initializer_list<DType> kFloat = {DType::F32, DType::F16, DType::BF16};

// On CUDA every float tensor of the call must share the first one's dtype.
void cuda_same_dtype(const Args& a, std::initializer_list<std::pair<const Tensor*, const char*>> ts) {
  const auto& first = *ts.begin();
  if (!first.first->device.is_cuda()) return;
  for (const auto& t : ts)
    if (t.first->dtype != first.first->dtype)
      a.error("ERR_DTYPE", std::string("on CUDA ") + t.second + " (" + dtype_name(t.first->dtype) + ") must have the dtype of " +
                               first.second + " (" + dtype_name(first.first->dtype) + ")");
}

void same_numel(const Args& a, const Tensor& x, const char* xn, const Tensor& y, const char* yn) {
  if (x.numel() != y.numel())
    a.error("ERR_SHAPE", std::string(xn) + " " + x.shape_str() + " and " + yn + " " + y.shape_str() + " differ in size");
}

float eps_arg(const Args& a, size_t i) {
  double eps = a.number(i, "eps");
  if (!(eps >= 0) || !std::isfinite(eps)) a.error("ERR_ARG", "eps must be a finite number >= 0");
  return (float)eps;
}

uint64_t seed_arg(const Args& a, size_t i) {
  int64_t s = a.integer(i, "seed");
  if (s < 0) a.error("ERR_ARG", "seed must be >= 0");
  return (uint64_t)s;
}

// Row gather shared by embedding and gatherRows: out[n, H] <- src[rows, H] by idx i32[n].
void gather_checks(const Args& a, const Tensor& out, const char* on, const Tensor& idx, const char* in,
                   const Tensor& src, const char* sn) {
  a.dtype_in(idx, in, {DType::I32});
  a.same_device({{&out, on}, {&idx, in}, {&src, sn}});
  a.ndim(out, on, 2);
  a.ndim(src, sn, 2);
  a.ndim(idx, in, 1);
  a.shape_is(out, on, {idx.dim(0), src.dim(1)});
  if (out.dtype != src.dtype) {
    if (!is_float(out.dtype) || !is_float(src.dtype))
      a.error("ERR_DTYPE", std::string(on) + " (" + dtype_name(out.dtype) + ") and " + sn + " (" + dtype_name(src.dtype) +
                               ") must share a dtype unless both are float");
    cuda_same_dtype(a, {{&src, sn}, {&out, on}});
  }
}

}  // namespace

// embedding(out[T,H], ids i32[T], table[V,H]): ids outside [0, V) give zero rows.
SQZ_OP(embedding) {
  Args a(info, "embedding");
  Tensor out = a.tensor(0, "out"), ids = a.tensor(1, "ids"), table = a.tensor(2, "table");
  a.dtype_in(out, "out", kFloat);
  a.dtype_in(table, "table", kFloat);
  gather_checks(a, out, "out", ids, "ids", table, "table");
  dispatch(out.device, "embedding", [=] { cpu::embedding(out, ids, table); },
           [&](int dev) { CUDA_ONLY(cuda::gather_rows(out, table, ids, cuda_stream(dev))); });
  return a.env().Undefined();
}

// gatherRows(out[n,H], x[T,H], index i32[n]): indices outside [0, T) give zero rows.
SQZ_OP(gatherRows) {
  Args a(info, "gatherRows");
  Tensor out = a.tensor(0, "out"), x = a.tensor(1, "x"), index = a.tensor(2, "index");
  gather_checks(a, out, "out", index, "index", x, "x");
  dispatch(out.device, "gatherRows", [=] { cpu::gather_rows(out, x, index); },
           [&](int dev) { CUDA_ONLY(cuda::gather_rows(out, x, index, cuda_stream(dev))); });
  return a.env().Undefined();
}

// rmsNorm(out[..., H], x[..., H], weight[H], eps)
SQZ_OP(rmsNorm) {
  Args a(info, "rmsNorm");
  Tensor out = a.tensor(0, "out"), x = a.tensor(1, "x"), w = a.tensor(2, "weight");
  float eps = eps_arg(a, 3);
  a.dtype_in(out, "out", kFloat);
  a.dtype_in(x, "x", kFloat);
  a.dtype_in(w, "weight", kFloat);
  a.same_device({{&out, "out"}, {&x, "x"}, {&w, "weight"}});
  if (x.ndim() < 1 || x.dim(-1) == 0) a.error("ERR_SHAPE", "x " + x.shape_str() + " needs a non-empty last dimension");
  a.shape_is(out, "out", x.shape);
  a.shape_is(w, "weight", {x.dim(-1)});
  cuda_same_dtype(a, {{&x, "x"}, {&out, "out"}, {&w, "weight"}});
  dispatch(out.device, "rmsNorm", [=] { cpu::rms_norm(out, x, w, eps); },
           [&](int dev) { CUDA_ONLY(cuda::rms_norm(out, x, w, eps, cuda_stream(dev))); });
  return a.env().Undefined();
}

// addRmsNorm(residual, x, out, weight, eps): residual += x; out = rmsnorm(residual) * weight.
SQZ_OP(addRmsNorm) {
  Args a(info, "addRmsNorm");
  Tensor res = a.tensor(0, "residual"), x = a.tensor(1, "x"), out = a.tensor(2, "out"), w = a.tensor(3, "weight");
  float eps = eps_arg(a, 4);
  a.dtype_in(res, "residual", kFloat);
  a.dtype_in(x, "x", kFloat);
  a.dtype_in(out, "out", kFloat);
  a.dtype_in(w, "weight", kFloat);
  a.same_device({{&res, "residual"}, {&x, "x"}, {&out, "out"}, {&w, "weight"}});
  if (x.ndim() < 1 || x.dim(-1) == 0) a.error("ERR_SHAPE", "x " + x.shape_str() + " needs a non-empty last dimension");
  a.shape_is(res, "residual", x.shape);
  a.shape_is(out, "out", x.shape);
  a.shape_is(w, "weight", {x.dim(-1)});
  cuda_same_dtype(a, {{&x, "x"}, {&res, "residual"}, {&out, "out"}, {&w, "weight"}});
  dispatch(out.device, "addRmsNorm", [=] { cpu::add_rms_norm(res, x, out, w, eps); },
           [&](int dev) { CUDA_ONLY(cuda::add_rms_norm(res, x, out, w, eps, cuda_stream(dev))); });
  return a.env().Undefined();
}

// rope(x[T,heads,D], positions i32[T], invFreq f32[D/2]): in place, rotate-half pairs.
SQZ_OP(rope) {
  Args a(info, "rope");
  Tensor x = a.tensor(0, "x"), pos = a.tensor(1, "positions"), f = a.tensor(2, "invFreq");
  a.dtype_in(x, "x", kFloat);
  a.dtype_in(pos, "positions", {DType::I32});
  a.dtype_in(f, "invFreq", {DType::F32});
  a.same_device({{&x, "x"}, {&pos, "positions"}, {&f, "invFreq"}});
  a.ndim(x, "x", 3);
  if (x.dim(2) % 2 != 0) a.error("ERR_SHAPE", "x " + x.shape_str() + ": head dim must be even");
  a.shape_is(pos, "positions", {x.dim(0)});
  a.shape_is(f, "invFreq", {x.dim(2) / 2});
  dispatch(x.device, "rope", [=] { cpu::rope(x, pos, f); },
           [&](int dev) { CUDA_ONLY(cuda::rope(x, pos, f, cuda_stream(dev))); });
  return a.env().Undefined();
}

// siluMul(out[..., I], gateUp[..., 2I]): out = silu(gate) * up.
SQZ_OP(siluMul) {
  Args a(info, "siluMul");
  Tensor out = a.tensor(0, "out"), gu = a.tensor(1, "gateUp");
  a.dtype_in(out, "out", kFloat);
  a.dtype_in(gu, "gateUp", kFloat);
  a.same_device({{&out, "out"}, {&gu, "gateUp"}});
  if (gu.ndim() < 1 || out.ndim() != gu.ndim()) a.error("ERR_SHAPE", "out " + out.shape_str() + " and gateUp " + gu.shape_str() + " must have the same rank");
  std::vector<int64_t> want = gu.shape;
  if (want.back() % 2 != 0) a.error("ERR_SHAPE", "gateUp " + gu.shape_str() + ": last dimension must be even (gate | up)");
  want.back() /= 2;
  a.shape_is(out, "out", want);
  cuda_same_dtype(a, {{&gu, "gateUp"}, {&out, "out"}});
  dispatch(out.device, "siluMul", [=] { cpu::silu_mul(out, gu); },
           [&](int dev) { CUDA_ONLY(cuda::silu_mul(out, gu, cuda_stream(dev))); });
  return a.env().Undefined();
}

// add(out, a, b): a has out's element count; b has it too, or is one row of out's last
// dimension added to every row (a bias). out may alias a (or b when they have one size).
SQZ_OP(add) {
  Args a(info, "add");
  Tensor out = a.tensor(0, "out"), x = a.tensor(1, "a"), y = a.tensor(2, "b");
  a.dtype_in(out, "out", kFloat);
  a.dtype_in(x, "a", kFloat);
  a.dtype_in(y, "b", kFloat);
  a.same_device({{&out, "out"}, {&x, "a"}, {&y, "b"}});
  same_numel(a, out, "out", x, "a");
  if (y.numel() != out.numel()) {
    const bool row = out.ndim() >= 1 && y.numel() == out.dim(-1) && y.numel() > 0;
    if (!row)
      a.error("ERR_SHAPE", "b " + y.shape_str() + " is neither out " + out.shape_str() +
                               "'s size nor one row of its last dimension");
    if (y.data() == out.data()) a.error("ERR_ARG", "add: a broadcast row b must not alias out");
  }
  cuda_same_dtype(a, {{&out, "out"}, {&x, "a"}, {&y, "b"}});
  dispatch(out.device, "add", [=] { cpu::add(out, x, y); },
           [&](int dev) { CUDA_ONLY(cuda::add(out, x, y, cuda_stream(dev))); });
  return a.env().Undefined();
}

// cast(out, x): any float dtype to any float dtype, round to nearest even.
SQZ_OP(cast) {
  Args a(info, "cast");
  Tensor out = a.tensor(0, "out"), x = a.tensor(1, "x");
  a.dtype_in(out, "out", kFloat);
  a.dtype_in(x, "x", kFloat);
  a.same_device({{&out, "out"}, {&x, "x"}});
  same_numel(a, out, "out", x, "x");
  dispatch(out.device, "cast", [=] { cpu::cast(out, x); },
           [&](int dev) { CUDA_ONLY(cuda::cast(out, x, cuda_stream(dev))); });
  return a.env().Undefined();
}

// fill(t, value): any dtype; integer dtypes need an integer value in range.
SQZ_OP(fill) {
  Args a(info, "fill");
  Tensor t = a.tensor(0, "t");
  double v = a.opt_number(1, "value", 0.0);
  if (!is_float(t.dtype)) {
    double lo = 0, hi = 0;
    switch (t.dtype) {
      case DType::I32: lo = -2147483648.0, hi = 2147483647.0; break;
      case DType::U32: lo = 0, hi = 4294967295.0; break;
      case DType::I8: lo = -128, hi = 127; break;
      default: lo = 0, hi = 255; break;
    }
    if (v != std::floor(v) || v < lo || v > hi)
      a.error("ERR_ARG", "value " + std::to_string(v) + " is not a " + dtype_name(t.dtype) + " integer");
  }
  dispatch(t.device, "fill", [=] { cpu::fill(t, v); },
           [&](int dev) { CUDA_ONLY(cuda::fill(t, v, cuda_stream(dev))); });
  return a.env().Undefined();
}

// fillRandom(t, seed, mean = 0, std = 1): normal values; the same seed gives the same
// tensor on CPU and CUDA.
SQZ_OP(fillRandom) {
  Args a(info, "fillRandom");
  Tensor t = a.tensor(0, "t");
  uint64_t seed = seed_arg(a, 1);
  float mean = (float)a.opt_number(2, "mean", 0.0), sd = (float)a.opt_number(3, "std", 1.0);
  a.dtype_in(t, "t", kFloat);
  dispatch(t.device, "fillRandom", [=] { cpu::fill_random(t, seed, mean, sd); },
           [&](int dev) { CUDA_ONLY(cuda::fill_random(t, seed, mean, sd, cuda_stream(dev))); });
  return a.env().Undefined();
}

// fillRandomInt(t, seed): uniform random bits in every element of an integer tensor.
SQZ_OP(fillRandomInt) {
  Args a(info, "fillRandomInt");
  Tensor t = a.tensor(0, "t");
  uint64_t seed = seed_arg(a, 1);
  a.dtype_in(t, "t", {DType::I32, DType::U32, DType::I8, DType::U8});
  dispatch(t.device, "fillRandomInt", [=] { cpu::fill_random_int(t, seed); },
           [&](int dev) { CUDA_ONLY(cuda::fill_random_int(t, seed, cuda_stream(dev))); });
  return a.env().Undefined();
}

// argmax(out i32[B], logits[B,V]): ties -> lowest index; NaN never wins.
SQZ_OP(argmax) {
  Args a(info, "argmax");
  Tensor out = a.tensor(0, "out"), logits = a.tensor(1, "logits");
  a.dtype_in(out, "out", {DType::I32});
  a.dtype_in(logits, "logits", kFloat);
  a.same_device({{&out, "out"}, {&logits, "logits"}});
  a.ndim(logits, "logits", 2);
  if (logits.dim(1) == 0) a.error("ERR_SHAPE", "logits " + logits.shape_str() + " has no columns");
  a.shape_is(out, "out", {logits.dim(0)});
  dispatch(out.device, "argmax", [=] { cpu::argmax(out, logits); },
           [&](int dev) { CUDA_ONLY(cuda::argmax(out, logits, cuda_stream(dev))); });
  return a.env().Undefined();
}

// sample(out i32[B], logits[B,V], temperature f32[B], topK i32[B], topP f32[B], rng u32[B,2])
SQZ_OP(sample) {
  Args a(info, "sample");
  Tensor out = a.tensor(0, "out"), logits = a.tensor(1, "logits"), temp = a.tensor(2, "temperature"),
         topk = a.tensor(3, "topK"), topp = a.tensor(4, "topP"), rng = a.tensor(5, "rng");
  a.dtype_in(out, "out", {DType::I32});
  a.dtype_in(logits, "logits", kFloat);
  a.dtype_in(temp, "temperature", {DType::F32});
  a.dtype_in(topk, "topK", {DType::I32});
  a.dtype_in(topp, "topP", {DType::F32});
  a.dtype_in(rng, "rng", {DType::U32});
  a.same_device({{&out, "out"}, {&logits, "logits"}, {&temp, "temperature"}, {&topk, "topK"}, {&topp, "topP"}, {&rng, "rng"}});
  a.ndim(logits, "logits", 2);
  const int64_t b = logits.dim(0), v = logits.dim(1);
  if (v == 0) a.error("ERR_SHAPE", "logits " + logits.shape_str() + " has no columns");
  // Integer mass: V * 2^40 must fit in 63 bits.
  if (v > (int64_t(1) << 22)) a.error("ERR_SHAPE", "logits " + logits.shape_str() + ": vocabulary above 4194304");
  a.shape_is(out, "out", {b});
  a.shape_is(temp, "temperature", {b});
  a.shape_is(topk, "topK", {b});
  a.shape_is(topp, "topP", {b});
  a.shape_is(rng, "rng", {b, 2});
  dispatch(out.device, "sample", [=] { cpu::sample(out, logits, temp, topk, topp, rng); },
           [&](int dev) { CUDA_ONLY(cuda::sample(out, logits, temp, topk, topp, rng, cuda_stream(dev))); });
  return a.env().Undefined();
}

}  // namespace sqz::napi
