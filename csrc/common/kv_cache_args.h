// Validation of the KV-cache ops' arguments, shared by every backend's host code.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

#include "checks.h"

namespace blocksparse_attn {

// A quantized cache holds fp8 values with per-tensor scales (spec: stored value = fp8(x / scale),
// rounded to nearest even and saturated to the format's largest finite value; read value =
// float(fp8) * scale). The scales are optional float32 tensors of one element on the cache's device
// (absent: 1); a cache in the model's dtype ignores them.
struct CacheScales {
  const std::optional<at::Tensor>& k_scale;
  const std::optional<at::Tensor>& v_scale;
};

inline bool is_fp8(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

// A cache holds the model's dtype (that of `ref`) or an fp8 format.
inline void check_cache_dtype(const at::Tensor& cache, const char* name, const at::Tensor& ref, const char* ref_name) {
  BSA_CHECK(cache.scalar_type() == ref.scalar_type() || is_fp8(cache.scalar_type()), name,
            " must have the dtype of ", ref_name, " (", ref.scalar_type(),
            ") or an fp8 format (Float8_e4m3fn, Float8_e5m2), got ", cache.scalar_type());
}

// Shapes, dtypes and devices always; with check_values the values too (> 0 and finite), which reads
// them (a device->host copy on CUDA).
inline void check_cache_scales(const CacheScales& scales, const at::Tensor& cache, bool check_values) {
  for (const auto* scale : {&scales.k_scale, &scales.v_scale}) {
    if (!scale->has_value()) continue;
    const char* name = scale == &scales.k_scale ? "k_scale" : "v_scale";
    const at::Tensor& t = **scale;
    check_dtype(t, name, {at::kFloat});
    BSA_CHECK(t.numel() == 1, name, " must hold one element (a per-tensor scale), got shape ", t.sizes());
    check_same_device(t, name, cache, "the cache");
    if (check_values) {
      const float v = t.item<float>();
      BSA_CHECK(v > 0.f && std::isfinite(v), name, " must be a positive finite number, got ", static_cast<double>(v));
    }
  }
}

// key/value [T, Hkv, D] (unit last stride); caches contiguous in key's dtype or an fp8 format, either
// [NB, Hkv, kvbs, D] with slot_mapping [T] int64 (shared pages: token t of every kv head goes to slot
// slot_mapping[t]) or [NB, 1, kvbs, D] with slot_mapping [T, Hkv] (per-kv-head pages: kv head h of
// token t goes to slot slot_mapping[t, h]).
inline void check_write_kv_cache_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                      const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                      const CacheScales& scales, bool check_values) {
  BSA_CHECK(slot_mapping.dim() == 1 || slot_mapping.dim() == 2, "slot_mapping must be [num_tokens] (pages of every "
            "kv head) or [num_tokens, num_kv_heads] (pages of one kv head), got shape ", slot_mapping.sizes());
  check_dim(key_cache, "key_cache", 4, "[num_blocks, num_kv_heads, kv_block_size, head_size]");
  BSA_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have the shape of key_cache ",
              key_cache.sizes(), ", got ", value_cache.sizes());
  check_same_dtype(value_cache, "value_cache", key_cache, "key_cache");
  check_same_device(value_cache, "value_cache", key_cache, "key_cache");
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
  check_dim(key, "key", 3, "[num_tokens, num_kv_heads, head_size]");
  BSA_CHECK(value.sizes() == key.sizes(), "value must have the shape of key ", key.sizes(), ", got ", value.sizes());
  const bool per_kv_head = slot_mapping.dim() == 2;
  if (per_kv_head) {
    BSA_CHECK(key_cache.size(1) == 1, "with slot_mapping [num_tokens, num_kv_heads] (per-kv-head pages) a page holds "
              "one kv head: key_cache must be [num_blocks, 1, kv_block_size, head_size], got ", key_cache.sizes());
  } else {
    BSA_CHECK(key.size(1) == key_cache.size(1), "key must be [num_tokens, ", key_cache.size(1), ", ",
              key_cache.size(3), "] to match key_cache ", key_cache.sizes(), ", got ", key.sizes());
  }
  BSA_CHECK(key.size(2) == key_cache.size(3), "key must be [num_tokens, num_kv_heads, ", key_cache.size(3),
            "] to match key_cache ", key_cache.sizes(), ", got ", key.sizes());
  const bool quantized = is_fp8(key_cache.scalar_type());
  // A cache of no attention dtype at all (int8, uint8: an engine's byte cache) is the cache's fault;
  // a floating cache unlike key is key's (below).
  if (!quantized && !at::isFloatingType(key_cache.scalar_type())) check_cache_dtype(key_cache, "key_cache", key, "key");
  for (auto* t : {&key, &value}) {
    const char* name = t == &key ? "key" : "value";
    if (quantized)
      check_dtype(*t, name, {at::kFloat, at::kHalf, at::kBFloat16});
    else
      check_same_dtype(*t, name, key_cache, "key_cache");
    check_same_device(*t, name, key_cache, "key_cache");
    check_last_dim_contiguous(*t, name);
  }
  check_same_dtype(value, "value", key, "key");
  BSA_CHECK(key.strides() == value.strides(), "key and value must have the same strides, got ", key.strides(),
              " and ", value.strides());
  check_dtype(slot_mapping, "slot_mapping", {at::kLong});
  check_same_device(slot_mapping, "slot_mapping", key_cache, "key_cache");
  check_size(slot_mapping, "slot_mapping", 0, key.size(0), "one slot per token of key");
  if (per_kv_head) check_size(slot_mapping, "slot_mapping", 1, key.size(1), "one slot per kv head of key");
  check_cache_scales(scales, key_cache, check_values);
}

// slots must be < NB * kvbs (negative = skip); `slots` is a contiguous host tensor.
inline void check_slot_values(const at::Tensor& slots, const at::Tensor& key_cache) {
  const int64_t num_slots = key_cache.size(0) * key_cache.size(2);
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t per_token = slots.dim() == 2 ? slots.size(1) : 1;
  for (int64_t t = 0; t < slots.numel(); ++t)
    BSA_CHECK(slot[t] < num_slots, "slot_mapping[", t / per_token,
              slots.dim() == 2 ? ", " + std::to_string(t % per_token) : std::string(), "] = ", slot[t],
              " is past the cache's ", num_slots, " slots (", key_cache.size(0), " blocks of ", key_cache.size(2),
              "); negative slots mean 'skip'");
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
