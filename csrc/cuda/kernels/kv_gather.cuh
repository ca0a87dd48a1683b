// Gathers the keys and values of a batch's sequences out of the paged cache into contiguous
// [num_seqs * capacity, Hkv, D] tensors, sequence s's token t at row s * capacity + t, so that a paged
// prefill can run the contiguous path (BSA_PAGED_PREFILL=gather): one pass at copy bandwidth instead of
// a page lookup for every tile the prefill reads. Rows past a sequence's length are not written (the
// prefill never reads them); a position whose page id is out of range reads zeros, as the direct path
// does. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/params.h"

namespace blocksparse_attn {

constexpr int kGatherTokens = 16;  // tokens a CTA copies
constexpr int kGatherThreads = 256;

// One CTA: kGatherTokens tokens of sequence blockIdx.y, its threads taking 16-byte chunks (token,
// kv head, column chunk) in turn; blockIdx.x * kGatherTokens past the sequence's length: nothing.
__global__ void __launch_bounds__(kGatherThreads) gather_paged_kv_kernel(const GatherParams p) {
  const int seq = blockIdx.y;
  // A length past the capacity (invalid input, unchecked without BSA_CHECK_INPUTS) never writes
  // outside the sequence's rows.
  const int len = min(p.kv.seq_lens[seq], p.capacity);
  const int token0 = blockIdx.x * kGatherTokens;
  if (token0 >= len) return;
  const int tokens = min(kGatherTokens, len - token0);
  const int chunks = tokens * p.chunks_per_token.divisor();
  const uint4* key = static_cast<const uint4*>(p.kv.key);
  const uint4* value = static_cast<const uint4*>(p.kv.value);
  uint4* key_out = static_cast<uint4*>(p.key_out);
  uint4* value_out = static_cast<uint4*>(p.value_out);
  for (int c = threadIdx.x; c < chunks; c += kGatherThreads) {
    const int t = p.chunks_per_token.div(c);
    int64_t src, dst;
    bool valid;
    p.chunk_offsets(seq, token0 + t, c - t * p.chunks_per_token.divisor(), src, dst, valid);
    const uint4 zero = make_uint4(0, 0, 0, 0);
    key_out[dst / 8] = valid ? key[src / 8] : zero;  // element offsets of 16-byte chunks (8 elements)
    value_out[dst / 8] = valid ? value[src / 8] : zero;
  }
}

}  // namespace blocksparse_attn
