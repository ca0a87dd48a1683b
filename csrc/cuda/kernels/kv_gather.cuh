// Gathers the keys and values of a batch's sequences out of the paged cache into contiguous
// [num_seqs * capacity, Hkv, D] tensors in the model's dtype, sequence s's token t at row s * capacity
// + t, so that a paged prefill can run the contiguous path (BSA_PAGED_PREFILL=gather|auto): one pass at
// copy bandwidth instead of a page lookup for every tile the prefill reads. Pages in the model's dtype
// are copied as they are; fp8 pages are widened to it, exactly (both fp8 formats are subsets of fp16
// and of bf16), and their scales stay with the prefill, which folds them in as it does for the pages.
// Rows past a sequence's length are not written (the prefill never reads them); a position whose page
// id is out of range reads zeros, as the direct path does. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/kv_tile.cuh"
#include "cuda/kernels/params.h"

namespace blocksparse_attn {

constexpr int kGatherTokens = 16;  // tokens a CTA copies
constexpr int kGatherThreads = 256;

// Eight stored fp8 values (8 bytes) as eight Elements (16 bytes), in order.
template <typename Element, typename Cache>
__device__ __forceinline__ uint4 widen_fp8_chunk(const uint2& in) {
  const auto* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&in);
  uint4 out;
  out.x = fp8x2_to_elements<Element, Cache>(pairs[0]);
  out.y = fp8x2_to_elements<Element, Cache>(pairs[1]);
  out.z = fp8x2_to_elements<Element, Cache>(pairs[2]);
  out.w = fp8x2_to_elements<Element, Cache>(pairs[3]);
  return out;
}

// One CTA: kGatherTokens tokens of sequence blockIdx.y, its threads taking 8-element chunks (token,
// kv head, column chunk) in turn; blockIdx.x * kGatherTokens past the sequence's length: nothing.
// Cache = Element: pages in the model's dtype (any 2-byte type: the chunks are copied as bytes).
template <typename Element, typename Cache>
__global__ void __launch_bounds__(kGatherThreads) gather_paged_kv_kernel(const GatherParams p) {
  const int seq = blockIdx.y;
  const int len = p.rows(seq);
  const int token0 = blockIdx.x * kGatherTokens;
  if (token0 >= len) return;
  const int tokens = min(kGatherTokens, len - token0);
  const int chunks = tokens * p.chunks_per_token.divisor();
  uint4* key_out = static_cast<uint4*>(p.key_out);
  uint4* value_out = static_cast<uint4*>(p.value_out);
  for (int c = threadIdx.x; c < chunks; c += kGatherThreads) {
    const int t = p.chunks_per_token.div(c);
    int64_t src, dst;
    bool valid;
    p.chunk_offsets(seq, token0 + t, c - t * p.chunks_per_token.divisor(), src, dst, valid);
    const uint4 zero = make_uint4(0, 0, 0, 0);
    // element offsets of 8-element chunks: 16 bytes in the model's dtype, 8 in fp8
    if constexpr (CacheFormat<Cache>::kFp8) {
      const uint2* key = static_cast<const uint2*>(p.kv.key);
      const uint2* value = static_cast<const uint2*>(p.kv.value);
      key_out[dst / 8] = valid ? widen_fp8_chunk<Element, Cache>(key[src / 8]) : zero;
      value_out[dst / 8] = valid ? widen_fp8_chunk<Element, Cache>(value[src / 8]) : zero;
    } else {
      const uint4* key = static_cast<const uint4*>(p.kv.key);
      const uint4* value = static_cast<const uint4*>(p.kv.value);
      key_out[dst / 8] = valid ? key[src / 8] : zero;
      value_out[dst / 8] = valid ? value[src / 8] : zero;
    }
  }
}

}  // namespace blocksparse_attn
