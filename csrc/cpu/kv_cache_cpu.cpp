// CPU kernels of the KV-cache ops: write_kv_cache, copy_blocks, swap_blocks.
//
// Every index is validated before the first byte is written, so a rejected call changes no cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <cstring>
#include <vector>

#include "common/kv_cache_args.h"

namespace blocksparse_attn {
namespace {

// What a quantized (fp8) cache stores for x: fp8(x / scale), rounded to nearest even and saturated
// to the format's largest finite value (NaN stays NaN); a cache in the model's dtype stores x.
at::Tensor cache_values(const at::Tensor& x, const at::Tensor& cache, const std::optional<at::Tensor>& scale) {
  if (!is_fp8(cache.scalar_type())) return x;
  const double largest = cache.scalar_type() == at::kFloat8_e4m3fn ? 448.0 : 57344.0;
  at::Tensor y = x.to(at::kFloat);
  if (scale) y = y / *scale;
  return y.clamp(-largest, largest).to(cache.scalar_type());
}

void write_kv_cache_cpu(const at::Tensor& key_in, const at::Tensor& value_in, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                        const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  check_write_kv_cache_args(key_in, value_in, key_cache, value_cache, slot_mapping, {k_scale, v_scale},
                            /*check_values=*/true);
  const at::Tensor slots = slot_mapping.contiguous();
  check_slot_values(slots, key_cache);
  const at::Tensor key = cache_values(key_in, key_cache, k_scale), value = cache_values(value_in, value_cache, v_scale);
  const int64_t* slot = slots.data_ptr<int64_t>();
  // Per-kv-head pages (slot_mapping [T, Hkv]): kv head h of token t at slot[t * Hkv + h] of a cache with one
  // head per page; shared pages: every head at slot[t], head h of the page.
  const bool per_kv_head = slots.dim() == 2;
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), kv_block_size = key_cache.size(2);
  const int64_t cache_heads = key_cache.size(1);
  const int64_t row_bytes = key_cache.size(3) * key_cache.element_size();
  auto copy_rows = [&](const at::Tensor& src, const at::Tensor& cache) {
    const char* src_base = static_cast<const char*>(src.data_ptr());
    char* cache_base = static_cast<char*>(cache.data_ptr());
    const int64_t token_stride = src.stride(0) * src.element_size(), head_stride = src.stride(1) * src.element_size();
    // Plain at::parallel_for, unlike the attention kernels (cpu/parallel.h): the workers only copy
    // bytes between pointers taken on the calling thread and touch no tensor, so the thread-local
    // state they lack (inference mode, dispatch keys) cannot matter, and write_kv_cache runs once per
    // layer and step, where capturing that state (a few us per call) would be a measurable share.
    at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          const int64_t s = per_kv_head ? slot[t * num_kv_heads + h] : slot[t];
          if (s < 0) continue;
          const int64_t block = s / kv_block_size, offset = s % kv_block_size;
          const int64_t page = block * cache_heads + (per_kv_head ? 0 : h);
          std::memcpy(cache_base + (page * kv_block_size + offset) * row_bytes,
                      src_base + t * token_stride + h * head_stride, row_bytes);
        }
      }
    });
  };
  copy_rows(key, key_cache);
  copy_rows(value, value_cache);
}

// A cache [2, NB, ...] as bytes [2, NB, block bytes]: block copies move bytes, whatever the dtype (fp8
// has no index_copy kernel).
at::Tensor as_bytes(const at::Tensor& cache) {
  return cache.view(at::kByte).view({2, cache.size(1), -1});
}

// Copies whole blocks of [2, NB, ...] caches; all reads see the caches as they were before the call
// (the gather happens before the scatter), so chains like a->b, b->c are well defined.
void copy_blocks_cpu(at::TensorList kv_caches, const at::Tensor& block_mapping) {
  check_block_mapping_shape(block_mapping);
  for (size_t l = 0; l < kv_caches.size(); ++l) {
    const std::string name = "kv_caches[" + std::to_string(l) + "]";
    check_kv_cache(kv_caches[l], name);
    check_same_device(kv_caches[l], name.c_str(), kv_caches[0], "kv_caches[0]");
  }
  if (kv_caches.empty()) return;
  int64_t min_blocks = kv_caches[0].size(1);
  for (const auto& c : kv_caches) min_blocks = std::min(min_blocks, c.size(1));
  const at::Tensor mapping = block_mapping.to(at::kCPU).contiguous();
  check_block_mapping_values(mapping, min_blocks, min_blocks);
  if (mapping.size(0) == 0) return;
  const at::Tensor src = mapping.select(1, 0), dst = mapping.select(1, 1);
  for (const auto& cache : kv_caches) {
    const at::Tensor bytes = as_bytes(cache);
    bytes.index_copy_(1, dst, bytes.index_select(1, src));
  }
}

void swap_blocks_cpu(const at::Tensor& src_kv_cache, const at::Tensor& dst_kv_cache, const at::Tensor& block_mapping) {
  check_swap_caches(src_kv_cache, dst_kv_cache);
  check_block_mapping_shape(block_mapping);
  const at::Tensor mapping = block_mapping.contiguous();
  check_block_mapping_values(mapping, src_kv_cache.size(1), dst_kv_cache.size(1));
  if (mapping.size(0) == 0) return;
  const at::Tensor src = mapping.select(1, 0), dst = mapping.select(1, 1);
  as_bytes(dst_kv_cache).index_copy_(1, dst, as_bytes(src_kv_cache).index_select(1, src));
}

}  // namespace
}  // namespace blocksparse_attn

TORCH_LIBRARY_IMPL(blocksparse_attn, CPU, m) {
  m.impl("write_kv_cache", &blocksparse_attn::write_kv_cache_cpu);
  m.impl("copy_blocks", &blocksparse_attn::copy_blocks_cpu);
  m.impl("swap_blocks", &blocksparse_attn::swap_blocks_cpu);
}
