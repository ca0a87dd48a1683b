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
#include <type_traits>

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
// A thread takes kGatherChunksAtOnce chunks at a time in passes: their table reads, then all their
// K and V loads, then the stores. Written chunk by chunk, each load waited for the table read
// before it and each store for its load, and the next chunk's reads for the store (the output may
// alias the cache for all the compiler knows): a chain of round trips to memory a thread.
constexpr int kGatherChunksAtOnce = 8;
template <typename Element, typename Cache, bool kPowerOfTwo>
__device__ __forceinline__ void gather_tokens(const GatherParams& p, int seq, int token0, int chunks) {
  constexpr bool kFp8 = CacheFormat<Cache>::kFp8;
  using Stored = std::conditional_t<kFp8, uint2, uint4>;  // 8 stored elements: 8 bytes in fp8, else 16
  const Stored* key = static_cast<const Stored*>(p.kv.key);
  const Stored* value = static_cast<const Stored*>(p.kv.value);
  uint4* key_out = static_cast<uint4*>(p.key_out);
  uint4* value_out = static_cast<uint4*>(p.value_out);
  const int per_token = p.chunks_per_token.divisor();
  for (int c0 = threadIdx.x; c0 < chunks; c0 += kGatherThreads * kGatherChunksAtOnce) {
    int page[kGatherChunksAtOnce];
#pragma unroll
    for (int i = 0; i < kGatherChunksAtOnce; ++i) {
      const int c = min(c0 + i * kGatherThreads, chunks - 1);  // past the CTA's chunks: a duplicate read
      const int t = p.chunks_per_token.div(c);
      page[i] = *p.chunk_page_entry<kPowerOfTwo>(seq, token0 + t, c - t * per_token);
    }
    int64_t src[kGatherChunksAtOnce], dst[kGatherChunksAtOnce];
    Stored k[kGatherChunksAtOnce], v[kGatherChunksAtOnce];
#pragma unroll
    for (int i = 0; i < kGatherChunksAtOnce; ++i) {
      const int c = c0 + i * kGatherThreads;
      const int t = p.chunks_per_token.div(c);
      bool valid;
      p.chunk_offsets<kPowerOfTwo>(page[i], seq, token0 + t, c - t * per_token, src[i], dst[i], valid);
      valid = valid && c < chunks;
      // element offsets of 8-element chunks; a chunk that reads zeros loads nothing
      k[i] = valid ? key[src[i] / 8] : Stored{};
      v[i] = valid ? value[src[i] / 8] : Stored{};
    }
#pragma unroll
    for (int i = 0; i < kGatherChunksAtOnce; ++i) {
      if (c0 + i * kGatherThreads >= chunks) break;
      if constexpr (kFp8) {
        key_out[dst[i] / 8] = widen_fp8_chunk<Element, Cache>(k[i]);
        value_out[dst[i] / 8] = widen_fp8_chunk<Element, Cache>(v[i]);
      } else {
        key_out[dst[i] / 8] = k[i];
        value_out[dst[i] / 8] = v[i];
      }
    }
  }
}

template <typename Element, typename Cache>
__global__ void __launch_bounds__(kGatherThreads) gather_paged_kv_kernel(const GatherParams p) {
  const int seq = blockIdx.y;
  const int len = p.rows(seq);
  const int token0 = blockIdx.x * kGatherTokens;
  if (token0 >= len) return;
  const int chunks = min(kGatherTokens, len - token0) * p.chunks_per_token.divisor();
  if (p.kv.kv_block_shift >= 0) {
    gather_tokens<Element, Cache, true>(p, seq, token0, chunks);
  } else {
    gather_tokens<Element, Cache, false>(p, seq, token0, chunks);
  }
}

}  // namespace blocksparse_attn
