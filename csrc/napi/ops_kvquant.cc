// KVQuant quantized paged KV cache bindings: kvqAppend, kvqRopeAppend, kvqAttention,
// kvqDequantize, kvqAttentionWorkspaceSize.
// Every op takes one layer's cache and calibration as 13 consecutive arguments:
//   kCodes, vCodes, meta (u8), sinkK, sinkV (f16 [rows, sink, kvHeads, D]),
//   keyLo, keyHi (f32 [kvHeads*D]), keyCodebook, valueCodebook (f32 [2^bits]), bits, nk, nv, mode
// (nk / nv: key / value outlier slots per token-head vector; mode: kvq::Mode bits).
// sinkRows (optional i32 [B]): the sink store row of each sequence of the call.
#include "../cpu/kvquant.h"
#include "op.h"

#ifdef SQUEEZELM_WITH_CUDA
#include "../kernels/kvquant/kvquant.h"
#endif

namespace sqz::napi {
namespace {

struct Parsed {
  kvq::Cache c;
  kvq::Calib cal;
};

Parsed parse_cache(Args& a, size_t i) {
  Parsed p;
  kvq::Cache& c = p.c;
  c.k_codes = a.tensor(i, "kCodes");
  c.v_codes = a.tensor(i + 1, "vCodes");
  c.meta = a.tensor(i + 2, "meta");
  c.sink_k = a.tensor(i + 3, "sinkK");
  c.sink_v = a.tensor(i + 4, "sinkV");
  p.cal.key_lo = a.tensor(i + 5, "keyLo");
  p.cal.key_hi = a.tensor(i + 6, "keyHi");
  p.cal.key_cb = a.tensor(i + 7, "keyCodebook");
  p.cal.val_cb = a.tensor(i + 8, "valueCodebook");
  const int64_t bits = a.integer(i + 9, "bits"), nk = a.integer(i + 10, "nk"), nv = a.integer(i + 11, "nv");
  const int64_t mode = a.integer(i + 12, "mode");
  if (mode < 0 || mode > kvq::KeyPerToken) a.error("ERR_ARG", "mode " + std::to_string(mode) + " is not a cache mode");
  if (bits < 2 || bits > 4) a.error("ERR_ARG", "bits must be 2, 3 or 4 (got " + std::to_string(bits) + ")");
  if (nk < 0 || nk > 16 || nv < 0 || nv > 16)
    a.error("ERR_ARG", "outlier slots nk and nv must lie in [0, 16] (got " + std::to_string(nk) + ", " +
                           std::to_string(nv) + ")");
  c.bits = (int)bits;
  c.nk = (int)nk;
  c.nv = (int)nv;
  c.mode = (int)mode;
  a.same_device({{&c.k_codes, "kCodes"}, {&c.v_codes, "vCodes"}, {&c.meta, "meta"}, {&c.sink_k, "sinkK"},
                 {&c.sink_v, "sinkV"}, {&p.cal.key_lo, "keyLo"}, {&p.cal.key_hi, "keyHi"},
                 {&p.cal.key_cb, "keyCodebook"}, {&p.cal.val_cb, "valueCodebook"}});
  for (auto [t, n] : {std::pair{&c.k_codes, "kCodes"}, {&c.v_codes, "vCodes"}, {&c.meta, "meta"}}) {
    a.dtype_in(*t, n, {DType::U8});
    a.ndim(*t, n, 4);
  }
  a.dtype_in(c.sink_k, "sinkK", {DType::F16});
  a.dtype_in(c.sink_v, "sinkV", {DType::F16});
  a.ndim(c.sink_k, "sinkK", 4);
  c.kv_heads = c.sink_k.dim(2);
  c.head_dim = c.sink_k.dim(3);
  c.sink = (int)c.sink_k.dim(1);
  c.page_size = c.k_codes.dim(1);
  const int64_t H = c.kv_heads, D = c.head_dim;
  if (D < 2 || D % 2 != 0 || D > 256) a.error("ERR_SHAPE", "head_dim must be even and at most 256 (sinkK is " + c.sink_k.shape_str() + ")");
  if (nk > D || nv > D) a.error("ERR_ARG", "more outlier slots than channels");
  a.shape_is(c.sink_v, "sinkV", c.sink_k.shape);
  const int64_t P = c.k_codes.dim(0), S = c.page_size;
  a.shape_is(c.k_codes, "kCodes", {P, S, H, kvq::code_bytes(D, c.bits)});
  a.shape_is(c.v_codes, "vCodes", {P, S, H, kvq::code_bytes(D, c.bits)});
  a.shape_is(c.meta, "meta", {P, S, H, kvq::meta_bytes(c.nk, c.nv, c.mode)});
  for (auto [t, n] : {std::pair{&p.cal.key_lo, "keyLo"}, {&p.cal.key_hi, "keyHi"}}) {
    a.dtype_in(*t, n, {DType::F32});
    if (t->numel() != H * D) a.error("ERR_SHAPE", std::string(n) + " " + t->shape_str() + " must hold kvHeads*D = " + std::to_string(H * D) + " values");
  }
  for (auto [t, n] : {std::pair{&p.cal.key_cb, "keyCodebook"}, {&p.cal.val_cb, "valueCodebook"}}) {
    a.dtype_in(*t, n, {DType::F32});
    if (t->numel() != (int64_t(1) << bits))
      a.error("ERR_SHAPE", std::string(n) + " " + t->shape_str() + " must hold 2^bits = " + std::to_string(1 << bits) + " entries");
  }
  return p;
}

void check_cuda_dim(Args& a, const kvq::Cache& c) {
  if (!c.k_codes.device.is_cuda()) return;
  if (c.mode != 0) a.error("ERR_UNSUPPORTED", "the CUDA kernels implement cache mode 0 (per-channel keys) only");
  const int64_t D = c.head_dim;
  if (D != 64 && D != 80 && D != 96 && D != 128 && D != 256)
    a.error("ERR_UNSUPPORTED", "CUDA kernels support head_dim 64, 80, 96, 128, 256 (got " + std::to_string(D) + ")");
}

// page table, seq lens, cuQ: i32 on the cache's device; returns B.
int64_t check_index(Args& a, const kvq::Cache& c, const Tensor& pt, const Tensor& lens, const Tensor& cu) {
  a.same_device({{&c.k_codes, "kCodes"}, {&pt, "pageTable"}, {&lens, "seqLens"}, {&cu, "cuQ"}});
  a.dtype_in(pt, "pageTable", {DType::I32});
  a.dtype_in(lens, "seqLens", {DType::I32});
  a.dtype_in(cu, "cuQ", {DType::I32});
  a.ndim(pt, "pageTable", 2);
  a.ndim(lens, "seqLens", 1);
  a.ndim(cu, "cuQ", 1);
  const int64_t B = pt.dim(0);
  a.shape_is(lens, "seqLens", {B});
  a.shape_is(cu, "cuQ", {B + 1});
  if (c.sink > 0 && !c.sink_rows.storage && c.sink_k.dim(0) < B)
    a.error("ERR_SHAPE", "sinkK " + c.sink_k.shape_str() + " needs a row per sequence (" + std::to_string(B) + ")");
  return B;
}

// Optional sinkRows i32 [B] at argument i.
void sink_rows_arg(Args& a, kvq::Cache& c, size_t i, int64_t B) {
  auto sr = a.opt_tensor(i, "sinkRows");
  if (!sr) return;
  a.same_device({{&c.k_codes, "kCodes"}, {&*sr, "sinkRows"}});
  a.dtype_in(*sr, "sinkRows", {DType::I32});
  a.ndim(*sr, "sinkRows", 1);
  a.shape_is(*sr, "sinkRows", {B});
  if (B > 0) c.sink_rows = *sr;
}

void check_rows(Args& a, const kvq::Cache& c, const Tensor& x, const char* name, int64_t heads) {
  a.same_device({{&c.k_codes, "kCodes"}, {&x, name}});
  a.dtype_in(x, name, x.device.is_cpu() ? std::initializer_list<DType>{DType::F32, DType::F16, DType::BF16}
                                        : std::initializer_list<DType>{DType::F16, DType::BF16});
  a.ndim(x, name, 3);
  a.shape_is(x, name, {-1, heads, c.head_dim});
}

}  // namespace

// kvqAppend(cache x13, k[N,kvHeads,D], v[N,kvHeads,D], pageTable, seqLens, cuQ, sinkRows?)
SQZ_OP(kvqAppend) {
  Args a(info, "kvqAppend");
  Parsed p = parse_cache(a, 0);
  Tensor k = a.tensor(13, "k"), v = a.tensor(14, "v");
  Tensor pt = a.tensor(15, "pageTable"), lens = a.tensor(16, "seqLens"), cu = a.tensor(17, "cuQ");
  check_cuda_dim(a, p.c);
  check_rows(a, p.c, k, "k", p.c.kv_heads);
  check_rows(a, p.c, v, "v", p.c.kv_heads);
  a.same_dtype(k, "k", v, "v");
  a.shape_is(v, "v", k.shape);
  sink_rows_arg(a, p.c, 18, pt.ndim() == 2 ? pt.dim(0) : 0);
  check_index(a, p.c, pt, lens, cu);
  dispatch(
      k.device, "kvqAppend", [=] { cpu::kvq_append(p.c, p.cal, k, v, pt, lens, cu); },
      [&](int dev) { CUDA_ONLY(cuda::kvq_append(p.c, p.cal, k, v, pt, lens, cu, cuda_stream(dev))); });
  return a.env().Undefined();
}

// kvqAttention(out[N,Hq,D], q[N,Hq,D], cache x13, pageTable, seqLens, cuQ, invFreq f32[D/2], scale, maxQ,
//              maxSeqLen, sinkRows?, workspace? f32[kvqAttentionWorkspaceSize(...)], variant?)
// variant (CUDA): 0 (default) the fastest kernel covering the shape, 1 the CUDA-core flash kernel, 2 the
// earlier tensor-core kernel (csrc/kernels/kvquant/kvquant.h).
SQZ_OP(kvqAttention) {
  Args a(info, "kvqAttention");
  Tensor out = a.tensor(0, "out"), q = a.tensor(1, "q");
  Parsed p = parse_cache(a, 2);
  Tensor pt = a.tensor(15, "pageTable"), lens = a.tensor(16, "seqLens"), cu = a.tensor(17, "cuQ");
  Tensor freq = a.tensor(18, "invFreq");
  const double scale = a.number(19, "scale");
  const int64_t max_q = a.integer(20, "maxQ"), max_seq = a.integer(21, "maxSeqLen");
  sink_rows_arg(a, p.c, 22, pt.ndim() == 2 ? pt.dim(0) : 0);
  auto ws = a.opt_tensor(23, "workspace");
  const int variant = (int)a.opt_integer(24, "variant", 0);
  if (variant < 0 || variant > 2) a.error("ERR_ARG", "variant must be 0, 1 or 2");
  check_cuda_dim(a, p.c);
  a.ndim(q, "q", 3);
  const int64_t Hq = q.dim(1);
  if (Hq % p.c.kv_heads != 0)
    a.error("ERR_SHAPE", "q heads " + std::to_string(Hq) + " must be a multiple of kvHeads " + std::to_string(p.c.kv_heads));
  check_rows(a, p.c, q, "q", Hq);
  a.same_device({{&q, "q"}, {&out, "out"}, {&freq, "invFreq"}});
  a.same_dtype(out, "out", q, "q");
  a.shape_is(out, "out", q.shape);
  a.dtype_in(freq, "invFreq", {DType::F32});
  if (freq.numel() != p.c.head_dim / 2) a.error("ERR_SHAPE", "invFreq " + freq.shape_str() + " must hold D/2 values");
  check_index(a, p.c, pt, lens, cu);
  if (max_q < 1 || max_seq < 1) a.error("ERR_ARG", "maxQ and maxSeqLen must be positive");
  if (max_seq > pt.dim(1) * p.c.page_size)
    a.error("ERR_ARG", "maxSeqLen " + std::to_string(max_seq) + " is longer than the page table holds (" +
                           std::to_string(pt.dim(1) * p.c.page_size) + ")");
  const float sc = (float)scale;
#ifdef SQUEEZELM_WITH_CUDA
  float* work = nullptr;
  int64_t work_n = 0;
  if (q.device.is_cuda()) {
    const int64_t need = cuda::kvq_attention_workspace_floats(q.device.index, q.dim(0), q.dim(1), p.c.kv_heads,
                                                              p.c.head_dim, (int)max_seq);
    if (ws) {
      a.workspace(*ws, q, need, "kvqAttentionWorkspaceSize");
      work = ws->ptr<float>();
      work_n = ws->numel();
    } else if (cuda_capturing(q.device.index)) {
      a.error("ERR_STATE", "pass a workspace tensor (kvqAttentionWorkspaceSize) when capturing a graph");
    }
  }
#else
  (void)ws;
#endif
  dispatch(
      q.device, "kvqAttention", [=] { cpu::kvq_attention(out, q, p.c, p.cal, pt, lens, cu, freq, sc); },
      [&](int dev) {
        CUDA_ONLY(cuda::kvq_attention(out, q, p.c, p.cal, pt, lens, cu, freq, sc, (int)max_q, (int)max_seq, work,
                                      work_n, variant, cuda_stream(dev)));
      });
  return a.env().Undefined();
}

// kvqRopeAppend(qOut[N,Hq,D] | null, cache x13, qkv[N,(Hq+2*kvHeads)*D], positions i32[N], invFreq f32[D/2],
//               pageTable, seqLens, cuQ, rotateKeys, sinkRows?)
SQZ_OP(kvqRopeAppend) {
  Args a(info, "kvqRopeAppend");
  auto qo = a.opt_tensor(0, "qOut");
  Parsed p = parse_cache(a, 1);
  Tensor qkv = a.tensor(14, "qkv"), pos = a.tensor(15, "positions"), freq = a.tensor(16, "invFreq");
  Tensor pt = a.tensor(17, "pageTable"), lens = a.tensor(18, "seqLens"), cu = a.tensor(19, "cuQ");
  const bool rotate = a.boolean(20, "rotateKeys", false);
  check_cuda_dim(a, p.c);
  const int64_t H = p.c.kv_heads, D = p.c.head_dim;
  a.same_device({{&p.c.k_codes, "kCodes"}, {&qkv, "qkv"}, {&pos, "positions"}, {&freq, "invFreq"}});
  a.dtype_in(qkv, "qkv", qkv.device.is_cpu() ? std::initializer_list<DType>{DType::F32, DType::F16, DType::BF16}
                                            : std::initializer_list<DType>{DType::F16, DType::BF16});
  a.ndim(qkv, "qkv", 2);
  const int64_t width = qkv.dim(1);
  if (width % D != 0 || width / D < 2 * H + 1)
    a.error("ERR_SHAPE", "qkv " + qkv.shape_str() + " must be [N, (Hq + 2*" + std::to_string(H) + ")*" + std::to_string(D) + "]");
  const int64_t Hq = width / D - 2 * H;
  if (Hq % H != 0) a.error("ERR_SHAPE", "q heads " + std::to_string(Hq) + " must be a multiple of kvHeads " + std::to_string(H));
  const int64_t N = qkv.dim(0);
  if (qo) {
    a.same_device({{&qkv, "qkv"}, {&*qo, "qOut"}});
    if (qkv.device.is_cuda()) a.same_dtype(*qo, "qOut", qkv, "qkv");
    else a.dtype_in(*qo, "qOut", {DType::F32, DType::F16, DType::BF16});
    a.shape_is(*qo, "qOut", {N, Hq, D});
  }
  a.tensor_is(pos, "positions", DType::I32, {N});
  a.dtype_in(freq, "invFreq", {DType::F32});
  if (freq.numel() != D / 2) a.error("ERR_SHAPE", "invFreq " + freq.shape_str() + " must hold D/2 values");
  sink_rows_arg(a, p.c, 21, pt.ndim() == 2 ? pt.dim(0) : 0);
  check_index(a, p.c, pt, lens, cu);
  std::optional<Tensor> q_out = qo;
  dispatch(
      qkv.device, "kvqRopeAppend",
      [=] { cpu::kvq_rope_append(q_out ? &*q_out : nullptr, p.c, p.cal, qkv, pos, freq, pt, lens, cu, rotate); },
      [&](int dev) {
        CUDA_ONLY(cuda::kvq_rope_append(q_out ? &*q_out : nullptr, p.c, p.cal, qkv, pos, freq, pt, lens, cu, rotate,
                                        cuda_stream(dev)));
      });
  return a.env().Undefined();
}

// kvqAttentionWorkspaceSize(device, rows, qHeads, kvHeads, headDim, maxSeqLen): f32 elements of the
// workspace kvqAttention needs for these bounds (0 on CPU).
SQZ_OP(kvqAttentionWorkspaceSize) {
  Args a(info, "kvqAttentionWorkspaceSize");
  Device dev = parse_device(a.string(0, "device"));
  const int64_t N = a.integer(1, "rows"), Hq = a.integer(2, "qHeads"), H = a.integer(3, "kvHeads");
  const int64_t D = a.integer(4, "headDim"), L = a.integer(5, "maxSeqLen");
  if (N < 0 || Hq < 1 || H < 1 || Hq % H != 0 || D < 2 || L < 0 || L > INT32_MAX) a.error("ERR_ARG", "bad sizes");
  if (dev.is_cpu()) return Napi::Number::New(a.env(), 0);
#ifdef SQUEEZELM_WITH_CUDA
  return Napi::Number::New(a.env(), (double)cuda::kvq_attention_workspace_floats(dev.index, N, Hq, H, D, (int)L));
#else
  a.error("ERR_DEVICE", "this build has no CUDA backend");
#endif
}

// kvqDequantize(kOut[L,kvHeads,D], vOut[L,kvHeads,D], cache x13, pageTable, seq, sinkRow?)
SQZ_OP(kvqDequantize) {
  Args a(info, "kvqDequantize");
  Tensor ko = a.tensor(0, "kOut"), vo = a.tensor(1, "vOut");
  Parsed p = parse_cache(a, 2);
  Tensor pt = a.tensor(15, "pageTable");
  const int64_t seq = a.integer(16, "seq");
  const int64_t sink_row = a.opt_integer(17, "sinkRow", seq);
  check_rows(a, p.c, ko, "kOut", p.c.kv_heads);
  check_rows(a, p.c, vo, "vOut", p.c.kv_heads);
  a.shape_is(vo, "vOut", ko.shape);
  a.same_device({{&ko, "kOut"}, {&pt, "pageTable"}});
  a.dtype_in(pt, "pageTable", {DType::I32});
  a.ndim(pt, "pageTable", 2);
  if (seq < 0 || seq >= pt.dim(0)) a.error("ERR_ARG", "seq " + std::to_string(seq) + " outside the page table");
  if (ko.dim(0) > pt.dim(1) * p.c.page_size) a.error("ERR_SHAPE", "kOut holds more tokens than the page table row");
  if (p.c.sink > 0 && (sink_row < 0 || p.c.sink_k.dim(0) <= sink_row)) a.error("ERR_SHAPE", "sinkK has no row " + std::to_string(sink_row));
  const int64_t srow = p.c.sink > 0 ? sink_row : 0;
  dispatch(
      ko.device, "kvqDequantize", [=] { cpu::kvq_dequantize(ko, vo, p.c, p.cal, pt, seq, srow); },
      [&](int dev) { CUDA_ONLY(cuda::kvq_dequantize(ko, vo, p.c, p.cal, pt, seq, srow, cuda_stream(dev))); });
  return a.env().Undefined();
}

}  // namespace sqz::napi
