// CPU kernels of the KV-cache ops: write_kv_cache, copy_blocks, swap_blocks.
//
// Every index is validated before the first byte is written, so a rejected call changes no cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/checks.h"

namespace blocksparse_attn {
namespace {

void check_cache_pair(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  check_dim(key_cache, "key_cache", 4, "[num_blocks, num_kv_heads, kv_block_size, head_size]");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have the shape of key_cache ",
              key_cache.sizes(), ", got ", value_cache.sizes());
  check_same_dtype(value_cache, "value_cache", key_cache, "key_cache");
  check_same_device(value_cache, "value_cache", key_cache, "key_cache");
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
}

void write_kv_cache_cpu(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_cache_pair(key_cache, value_cache);
  const int64_t num_blocks = key_cache.size(0), num_kv_heads = key_cache.size(1);
  const int64_t kv_block_size = key_cache.size(2), head_size = key_cache.size(3);
  check_dim(key, "key", 3, "[num_tokens, num_kv_heads, head_size]");
  TORCH_CHECK(value.sizes() == key.sizes(), "value must have the shape of key ", key.sizes(), ", got ", value.sizes());
  TORCH_CHECK(key.size(1) == num_kv_heads && key.size(2) == head_size, "key must be [num_tokens, ", num_kv_heads, ", ",
              head_size, "] to match key_cache ", key_cache.sizes(), ", got ", key.sizes());
  for (auto* t : {&key, &value}) {
    const char* name = t == &key ? "key" : "value";
    check_same_dtype(*t, name, key_cache, "key_cache");
    check_same_device(*t, name, key_cache, "key_cache");
    check_last_dim_contiguous(*t, name);
  }
  check_dim(slot_mapping, "slot_mapping", 1, "[num_tokens]");
  check_dtype(slot_mapping, "slot_mapping", {at::kLong});
  check_same_device(slot_mapping, "slot_mapping", key_cache, "key_cache");
  check_size(slot_mapping, "slot_mapping", 0, key.size(0), "one slot per token of key");

  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_tokens = key.size(0), num_slots = num_blocks * kv_block_size;
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(slot[t] < num_slots, "slot_mapping[", t, "] = ", slot[t], " is past the cache's ", num_slots,
                " slots (", num_blocks, " blocks of ", kv_block_size, "); negative slots mean 'skip'");

  const int64_t row_bytes = head_size * key.element_size();
  auto copy_rows = [&](const at::Tensor& src, const at::Tensor& cache) {
    const char* src_base = static_cast<const char*>(src.data_ptr());
    char* cache_base = static_cast<char*>(cache.data_ptr());
    const int64_t token_stride = src.stride(0) * src.element_size(), head_stride = src.stride(1) * src.element_size();
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (slot[t] < 0) continue;
        const int64_t block = slot[t] / kv_block_size, offset = slot[t] % kv_block_size;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          char* dst = cache_base + (((block * num_kv_heads + h) * kv_block_size + offset) * row_bytes);
          std::memcpy(dst, src_base + t * token_stride + h * head_stride, row_bytes);
        }
      }
    });
  };
  copy_rows(key, key_cache);
  copy_rows(value, value_cache);
}

// block_mapping [N, 2] int64 on the CPU with both columns checked against the caches' block counts.
at::Tensor checked_block_mapping(const at::Tensor& block_mapping, int64_t src_blocks, int64_t dst_blocks) {
  check_dim(block_mapping, "block_mapping", 2, "[num_pairs, 2]");
  check_dtype(block_mapping, "block_mapping", {at::kLong});
  check_size(block_mapping, "block_mapping", 1, 2, "(src block, dst block) pairs");
  at::Tensor mapping = block_mapping.to(at::kCPU).contiguous();
  const int64_t* pair = mapping.data_ptr<int64_t>();
  for (int64_t n = 0; n < mapping.size(0); ++n) {
    TORCH_CHECK(pair[2 * n] >= 0 && pair[2 * n] < src_blocks, "block_mapping[", n, ", 0] = ", pair[2 * n],
                " is not a source block: expected [0, ", src_blocks, ")");
    TORCH_CHECK(pair[2 * n + 1] >= 0 && pair[2 * n + 1] < dst_blocks, "block_mapping[", n, ", 1] = ", pair[2 * n + 1],
                " is not a destination block: expected [0, ", dst_blocks, ")");
  }
  return mapping;
}

void check_kv_cache(const at::Tensor& cache, const std::string& name) {
  TORCH_CHECK(cache.dim() >= 2 && cache.size(0) == 2, name, " must be [2, num_blocks, ...] (keys, values), got shape ",
              cache.sizes());
  TORCH_CHECK(cache.is_contiguous(), name, " must be contiguous, got strides ", cache.strides());
}

// Copies whole blocks of [2, NB, ...] caches; all reads see the caches as they were before the call
// (the gather happens before the scatter), so chains like a->b, b->c are well defined.
void copy_blocks_cpu(at::TensorList kv_caches, const at::Tensor& block_mapping) {
  for (size_t l = 0; l < kv_caches.size(); ++l) {
    const std::string name = "kv_caches[" + std::to_string(l) + "]";
    check_kv_cache(kv_caches[l], name);
    check_same_device(kv_caches[l], name.c_str(), kv_caches[0], "kv_caches[0]");
  }
  if (kv_caches.empty()) return;
  int64_t min_blocks = kv_caches[0].size(1);
  for (const auto& c : kv_caches) min_blocks = std::min(min_blocks, c.size(1));
  const at::Tensor mapping = checked_block_mapping(block_mapping, min_blocks, min_blocks);
  if (mapping.size(0) == 0) return;
  const at::Tensor src = mapping.select(1, 0), dst = mapping.select(1, 1);
  for (const auto& cache : kv_caches) cache.index_copy_(1, dst, cache.index_select(1, src));
}

void swap_blocks_cpu(const at::Tensor& src_kv_cache, const at::Tensor& dst_kv_cache, const at::Tensor& block_mapping) {
  check_kv_cache(src_kv_cache, "src_kv_cache");
  check_kv_cache(dst_kv_cache, "dst_kv_cache");
  check_same_dtype(dst_kv_cache, "dst_kv_cache", src_kv_cache, "src_kv_cache");
  TORCH_CHECK(src_kv_cache.sizes().slice(2) == dst_kv_cache.sizes().slice(2),
              "src_kv_cache and dst_kv_cache must have the same block shape, got ", src_kv_cache.sizes(), " and ",
              dst_kv_cache.sizes());
  TORCH_CHECK(block_mapping.device().is_cpu(), "block_mapping must be on the CPU, got ", block_mapping.device());
  const at::Tensor mapping = checked_block_mapping(block_mapping, src_kv_cache.size(1), dst_kv_cache.size(1));
  if (mapping.size(0) == 0) return;
  const at::Tensor src = mapping.select(1, 0), dst = mapping.select(1, 1);
  dst_kv_cache.index_copy_(1, dst, src_kv_cache.index_select(1, src));
}

}  // namespace
}  // namespace blocksparse_attn

TORCH_LIBRARY_IMPL(blocksparse_attn, CPU, m) {
  m.impl("write_kv_cache", &blocksparse_attn::write_kv_cache_cpu);
  m.impl("copy_blocks", &blocksparse_attn::copy_blocks_cpu);
  m.impl("swap_blocks", &blocksparse_attn::swap_blocks_cpu);
}
