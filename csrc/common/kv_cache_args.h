// Validation of the KV-cache ops' arguments, shared by every backend's host code.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "checks.h"

namespace blocksparse_attn {

// key/value [T, Hkv, D] (unit last stride), caches [NB, Hkv, kvbs, D] contiguous, slot_mapping [T] int64.
inline void check_write_kv_cache_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                      const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_dim(key_cache, "key_cache", 4, "[num_blocks, num_kv_heads, kv_block_size, head_size]");
  BSA_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have the shape of key_cache ",
              key_cache.sizes(), ", got ", value_cache.sizes());
  check_same_dtype(value_cache, "value_cache", key_cache, "key_cache");
  check_same_device(value_cache, "value_cache", key_cache, "key_cache");
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
  check_dim(key, "key", 3, "[num_tokens, num_kv_heads, head_size]");
  BSA_CHECK(value.sizes() == key.sizes(), "value must have the shape of key ", key.sizes(), ", got ", value.sizes());
  BSA_CHECK(key.size(1) == key_cache.size(1) && key.size(2) == key_cache.size(3), "key must be [num_tokens, ",
              key_cache.size(1), ", ", key_cache.size(3), "] to match key_cache ", key_cache.sizes(), ", got ",
              key.sizes());
  for (auto* t : {&key, &value}) {
    const char* name = t == &key ? "key" : "value";
    check_same_dtype(*t, name, key_cache, "key_cache");
    check_same_device(*t, name, key_cache, "key_cache");
    check_last_dim_contiguous(*t, name);
  }
  BSA_CHECK(key.strides() == value.strides(), "key and value must have the same strides, got ", key.strides(),
              " and ", value.strides());
  check_dim(slot_mapping, "slot_mapping", 1, "[num_tokens]");
  check_dtype(slot_mapping, "slot_mapping", {at::kLong});
  check_same_device(slot_mapping, "slot_mapping", key_cache, "key_cache");
  check_size(slot_mapping, "slot_mapping", 0, key.size(0), "one slot per token of key");
}

// slots must be < NB * kvbs (negative = skip); `slots` is a host tensor.
inline void check_slot_values(const at::Tensor& slots, const at::Tensor& key_cache) {
  const int64_t num_slots = key_cache.size(0) * key_cache.size(2);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.numel(); ++t)
    BSA_CHECK(slot[t] < num_slots, "slot_mapping[", t, "] = ", slot[t], " is past the cache's ", num_slots,
                " slots (", key_cache.size(0), " blocks of ", key_cache.size(2), "); negative slots mean 'skip'");
}

inline void check_kv_cache(const at::Tensor& cache, const std::string& name) {
  BSA_CHECK(cache.dim() >= 2 && cache.size(0) == 2, name, " must be [2, num_blocks, ...] (keys, values), got shape ",
              cache.sizes());
  BSA_CHECK(cache.is_contiguous(), name, " must be contiguous, got strides ", cache.strides());
}

inline void check_block_mapping_shape(const at::Tensor& block_mapping) {
  check_dim(block_mapping, "block_mapping", 2, "[num_pairs, 2]");
  check_dtype(block_mapping, "block_mapping", {at::kLong});
  check_size(block_mapping, "block_mapping", 1, 2, "(src block, dst block) pairs");
}

// `mapping` is a contiguous host tensor [N, 2].
inline void check_block_mapping_values(const at::Tensor& mapping, int64_t src_blocks, int64_t dst_blocks) {
  const int64_t* pair = mapping.data_ptr<int64_t>();
  for (int64_t n = 0; n < mapping.size(0); ++n) {
    BSA_CHECK(pair[2 * n] >= 0 && pair[2 * n] < src_blocks, "block_mapping[", n, ", 0] = ", pair[2 * n],
                " is not a source block: expected [0, ", src_blocks, ")");
    BSA_CHECK(pair[2 * n + 1] >= 0 && pair[2 * n + 1] < dst_blocks, "block_mapping[", n, ", 1] = ", pair[2 * n + 1],
                " is not a destination block: expected [0, ", dst_blocks, ")");
  }
}

inline void check_swap_caches(const at::Tensor& src_kv_cache, const at::Tensor& dst_kv_cache) {
  check_kv_cache(src_kv_cache, "src_kv_cache");
  check_kv_cache(dst_kv_cache, "dst_kv_cache");
  check_same_dtype(dst_kv_cache, "dst_kv_cache", src_kv_cache, "src_kv_cache");
  BSA_CHECK(src_kv_cache.sizes().slice(2) == dst_kv_cache.sizes().slice(2),
              "src_kv_cache and dst_kv_cache must have the same block shape, got ", src_kv_cache.sizes(), " and ",
              dst_kv_cache.sizes());
}

}  // namespace blocksparse_attn
