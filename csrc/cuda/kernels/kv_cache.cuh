// Device code of the KV-cache ops. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace blocksparse_attn {

// Where kv head `head` of token `token` goes: shared pages ([NB, Hkv, kvbs, D], slot_mapping [T]) put
// every head at slot slot_mapping[token], head `head` of the block; per-kv-head pages ([NB, 1, kvbs, D],
// slot_mapping [T, Hkv]) put it at slot slot_mapping[token, head]. Returns the (block * heads per
// block + head) row-slab index times kvbs plus the offset: the cache row, or -1 to skip.
__device__ __forceinline__ int64_t cache_row(const int64_t* __restrict__ slot_mapping, int64_t token, int head,
                                             int num_kv_heads, bool per_kv_head, int kv_block_size,
                                             int64_t num_slots) {
  const int64_t slot = per_kv_head ? slot_mapping[token * num_kv_heads + head] : slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return -1;
  const int64_t block = slot / kv_block_size, offset = slot % kv_block_size;
  const int64_t slab = per_kv_head ? block : block * num_kv_heads + head;
  return slab * kv_block_size + offset;
}

// Token t's key/value rows [Hkv, D] go to the cache rows cache_row() names. One thread moves one Vec (16 bytes when rows allow it) of one (token, head) row; slots
// that are negative (padding) or past the cache are skipped, never written out of bounds.
template <typename Vec>
__global__ void write_kv_cache_kernel(const char* __restrict__ key, const char* __restrict__ value,
                                      char* __restrict__ key_cache, char* __restrict__ value_cache,
                                      const int64_t* __restrict__ slot_mapping, int64_t num_tokens, int num_kv_heads,
                                      bool per_kv_head, int vecs_per_row, int64_t token_stride_bytes,
                                      int64_t head_stride_bytes, int kv_block_size, int64_t num_slots) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vecs_per_token = static_cast<int64_t>(num_kv_heads) * vecs_per_row;
  if (index >= num_tokens * vecs_per_token) return;
  const int64_t token = index / vecs_per_token;
  const int head = static_cast<int>((index % vecs_per_token) / vecs_per_row);
  const int vec = static_cast<int>(index % vecs_per_row);
  const int64_t row = cache_row(slot_mapping, token, head, num_kv_heads, per_kv_head, kv_block_size, num_slots);
  if (row < 0) return;
  const int64_t row_bytes = static_cast<int64_t>(vecs_per_row) * sizeof(Vec);
  const int64_t src = token * token_stride_bytes + head * head_stride_bytes + vec * sizeof(Vec);
  const int64_t dst = row * row_bytes + vec * sizeof(Vec);
  *reinterpret_cast<Vec*>(key_cache + dst) = *reinterpret_cast<const Vec*>(key + src);
  *reinterpret_cast<Vec*>(value_cache + dst) = *reinterpret_cast<const Vec*>(value + src);
}

// write_kv_cache into an fp8 cache: token t's key/value rows [Hkv, D] (Input: float, __half or
// __nv_bfloat16, element strides) stored as fp8(x / scale), rounded to nearest even and saturated to
// the format's largest finite value (NaN stays NaN), at slot_mapping[t]. One thread converts 8
// elements of one (token, head) row and writes them as 8 bytes (D is a multiple of 16). Slots that
// are negative or past the cache are skipped. The scales are read from the device ([1], or null: 1),
// so a captured graph picks up new values.
template <typename Input>
__global__ void write_kv_cache_fp8_kernel(const Input* __restrict__ key, const Input* __restrict__ value,
                                          uint8_t* __restrict__ key_cache, uint8_t* __restrict__ value_cache,
                                          const int64_t* __restrict__ slot_mapping, int64_t num_tokens,
                                          int num_kv_heads, bool per_kv_head, int head_size, int64_t token_stride,
                                          int64_t head_stride,
                                          int kv_block_size, int64_t num_slots, const float* k_scale,
                                          const float* v_scale, __nv_fp8_interpretation_t kind) {
  const int groups_per_row = head_size / 8;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t groups_per_token = static_cast<int64_t>(num_kv_heads) * groups_per_row;
  if (index >= num_tokens * groups_per_token) return;
  const int64_t token = index / groups_per_token;
  const int head = static_cast<int>((index % groups_per_token) / groups_per_row);
  const int col = static_cast<int>(index % groups_per_row) * 8;
  const int64_t row = cache_row(slot_mapping, token, head, num_kv_heads, per_kv_head, kv_block_size, num_slots);
  if (row < 0) return;
  const int64_t src = token * token_stride + head * head_stride + col;
  const int64_t dst = row * head_size + col;
  auto store = [&](const Input* x, uint8_t* cache, const float* scale) {
    const float s = scale != nullptr ? *scale : 1.f;  // x / s, not x * (1 / s): the spec's rounding
    uint2 packed;
    auto* pairs = reinterpret_cast<__nv_fp8x2_storage_t*>(&packed);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      pairs[i] = __nv_cvt_float2_to_fp8x2(make_float2(static_cast<float>(x[src + 2 * i]) / s,
                                                      static_cast<float>(x[src + 2 * i + 1]) / s),
                                          __NV_SATFINITE, kind);
    *reinterpret_cast<uint2*>(cache + dst) = packed;
  };
  store(key, key_cache, k_scale);
  store(value, value_cache, v_scale);
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
