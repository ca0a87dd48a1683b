// Device code of the KV-cache ops. Torch-free.
#pragma once

#include <cstdint>

namespace blocksparse_attn {

// Token t's key/value rows [Hkv, D] go to cache slot slot_mapping[t] of an [NB, Hkv, kvbs, D]
// cache. One thread moves one Vec (16 bytes when rows allow it) of one (token, head) row; slots
// that are negative (padding) or past the cache are skipped, never written out of bounds.
template <typename Vec>
__global__ void write_kv_cache_kernel(const char* __restrict__ key, const char* __restrict__ value,
                                      char* __restrict__ key_cache, char* __restrict__ value_cache,
                                      const int64_t* __restrict__ slot_mapping, int64_t num_tokens, int num_kv_heads,
                                      int vecs_per_row, int64_t token_stride_bytes, int64_t head_stride_bytes,
                                      int kv_block_size, int64_t num_slots) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vecs_per_token = static_cast<int64_t>(num_kv_heads) * vecs_per_row;
  if (index >= num_tokens * vecs_per_token) return;
  const int64_t token = index / vecs_per_token;
  const int head = static_cast<int>((index % vecs_per_token) / vecs_per_row);
  const int vec = static_cast<int>(index % vecs_per_row);
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;
  const int64_t block = slot / kv_block_size, offset = slot % kv_block_size;
  const int64_t row_bytes = static_cast<int64_t>(vecs_per_row) * sizeof(Vec);
  const int64_t src = token * token_stride_bytes + head * head_stride_bytes + vec * sizeof(Vec);
  const int64_t dst = ((block * num_kv_heads + head) * kv_block_size + offset) * row_bytes + vec * sizeof(Vec);
  *reinterpret_cast<Vec*>(key_cache + dst) = *reinterpret_cast<const Vec*>(key + src);
  *reinterpret_cast<Vec*>(value_cache + dst) = *reinterpret_cast<const Vec*>(value + src);
}

// copy_blocks for every layer in one launch: grid (pairs, layers * 2 halves); each CTA copies one
// block of one half with 16-byte vectors. cache_ptrs[l] is layer l's [2, NB, block_bytes] base.
__global__ void copy_blocks_kernel(const int64_t* __restrict__ cache_ptrs, const int64_t* __restrict__ mapping,
                                   int64_t num_blocks, int64_t block_bytes) {
  const int64_t pair = blockIdx.x;
  const int layer = blockIdx.y >> 1, half = blockIdx.y & 1;
  const int64_t src = mapping[2 * pair], dst = mapping[2 * pair + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
  char* base = reinterpret_cast<char*>(cache_ptrs[layer]) + half * num_blocks * block_bytes;
  const uint4* from = reinterpret_cast<const uint4*>(base + src * block_bytes);
  uint4* to = reinterpret_cast<uint4*>(base + dst * block_bytes);
  for (int64_t i = threadIdx.x; i < block_bytes / 16; i += blockDim.x) to[i] = from[i];
}

}  // namespace blocksparse_attn
