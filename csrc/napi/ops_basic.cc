// Byte-level ops every family uses: copy between tensors of one device.
#include <cstring>

#include "op.h"

namespace sqz::napi {

// copy(dst, src): same dtype and element count, same device; stream-ordered.
SQZ_OP(copy) {
  Args a(info, "copy");
  Tensor dst = a.tensor(0, "dst"), src = a.tensor(1, "src");
  a.same_dtype(dst, "dst", src, "src");
  a.same_device({{&dst, "dst"}, {&src, "src"}});
  if (dst.numel() != src.numel())
    a.error("ERR_SHAPE", "dst " + dst.shape_str() + " and src " + src.shape_str() + " differ in size");
  dispatch(
      dst.device, "copy", [=] { std::memmove(dst.data(), src.data(), src.nbytes()); },
      [&](int dev) { cuda_copy_d2d(dev, dst.data(), src.data(), src.nbytes()); });
  return a.env().Undefined();
}

}  // namespace sqz::napi
