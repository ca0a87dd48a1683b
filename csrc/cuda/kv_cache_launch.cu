// Launchers of the KV-cache kernels (device code in cuda/kernels/kv_cache.cuh).
#include <cuda_runtime.h>

#include "cuda/kernels/kv_cache.cuh"
#include "cuda/kernels/kv_gather.cuh"
#include "cuda/kv_cache_launch.h"

namespace blocksparse_attn {

void launch_write_kv_cache(const void* key, const void* value, void* key_cache, void* value_cache,
                           const int64_t* slot_mapping, int64_t num_tokens, int num_kv_heads, bool per_kv_head,
                           int64_t row_bytes,
                           int64_t token_stride_bytes, int64_t head_stride_bytes, int kv_block_size,
                           int64_t num_slots, bool vectorized, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int vec_bytes = vectorized ? 16 : 2;
  const int vecs_per_row = static_cast<int>(row_bytes / vec_bytes);
  const int64_t total = num_tokens * num_kv_heads * vecs_per_row;
  if (total == 0) return;
  const unsigned grid = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  auto* k = static_cast<const char*>(key);
  auto* v = static_cast<const char*>(value);
  auto* kc = static_cast<char*>(key_cache);
  auto* vc = static_cast<char*>(value_cache);
  if (vectorized)
    write_kv_cache_kernel<uint4><<<grid, kThreads, 0, stream>>>(k, v, kc, vc, slot_mapping, num_tokens, num_kv_heads,
                                                                per_kv_head, vecs_per_row, token_stride_bytes, head_stride_bytes,
                                                                kv_block_size, num_slots);
  else
    write_kv_cache_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(k, v, kc, vc, slot_mapping, num_tokens,
                                                                    num_kv_heads, per_kv_head, vecs_per_row,
                                                                    token_stride_bytes,
                                                                    head_stride_bytes, kv_block_size, num_slots);
}

void launch_write_kv_cache_fp8(const void* key, const void* value, void* key_cache, void* value_cache,
                               const int64_t* slot_mapping, int64_t num_tokens, int num_kv_heads, bool per_kv_head,
                               int head_size,
                               int64_t token_stride, int64_t head_stride, int kv_block_size, int64_t num_slots,
                               const float* k_scale, const float* v_scale, KvInput input, bool e5m2,
                               cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = num_tokens * num_kv_heads * (head_size / 8);
  if (total == 0) return;
  const unsigned grid = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  const __nv_fp8_interpretation_t kind = e5m2 ? __NV_E5M2 : __NV_E4M3;
  auto* kc = static_cast<uint8_t*>(key_cache);
  auto* vc = static_cast<uint8_t*>(value_cache);
  auto launch = [&](auto element) {
    using Input = decltype(element);
    write_kv_cache_fp8_kernel<Input><<<grid, kThreads, 0, stream>>>(
        static_cast<const Input*>(key), static_cast<const Input*>(value), kc, vc, slot_mapping, num_tokens,
        num_kv_heads, per_kv_head, head_size, token_stride, head_stride, kv_block_size, num_slots, k_scale, v_scale, kind);
  };
  switch (input) {
    case KvInput::kFloat: return launch(float{});
    case KvInput::kHalf: return launch(__half{});
    case KvInput::kBFloat16: return launch(__nv_bfloat16{});
  }
}

void launch_gather_paged_kv(const GatherParams& params, int num_seqs, GatherCache cache, bool bf16,
                            cudaStream_t stream) {
  if (num_seqs == 0 || params.capacity == 0) return;
  const dim3 grid(static_cast<unsigned>((params.capacity + kGatherTokens - 1) / kGatherTokens),
                  static_cast<unsigned>(num_seqs));
  auto launch = [&](auto element, auto stored) {
    gather_paged_kv_kernel<decltype(element), decltype(stored)><<<grid, kGatherThreads, 0, stream>>>(params);
  };
  switch (cache) {
    case GatherCache::kModelDtype: return launch(__half{}, __half{});  // bytes copied: fp16 stands for both
    case GatherCache::kE4m3: return bf16 ? launch(__nv_bfloat16{}, __nv_fp8_e4m3{}) : launch(__half{}, __nv_fp8_e4m3{});
    case GatherCache::kE5m2: return bf16 ? launch(__nv_bfloat16{}, __nv_fp8_e5m2{}) : launch(__half{}, __nv_fp8_e5m2{});
  }
}

void launch_copy_blocks(const int64_t* cache_ptrs, const int64_t* mapping, int64_t num_pairs, int num_layers,
                        int64_t num_blocks, int64_t block_bytes, cudaStream_t stream) {
  if (num_pairs == 0 || num_layers == 0) return;
  const dim3 grid(static_cast<unsigned>(num_pairs), static_cast<unsigned>(num_layers * 2));
  copy_blocks_kernel<<<grid, 256, 0, stream>>>(cache_ptrs, mapping, num_blocks, block_bytes);
}

}  // namespace blocksparse_attn
