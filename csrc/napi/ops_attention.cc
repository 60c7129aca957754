// Bindings of the paged-attention ops: kvAppend, attention, attentionWorkspaceSize.
#include <cstdint>
#include <string>

#include "../cpu/attention.h"
#include "op.h"
#ifdef SQUEEZELM_WITH_CUDA
#include "../kernels/attention/attention.h"
#endif

namespace sqz::napi {

namespace {

// Checks shared by both ops: cache pair, index tensors, and the device rules.
struct Paged {
  int64_t B, pages, page_size, Hkv, D, max_pages;
};

Paged check_paged(const Args& a, const Tensor& kc, const Tensor& vc, const Tensor& pt, const Tensor& lens,
                  const Tensor& cuq) {
  a.ndim(kc, "kCache", 4);
  a.shape_is(vc, "vCache", kc.shape);
  a.same_dtype(kc, "kCache", vc, "vCache");
  a.dtype_in(kc, "kCache", {DType::F32, DType::F16, DType::BF16});
  a.dtype_in(pt, "pageTable", {DType::I32});
  a.dtype_in(lens, "seqLens", {DType::I32});
  a.dtype_in(cuq, "cuQ", {DType::I32});
  a.ndim(lens, "seqLens", 1);
  const int64_t B = lens.dim(0);
  a.shape_is(pt, "pageTable", {B, -1});
  a.shape_is(cuq, "cuQ", {B + 1});
  Paged p{B, kc.dim(0), kc.dim(1), kc.dim(2), kc.dim(3), pt.dim(1)};
  if (p.page_size < 1 || p.Hkv < 1 || p.D < 1) a.error("ERR_SHAPE", "kCache " + kc.shape_str() + " has an empty dimension");
  if (p.pages > INT32_MAX || p.B > 65535 || p.max_pages * p.page_size > INT32_MAX)
    a.error("ERR_SHAPE", "kCache " + kc.shape_str() + " / pageTable " + pt.shape_str() + " exceed the supported sizes");
  return p;
}

// CUDA kernels move 16 bytes at a time.
void check_cuda_vectors(const Args& a, std::initializer_list<std::pair<const Tensor*, const char*>> ts, int64_t D) {
  if (D % 8 != 0 || D > 256)
    a.error("ERR_SHAPE", "head_dim " + std::to_string(D) + " is not supported on CUDA (multiples of 8 up to 256)");
  for (auto& t : ts)
    if (reinterpret_cast<uintptr_t>(t.first->data()) % 16 != 0)
      a.error("ERR_ARG", std::string(t.second) + " must start on a 16-byte boundary (a view at an odd offset?)");
}

}  // namespace

// kvAppend(kCache, vCache, k[N,kvHeads,D], v[N,kvHeads,D], pageTable i32[B,maxPages], seqLens i32[B], cuQ i32[B+1])
SQZ_OP(kvAppend) {
  Args a(info, "kvAppend");
  Tensor kc = a.tensor(0, "kCache"), vc = a.tensor(1, "vCache"), k = a.tensor(2, "k"), v = a.tensor(3, "v");
  Tensor pt = a.tensor(4, "pageTable"), lens = a.tensor(5, "seqLens"), cuq = a.tensor(6, "cuQ");
  a.same_device({{&kc, "kCache"}, {&vc, "vCache"}, {&k, "k"}, {&v, "v"}, {&pt, "pageTable"}, {&lens, "seqLens"},
                 {&cuq, "cuQ"}});
  Paged p = check_paged(a, kc, vc, pt, lens, cuq);
  a.shape_is(k, "k", {-1, p.Hkv, p.D});
  a.shape_is(v, "v", k.shape);
  a.same_dtype(k, "k", v, "v");
  if (kc.device.is_cuda()) {
    a.dtype_in(k, "k", {DType::F16, DType::BF16});
    a.same_dtype(kc, "kCache", k, "k");
    check_cuda_vectors(a, {{&kc, "kCache"}, {&vc, "vCache"}, {&k, "k"}, {&v, "v"}}, p.D);
  } else {
    a.dtype_in(k, "k", {DType::F32, DType::F16, DType::BF16});
  }
  if (k.dim(0) > INT32_MAX) a.error("ERR_SHAPE", "k has too many rows");
  dispatch(
      kc.device, "kvAppend", [=] { cpu::kv_append(kc, vc, k, v, pt, lens, cuq); },
      [&](int dev) { CUDA_ONLY(cuda::kv_append(kc, vc, k, v, pt, lens, cuq, cuda_stream(dev))); });
  return a.env().Undefined();
}

// attention(out[N,Hq,D], q[N,Hq,D], kCache, vCache, pageTable, seqLens, cuQ, scale, maxQ, maxSeqLen, workspace?)
SQZ_OP(attention) {
  Args a(info, "attention");
  Tensor out = a.tensor(0, "out"), q = a.tensor(1, "q"), kc = a.tensor(2, "kCache"), vc = a.tensor(3, "vCache");
  Tensor pt = a.tensor(4, "pageTable"), lens = a.tensor(5, "seqLens"), cuq = a.tensor(6, "cuQ");
  const double scale_d = a.number(7, "scale");
  const int64_t max_q_in = a.integer(8, "maxQ"), max_seq_len = a.integer(9, "maxSeqLen");
  std::optional<Tensor> ws = a.opt_tensor(10, "workspace");
  a.same_device({{&out, "out"}, {&q, "q"}, {&kc, "kCache"}, {&vc, "vCache"}, {&pt, "pageTable"}, {&lens, "seqLens"},
                 {&cuq, "cuQ"}});
  Paged p = check_paged(a, kc, vc, pt, lens, cuq);
  a.ndim(q, "q", 3);
  a.shape_is(out, "out", q.shape);
  if (q.dim(2) != p.D) a.error("ERR_SHAPE", "q " + q.shape_str() + " and kCache " + kc.shape_str() + " differ in head_dim");
  const int64_t Hq = q.dim(1), N = q.dim(0);
  if (Hq < 1 || Hq % p.Hkv != 0)
    a.error("ERR_SHAPE", "q has " + std::to_string(Hq) + " heads, not a multiple of the cache's " +
                             std::to_string(p.Hkv) + " kv heads");
  if (max_q_in < 1) a.error("ERR_ARG", "maxQ must be >= 1, got " + std::to_string(max_q_in));
  if (max_seq_len < 0) a.error("ERR_ARG", "maxSeqLen must be >= 0, got " + std::to_string(max_seq_len));
  if (max_seq_len > p.max_pages * p.page_size)
    a.error("ERR_CONTEXT_LENGTH", "maxSeqLen " + std::to_string(max_seq_len) + " exceeds what pageTable " +
                                      pt.shape_str() + " addresses (" + std::to_string(p.max_pages * p.page_size) +
                                      " tokens of pages of " + std::to_string(p.page_size) + ")");
  if (N > INT32_MAX) a.error("ERR_SHAPE", "q has too many rows");
  // No sequence has more rows than the whole batch.
  const int max_q = (int)std::max<int64_t>(1, std::min<int64_t>(max_q_in, N));
  const float scale = (float)scale_d;

  if (q.device.is_cpu()) {
    a.dtype_in(q, "q", {DType::F32, DType::F16, DType::BF16});
    a.dtype_in(out, "out", {DType::F32, DType::F16, DType::BF16});
    cpu_enqueue([=] { cpu::attention(out, q, kc, vc, pt, lens, cuq, scale); });
    return a.env().Undefined();
  }
#ifdef SQUEEZELM_WITH_CUDA
  a.dtype_in(q, "q", {DType::F16, DType::BF16});
  a.same_dtype(out, "out", q, "q");
  a.same_dtype(kc, "kCache", q, "q");
  check_cuda_vectors(a, {{&out, "out"}, {&q, "q"}, {&kc, "kCache"}, {&vc, "vCache"}}, p.D);
  const int dev = q.device.index;
  const int64_t need = cuda::attention_workspace_floats(dev, (int)p.B, (int)Hq, (int)p.Hkv, (int)p.D, max_q,
                                                        (int)max_seq_len);
  Tensor work;
  if (ws) {
    a.workspace(*ws, q, need, "attentionWorkspaceSize");
    work = *ws;
  } else if (need > 0) {
    // A pooled buffer would be handed to other tensors between replays of a graph.
    if (cuda_capturing(dev))
      a.error("ERR_STATE", "pass a workspace tensor (attentionWorkspaceSize) when capturing a graph");
    work = Tensor::empty(DType::F32, {need}, q.device);
  }
  dispatch(
      q.device, "attention", [] {},
      [&](int d) {
        cuda::attention(out, q, kc, vc, pt, lens, cuq, scale, max_q, (int)max_seq_len,
                        need > 0 ? work.ptr<float>() : nullptr, need > 0 ? work.numel() : 0, d, cuda_stream(d));
      });
#else
  (void)max_q;
  a.error("ERR_DEVICE", "this build has no CUDA backend");
#endif
  return a.env().Undefined();
}

// attentionWorkspaceSize(device, numSeqs, qHeads, kvHeads, headDim, maxQ, maxSeqLen): f32 elements
// of the workspace `attention` needs on that device for these bounds (0 on CPU).
SQZ_OP(attentionWorkspaceSize) {
  Args a(info, "attentionWorkspaceSize");
  Device dev = parse_device(a.string(0, "device"));
  const int64_t B = a.integer(1, "numSeqs"), Hq = a.integer(2, "qHeads"), Hkv = a.integer(3, "kvHeads");
  const int64_t D = a.integer(4, "headDim"), max_q = a.integer(5, "maxQ"), max_seq_len = a.integer(6, "maxSeqLen");
  if (B < 0 || Hq < 1 || Hkv < 1 || Hq % Hkv != 0 || D < 1 || max_q < 1 || max_seq_len < 0 || B > 65535)
    a.error("ERR_ARG", "bad sizes");
  if (dev.is_cpu()) return Napi::Number::New(a.env(), 0);
#ifdef SQUEEZELM_WITH_CUDA
  const int64_t n = cuda::attention_workspace_floats(dev.index, (int)B, (int)Hq, (int)Hkv, (int)D, (int)max_q,
                                                     (int)max_seq_len);
  return Napi::Number::New(a.env(), (double)n);
#else
  a.error("ERR_DEVICE", "this build has no CUDA backend");
#endif
}

}  // namespace sqz::napi
