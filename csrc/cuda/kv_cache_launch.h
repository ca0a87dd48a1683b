// The KV-cache kernels' launchers (cuda/kv_cache_launch.cu), as the host glue calls them. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/params.h"

namespace blocksparse_attn {

// The element type of the keys and values an fp8 cache is written from.
enum class KvInput { kFloat, kHalf, kBFloat16 };

void launch_write_kv_cache(const void* key, const void* value, void* key_cache, void* value_cache,
                           const int64_t* slot_mapping, int64_t num_tokens, int num_kv_heads, bool per_kv_head,
                           int64_t row_bytes,
                           int64_t token_stride_bytes, int64_t head_stride_bytes, int kv_block_size,
                           int64_t num_slots, bool vectorized, cudaStream_t stream);
// Element strides; k_scale / v_scale: [1] float32 on the device or null (1).
void launch_write_kv_cache_fp8(const void* key, const void* value, void* key_cache, void* value_cache,
                               const int64_t* slot_mapping, int64_t num_tokens, int num_kv_heads, bool per_kv_head,
                               int head_size,
                               int64_t token_stride, int64_t head_stride, int kv_block_size, int64_t num_slots,
                               const float* k_scale, const float* v_scale, KvInput input, bool e5m2,
                               cudaStream_t stream);
// What a gather reads: pages in the model's dtype (copied as they are) or fp8 pages (widened).
enum class GatherCache { kModelDtype, kE4m3, kE5m2 };
// Copies a batch's keys and values out of the paged cache (params.kv) into contiguous tensors in the
// model's dtype (cuda/kernels/kv_gather.cuh); bf16: the model's dtype is bf16, else fp16 (only fp8
// pages need to know).
void launch_gather_paged_kv(const GatherParams& params, int num_seqs, GatherCache cache, bool bf16,
                            cudaStream_t stream);
void launch_copy_blocks(const int64_t* cache_ptrs, const int64_t* mapping, int64_t num_pairs, int num_layers,
                        int64_t num_blocks, int64_t block_bytes, cudaStream_t stream);

}  // namespace blocksparse_attn
