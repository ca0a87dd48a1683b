// The plan kernel: turns the batch's lengths (device tensors) into the prefill work list without a
// device->host sync, so a whole prefill call can be captured in a CUDA graph.
//
// Items are (sequence, absolute query tile). Tiles are aligned to absolute positions, so a tile never
// straddles more query blocks than the pattern needs. Items are sorted by tile index, descending: a
// later tile sees more key blocks, and the GPU starts low block indices first, so the longest rows go
// first (longest-processing-time scheduling). One CTA does it all: counting sort over tile indices.
#pragma once

#include <cstdint>

#include "cuda/kernels/params.h"

namespace blocksparse_attn {

constexpr int kPlanThreads = 1024;

__device__ __forceinline__ void plan_tile_range(const PlanParams& p, int seq, int& first, int& last) {
  const int q_len = p.cu_seqlens_q[seq + 1] - p.cu_seqlens_q[seq];
  const int k_len = p.seq_lens ? p.seq_lens[seq] : p.cu_seqlens_k[seq + 1] - p.cu_seqlens_k[seq];
  if (q_len <= 0 || k_len <= 0 || q_len > k_len) {  // nothing to do (or invalid: never index with it)
    first = 0;
    last = -1;
    return;
  }
  first = (k_len - q_len) / p.block_m;
  last = (k_len - 1) / p.block_m;
}

__global__ void __launch_bounds__(kPlanThreads) plan_prefill_kernel(const PlanParams p) {
  __shared__ int32_t warp_totals[kPlanThreads / 32];
  const int tid = threadIdx.x;
  for (int b = tid; b < p.num_buckets; b += kPlanThreads) p.bucket[b] = 0;
  __syncthreads();
  for (int seq = tid; seq < p.num_seqs; seq += kPlanThreads) {
    int first, last;
    plan_tile_range(p, seq, first, last);
    for (int t = first; t <= last && t < p.num_buckets; ++t) atomicAdd(&p.bucket[t], 1);
  }
  __syncthreads();

  // Exclusive scan of the buckets in DESCENDING tile order: each thread owns a contiguous chunk of
  // the reversed bucket array; chunk sums are scanned across warps, then written back as offsets.
  const int chunk = (p.num_buckets + kPlanThreads - 1) / kPlanThreads;
  const int begin = tid * chunk, end = min(begin + chunk, p.num_buckets);
  int local = 0;
  for (int r = begin; r < end; ++r) local += p.bucket[p.num_buckets - 1 - r];
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
    if (lane == 31) *p.num_tiles = incl;
  }
  __syncthreads();
  int offset = warp_totals[warp] + inclusive - local;
  for (int r = begin; r < end; ++r) {
    int32_t& b = p.bucket[p.num_buckets - 1 - r];
    const int count = b;
    b = offset;  // the bucket now holds its first output slot
    offset += count;
  }
  __syncthreads();
  for (int seq = tid; seq < p.num_seqs; seq += kPlanThreads) {
    int first, last;
    plan_tile_range(p, seq, first, last);
    for (int t = first; t <= last && t < p.num_buckets; ++t) {
      const int slot = atomicAdd(&p.bucket[t], 1);
      p.tile_seq[slot] = seq;
      p.tile_index[slot] = t;
    }
  }
}

}  // namespace blocksparse_attn
