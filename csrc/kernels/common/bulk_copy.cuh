// Hopper bulk copies (cp.async.bulk: 1-D, and 2-D through a tensor map) and the mbarriers that count
// their bytes.
//
// Why: a streaming kernel needs tens of KB per SM in flight to cover DRAM latency. Register loads
// hold one register per 4 bytes and a scoreboard per load; a bulk copy is one instruction for up to
// thousands of bytes straight into shared memory, completion is counted in bytes on an mbarrier,
// and the only limit on bytes in flight is the shared memory of the ring. A ring slot is reused
// through a second ("empty") barrier on which every consumer warp arrives once it has read the slot.
//
// Everything here compiles to nothing below sm_90: the callers dispatch to these kernels only on
// sm_90 devices of a 90a build.
#pragma once
#include <cstdint>

namespace sqz::cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SQZ_BULK_COPY 1
#endif

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#ifdef SQZ_BULK_COPY
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes initialised barriers visible to the async proxy (the bulk copies) and to the other threads.
__device__ __forceinline__ void mbar_fence_init() {
#ifdef SQZ_BULK_COPY
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
// One arrival that also announces `bytes` of bulk copies still to complete on this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#ifdef SQZ_BULK_COPY
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#ifdef SQZ_BULK_COPY
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#endif
}
// Waits until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#ifdef SQZ_BULK_COPY
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// L2 policy for data read exactly once (weights): evicted first, so the lines that are reread
// (activations, the next kernel's inputs) stay.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t p = 0;
#ifdef SQZ_BULK_COPY
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
#endif
  return p;
}

// Global -> shared bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned), counted
// on barrier `bar` (complete_tx).
__device__ __forceinline__ void bulk_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar, uint64_t policy) {
#ifdef SQZ_BULK_COPY
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(policy)
      : "memory");
#endif
}

// Requests `bytes` (a multiple of 16, 16-byte aligned) of global memory into L2: one instruction,
// nothing waits for it and nothing is written.
__device__ __forceinline__ void bulk_prefetch_l2(const void* src, uint32_t bytes) {
#ifdef SQZ_BULK_COPY
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
#endif
}

// 2-D tensor copy (TMA) of one box of the tensor map `tmap` (the address of a __grid_constant__
// CUtensorMap parameter) at element coordinates (c0 innermost, c1) into shared memory at `dst`,
// counted on barrier `bar`. Elements outside the tensor arrive as zeros and count as bytes.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar, uint64_t policy) {
#ifdef SQZ_BULK_COPY
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
      "l"(tmap), "r"(c0), "r"(c1), "r"(bar), "l"(policy)
      : "memory");
#endif
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* tmap, int c0, int c1, uint32_t bar) {
#ifdef SQZ_BULK_COPY
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
                   dst),
               "l"(tmap), "r"(c0), "r"(c1), "r"(bar)
               : "memory");
#endif
}

// A 16-byte load from a ring slot. "memory" keeps it before the mbarrier arrive that hands the slot
// back to the producer: without it the compiler could move the load past the arrive, and a 64-byte
// piece of a row was once read after its refill had landed.
__device__ __forceinline__ uint4 ld_ring_v4(uint32_t addr) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr) : "memory");
  return r;
}

// Orders this thread's earlier shared-memory accesses (and, after a __syncwarp or barrier, those of
// the threads it synchronised with) before its later async-proxy accesses: bulk copies that write a
// slot, wgmma reading operands that cp.async or st.shared wrote (gemm_wgmma.cuh). A slot that threads
// have read with ld.shared is handed to its next copy only after it: without it the copy may land
// before those reads have returned. (The LUT GEMV's code ring once
// relied on a warp vote over the loaded words instead; ptxas dropped the vote, whose result was
// unused, the refill overtook the reads, and ~half of the launches at K = 2080 read some unit's
// rows from the next copy, H200.)
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifdef SQZ_BULK_COPY
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// Barrier among the first `threads` threads of the block (named barrier `id`, 1..15; 0 is
// __syncthreads): the consumer warps synchronise without the producer warp.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace sqz::cuda
