// Thin wrappers over the Hopper (sm_90a) PTX the Hopper prefill kernel is built from: mbarriers,
// proxy fences, named barriers, register reallocation and the shared-memory matrix descriptors of
// wgmma (the wgmma instructions themselves are in wgmma_generated.cuh). Torch-free.
#pragma once

#include <cstdint>

#include "cuda/kernels/ptx.cuh"
#include "cuda/kernels/wgmma_generated.cuh"

namespace blocksparse_attn {
namespace ptx {

// ---- mbarriers (shared-memory barriers that count arrivals and complete in phases) ----------------

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals));
}

// Makes initialised barriers visible to the other threads' mbarrier operations (with a CTA barrier).
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Release semantics: this thread's earlier writes are visible to threads that see the phase complete.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_addr(bar))
      : "memory");
}

// Waits (acquire) until the phase of the given parity has completed: phase k of a barrier completes
// with parity k & 1, so a consumer of the k-th fill waits for parity k & 1. BSA_MBARRIER_SUSPEND_NS (default
// 10 ms, the value CUTLASS's barriers pass; 0: none) is try_wait's suspend-time hint: a waiting warp
// sleeps on the barrier (SASS: NANOSLEEP.SYNCS) until the phase completes or the hint runs out,
// instead of retrying after the hardware's own short limit (YIELD and a branch back). H100, Nsight
// Compute cycles (2026-12-07): dense 16k x 2 -0.46 %, 32k x 1 -0.50 %; the pattern 8k x 4, 128 x 256
// and paged 2k chunks within their rounds' spread (+0.1 to +0.4 %); warp instructions unchanged.
#ifndef BSA_MBARRIER_SUSPEND_NS
#define BSA_MBARRIER_SUSPEND_NS 10000000
#endif
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, int parity) {
#if BSA_MBARRIER_SUSPEND_NS
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1, %2;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity), "n"(BSA_MBARRIER_SUSPEND_NS)
      : "memory");
#else
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}

// Adds `bytes` to the transactions the barrier's current phase waits for (bulk copies that complete
// on it), without an arrival.
__device__ __forceinline__ void mbarrier_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// One arrival that also adds `bytes` to the transactions of the barrier's current phase (bulk copies
// issued after it complete on it): the phase completes once they have landed.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(smem_addr(bar)),
      "r"(bytes)
      : "memory");
}

// ---- the tensor memory accelerator (TMA) ----------------------------------------------------------

// One box of a 3-D tensor map (a __grid_constant__ kernel parameter) at coordinates (c0, c1, c2),
// innermost first, into shared memory; completes its bytes as transactions on `bar`. Out-of-bounds
// elements read as zeros.
__device__ __forceinline__ void tma_load_3d(void* smem_dst, const void* tensor_map, int c0, int c1, int c2,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
          "r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
}

// The same for a 4-D tensor map at (c0, c1, c2, c3).
__device__ __forceinline__ void tma_load_4d(void* smem_dst, const void* tensor_map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::
          "r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
}

// The same for a 5-D tensor map at (c0, ..., c4).
__device__ __forceinline__ void tma_load_5d(void* smem_dst, const void* tensor_map, int c0, int c1, int c2, int c3,
                                            int c4, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::
          "r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(smem_addr(bar))
      : "memory");
}

// One box of shared memory into a 3-D tensor map at (c0, c1, c2), innermost first (elements out of
// the tensor's bounds are not written), in the thread's current bulk async-group.
__device__ __forceinline__ void tma_store_3d(const void* tensor_map, const void* smem_src, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(tensor_map)),
               "r"(smem_addr(smem_src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
// Closes the thread's current bulk async-group (its TMA stores).
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of the thread's bulk async-groups still read their shared-memory sources.
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until at most N of the thread's bulk async-groups are incomplete (their writes done).
template <int N>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// Generic-proxy writes to shared memory (st.shared, cp.async) become visible to async-proxy readers
// (wgmma operands) only after this fence in the writing thread.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Barrier over a subset of the CTA's warps (ids 1..15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrives on a named barrier without waiting (the arrival counts toward `threads`).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- register reallocation between warp groups ------------------------------------------------------

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// ---- wgmma bookkeeping --------------------------------------------------------------------------------

// Orders this warp group's register writes (accumulators, A fragments) before the next wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// wgmma_wait, at the top of a basic block of its own: ptxas moves a wgmma wait up to the top of its
// basic block, so this one waits in both arms of a branch on `group_uniform`, which must be equal
// across the warp group (wgmma.wait_group is .aligned over it) and whose value does not matter. The
// arms' asm differs so that no compiler merges them into the block before.
template <int kPending>
__device__ __forceinline__ void wgmma_wait_in_own_block(bool group_uniform) {
  if (group_uniform) asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
  else asm volatile("wgmma.wait_group.sync.aligned %0; // other arm\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving reads or writes of an accumulator across wgmma issue and wait
// (the asm statements above do not name the registers the hardware writes asynchronously).
template <int kCount>
__device__ __forceinline__ void fence_registers(float (&r)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Shared-memory matrix descriptor for the 128-byte swizzle: operands are stored as atoms of 8 rows x
// 128 bytes, 1024-byte aligned, the 16-byte chunk c of row r at chunk position c ^ (r % 8).
// Kept as two 32-bit words: the low word (start address, leading offset) is all that moves between
// the wgmmas of a tile, and a 32-bit add there costs one instruction where a 64-bit add of the whole
// descriptor cost a carry chain and register moves before every wgmma (12 instructions, SASS).
//  leading_bytes: K-major: unused (16); MN-major: offset between 64-element column blocks.
//  stride_bytes: offset between consecutive 8-row atoms (1024: dense atoms).
struct SmemDescriptor {
  uint32_t lo;  // bits 0-13: start address >> 4; bits 16-29: leading byte offset >> 4
  uint32_t hi;  // bits 0-13: stride byte offset >> 4; bits 30-31: swizzle mode

  // The descriptor advanced by `bytes` (a multiple of 16 that keeps the start inside shared memory).
  __device__ __forceinline__ uint64_t at(uint32_t bytes) const {
    return (static_cast<uint64_t>(hi) << 32) | (lo + (bytes >> 4));
  }
};

__device__ __forceinline__ SmemDescriptor smem_descriptor_sw128(const void* smem, uint32_t leading_bytes,
                                                               uint32_t stride_bytes = 1024) {
  SmemDescriptor d;
  d.lo = ((smem_addr(smem) & 0x3FFFF) >> 4) | (((leading_bytes & 0x3FFFF) >> 4) << 16);
  d.hi = ((stride_bytes & 0x3FFFF) >> 4) | (1u << 30);  // 128-byte swizzle (mode 1 in bits 62-63)
  return d;
}

}  // namespace ptx
}  // namespace blocksparse_attn
