// The plan kernel: turns the batch's lengths (device tensors) into the prefill work list without a
// device->host sync, so a whole prefill call can be captured in a CUDA graph.
//
// Items are (sequence, absolute query tile). Tiles are aligned to absolute positions, so a tile never
// straddles more query blocks than the pattern needs. Order: sequence by sequence, each one's tiles
// from the last (the longest rows) to the first. One sequence's keys and values then make the L2
// working set of the CTAs in flight: the vertical columns of all heads together touch every key
// block of a sequence, so interleaving sequences (sorting all tiles by length) made every wave
// stream the whole batch's K/V from DRAM (3 GB per call at 4 x 8k, measured with ncu on an H100).
// Within a sequence, longest rows first is longest-processing-time scheduling. One CTA does it
// all: per-sequence tile counts, an exclusive scan, then each sequence writes its items.
#pragma once

#include <cstdint>

#include "cuda/kernels/params.h"

namespace blocksparse_attn {

constexpr int kPlanThreads = 1024;

// A sequence's keys: seq_lens where given (the paged cache, gathered K/V), else from cu_seqlens_k; cut to
// max_k_len.
__device__ __forceinline__ int plan_key_length(const PlanParams& p, int seq) {
  return min(p.seq_lens ? p.seq_lens[seq] : p.cu_seqlens_k[seq + 1] - p.cu_seqlens_k[seq], p.max_k_len);
}

__device__ __forceinline__ void plan_tile_range(const PlanParams& p, int seq, int& first, int& last) {
  const int q_len = p.cu_seqlens_q[seq + 1] - p.cu_seqlens_q[seq];
  const int k_len = plan_key_length(p, seq);
  if (q_len <= 0 || k_len <= 0 || q_len > k_len) {  // nothing to do (or invalid: never index with it)
    first = 0;
    last = -1;
    return;
  }
  first = (k_len - q_len) / p.block_m;
  last = (k_len - 1) / p.block_m;
}

__global__ void __launch_bounds__(kPlanThreads) plan_prefill_kernel(const PlanParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The Hopper prefill kernel after it (a programmatic dependent, launch_prefill_sm90.cuh) may be
  // scheduled now; it waits for this grid to finish before it reads the list.
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  __shared__ int32_t warp_totals[kPlanThreads / 32];
  const int tid = threadIdx.x;
  // Each thread owns a contiguous chunk of sequences: count their tiles, scan the chunk sums across
  // the block, then write each sequence's items from its offset.
  const int chunk = (p.num_seqs + kPlanThreads - 1) / kPlanThreads;
  const int begin = min(tid * chunk, p.num_seqs), end = min(begin + chunk, p.num_seqs);
  int local = 0;
  for (int seq = begin; seq < end; ++seq) {
    int first, last;
    plan_tile_range(p, seq, first, last);
    local += last - first + 1;
  }
  const int lane = tid & 31, warp = tid >> 5;
  int inclusive = local;
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffff, inclusive, d);
    if (lane >= d) inclusive += v;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = warp_totals[lane];
    int incl = w;
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffff, incl, d);
      if (lane >= d) incl += v;
    }
    warp_totals[lane] = incl - w;  // exclusive prefix of warp totals
    if (lane == 31) {
      *p.num_tiles = incl;
      *p.work_counter = 0;
    }
  }
  __syncthreads();
  int slot = warp_totals[warp] + inclusive - local;
  for (int seq = begin; seq < end; ++seq) {
    int first, last;
    plan_tile_range(p, seq, first, last);
    if (first > last) continue;
    PlanItem item{};
    item.seq = seq;
    item.q_begin = p.cu_seqlens_q[seq];
    item.q_len = p.cu_seqlens_q[seq + 1] - item.q_begin;
    // Contiguous K/V start at cu_seqlens_k (paged: none); seq_lens, where given, is the length (the
    // paged cache, and gathered K/V, whose sequences take rows of a fixed capacity).
    item.k_begin = p.cu_seqlens_k ? p.cu_seqlens_k[seq] : 0;
    item.k_len = plan_key_length(p, seq);
    for (int t = last; t >= first; --t, ++slot) {
      item.tile_index = t;
      p.items[slot] = item;
    }
  }
}

}  // namespace blocksparse_attn
