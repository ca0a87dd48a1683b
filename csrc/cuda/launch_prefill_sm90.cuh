// Host side of the Hopper prefill kernel: the TMA maps and the persistent launch. Compiled by nvcc
// (it launches the kernel) but run on the host; included by the per-instantiation .cu files.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdint>
#include <type_traits>

#include "cuda/kernels/params.h"
#include "cuda/kernels/prefill_sm90.cuh"

namespace blocksparse_attn {

// The driver's tensor-map encoder, fetched once through the runtime (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 sm90_tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// Build knobs (A/B): K and V staged by row group (Sm90KvLayout; =0: by column block, the layout
// before 2026-12-04, took 5.1 % more cycles at dense 16k x 2 and 32k x 1 and 2.7 % more on the
// pattern at 8k x 4: H100, Nsight Compute, 2026-12-06); the L2 promotion of every map's reads (128
// or 256 bytes: a 256-byte K/V row read as two 128-byte column blocks by separate boxes may be
// fetched whole; 256 measured no faster at kv block 64 on the H200, 2026-12-04, and within 0.1 % of
// 128 in cycles at dense 16k, 32k and the pattern 8k, H100, 2026-12-06).
#ifndef BSA_SM90_KV_ROW_GROUPS
#define BSA_SM90_KV_ROW_GROUPS 1
#endif
#ifndef BSA_SM90_L2_PROMOTION_BYTES
#define BSA_SM90_L2_PROMOTION_BYTES 128
#endif
static_assert(BSA_SM90_L2_PROMOTION_BYTES == 128 || BSA_SM90_L2_PROMOTION_BYTES == 256,
              "BSA_SM90_L2_PROMOTION_BYTES is 128 or 256");
constexpr CUtensorMapL2promotion kSm90L2Promotion =
    BSA_SM90_L2_PROMOTION_BYTES == 256 ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B : CU_TENSOR_MAP_L2_PROMOTION_L2_128B;

// Builds the maps where the TMA can read the tensors (16-byte aligned base and strides); leaves
// them disabled otherwise. BSA_SM90_TMA=0 disables them (experiments). K/V stored as Cache: fp8
// pages are converted by the producer's threads, never read by the TMA.
template <typename Element, typename Cache>
Sm90TensorMaps sm90_tensor_maps(const PrefillParams& params, bool use_tma) {
  Sm90TensorMaps maps{};
  if (!use_tma) return maps;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = sm90_tensor_map_encoder();
  if (encode == nullptr) return maps;
  const CUtensorMapDataType type =
      std::is_same<Element, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  constexpr int64_t kElement = sizeof(Element);
  auto aligned = [](int64_t bytes) { return bytes % 16 == 0; };  // the TMA's base and strides
  // (head dim, middle, outer) with element strides between middle and between outer indices, read in
  // boxes of 64 x box_middle x box_outer.
  auto make = [&](CUtensorMap* map, const void* base, int64_t middle, int64_t outer, int64_t middle_stride,
                  int64_t outer_stride, uint32_t box_middle, uint32_t box_outer) {
    if (outer <= 0 || !aligned(static_cast<int64_t>(reinterpret_cast<uintptr_t>(base))) ||
        !aligned(middle_stride * kElement) || !aligned(outer_stride * kElement))
      return false;
    const cuuint64_t dims[3] = {static_cast<cuuint64_t>(params.head_size), static_cast<cuuint64_t>(middle),
                                static_cast<cuuint64_t>(outer)};
    const cuuint64_t strides[2] = {static_cast<cuuint64_t>(middle_stride * kElement),
                                   static_cast<cuuint64_t>(outer_stride * kElement)};
    const cuuint32_t box[3] = {64, box_middle, box_outer};
    const cuuint32_t element_strides[3] = {1, 1, 1};
    return encode(map, type, 3, const_cast<void*>(base), dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, kSm90L2Promotion,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  // Q in boxes of one consumer group's 64 rows: 64 tokens of one head, or with packed heads
  // 64 >> s tokens of the group's 2^s heads (rows token * 2^s + head, the order the kernel reads).
  const int packed_heads = 1 << params.pack_gqa_shift;
  maps.query_enabled = make(&maps.query, params.q, params.num_q_heads, params.num_q_tokens, params.q_head_stride,
                            params.q_row_stride, packed_heads, 64 / packed_heads);
  maps.out_enabled = make(&maps.out, params.out, params.num_q_heads, params.num_q_tokens, params.out_head_stride,
                          params.out_row_stride, packed_heads, 64 / packed_heads);
  const KeyValueSource& kv = params.kv;
  // K and V by row group (head dim 128, the padded one: every column of a row lies in the map):
  // 5-D maps (64 columns, row in a group of 8, column block, row group, outer) read in boxes of
  // (64, 8, 2, box_rows / 8, 1).
  auto make_row_groups = [&](CUtensorMap* map, const void* base, int64_t rows, int64_t row_stride,
                             int64_t groups, int64_t outer, int64_t outer_stride, uint32_t box_rows) {
    if (outer <= 0 || groups <= 0 || !aligned(static_cast<int64_t>(reinterpret_cast<uintptr_t>(base))) ||
        !aligned(row_stride * kElement) || !aligned(outer_stride * kElement))
      return false;
    const cuuint64_t dims[5] = {64, static_cast<cuuint64_t>(rows), 2, static_cast<cuuint64_t>(groups),
                                static_cast<cuuint64_t>(outer)};
    const cuuint64_t strides[4] = {static_cast<cuuint64_t>(row_stride * kElement), 64 * kElement,
                                   static_cast<cuuint64_t>(8 * row_stride * kElement),
                                   static_cast<cuuint64_t>(outer_stride * kElement)};
    const cuuint32_t box[5] = {64, 8, 2, box_rows / 8, 1};
    const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
    return encode(map, type, 5, const_cast<void*>(base), dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, kSm90L2Promotion,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  const bool row_groups_fit = BSA_SM90_KV_ROW_GROUPS && params.head_size == 128;
  if (!kv.paged()) {
    // By row group: the row dimension runs over every token and the group dimension steps 8 tokens
    // from there, so a box may start at any token (only whole tiles inside a sequence are read).
    if (row_groups_fit && kv.num_rows >= 64) {
      const int64_t groups = (kv.num_rows + 7) / 8;
      maps.kv_row_groups =
          make_row_groups(&maps.key, kv.key, kv.num_rows, kv.row_stride, groups, params.num_kv_heads, kv.head_stride, 64) &&
          make_row_groups(&maps.value, kv.value, kv.num_rows, kv.row_stride, groups, params.num_kv_heads,
                          kv.head_stride, 64);
      maps.kv_enabled = maps.kv_row_groups;
      if (maps.kv_enabled) return maps;
    }
    maps.kv_enabled =
        make(&maps.key, kv.key, params.num_kv_heads, kv.num_rows, kv.head_stride, kv.row_stride, 1, 64) &&
        make(&maps.value, kv.value, params.num_kv_heads, kv.num_rows, kv.head_stride, kv.row_stride, 1, 64);
    return maps;
  }
  // Pages of kvbs rows: boxes of min(kvbs, 64) rows inside one page, at most 4 per 64-key tile (one
  // producer lane per box, and by column block per column block, looks its page up and issues it),
  // each starting at a multiple of 8 rows (the swizzle's period); slabs of kvbs * D elements, one
  // (block, kv head in the block) each.
  const int kvbs = kv.kv_block_size;
  if (!std::is_same<Cache, Element>::value || !kv.sm90_tma_pages()) return maps;
  const int64_t slab_elements = static_cast<int64_t>(kvbs) * params.head_size;
  maps.kv_page_heads = static_cast<int>(kv.cache_block_stride / slab_elements);
  const int64_t slabs = static_cast<int64_t>(kv.num_cache_blocks) * maps.kv_page_heads;
  if (slabs > INT32_MAX) return maps;
  maps.kv_page_rows = std::min(kvbs, 64);
  const auto rows = static_cast<uint32_t>(maps.kv_page_rows);
  if (row_groups_fit) {
    maps.kv_row_groups =
        make_row_groups(&maps.key, kv.key, 8, params.head_size, kvbs / 8, slabs, slab_elements, rows) &&
        make_row_groups(&maps.value, kv.value, 8, params.head_size, kvbs / 8, slabs, slab_elements, rows);
    maps.kv_enabled = maps.kv_row_groups;
    if (maps.kv_enabled) return maps;
  }
  maps.kv_enabled = make(&maps.key, kv.key, kvbs, slabs, params.head_size, slab_elements, rows, 1) &&
                    make(&maps.value, kv.value, kvbs, slabs, params.head_size, slab_elements, rows, 1);
  return maps;
}

#if BSA_SM90_TRACE
// The BSA_SM90_TRACE-th launch of this instantiation (prefill_sm90_trace.cuh): waits for it and prints
// its trace to stderr, one line per fill ("sm90_trace <fill> <event clocks>", 0: not recorded). The
// launch before it clears the buffer (a module's device variables start zeroed).
inline void print_sm90_trace(cudaStream_t stream) {
  static int launches = 0;
  ++launches;
  if (launches == BSA_SM90_TRACE) {
    static long long clocks[sizeof(sm90_trace_clock) / sizeof(long long)];
    cudaStreamSynchronize(stream);
    cudaMemcpyFromSymbol(clocks, sm90_trace_clock, sizeof(clocks));
    std::fprintf(stderr, "sm90_trace fills %d events %d\n", kSm90TraceFills, kSm90TraceEvents);
    for (int fill = 0; fill < kSm90TraceFills; ++fill) {
      std::fprintf(stderr, "sm90_trace %d", fill);
      for (int event = 0; event < kSm90TraceEvents; ++event)
        std::fprintf(stderr, " %lld", clocks[fill * kSm90TraceEvents + event]);
      std::fprintf(stderr, "\n");
    }
  }
  if (launches + 1 == BSA_SM90_TRACE) {
    void* buffer = nullptr;
    cudaGetSymbolAddress(&buffer, sm90_trace_clock);
    cudaMemsetAsync(buffer, 0, sizeof(sm90_trace_clock), stream);
  }
}
#endif

// Persistent grid of num_ctas CTAs (one per SM: the ring and the Q buffers take most of the shared
// memory), at most one per work unit; fills of kStageKeys keys (64 or 128, see Sm90Tiling); K/V stored
// as Cache (Element, or fp8 in the paged cache).
template <typename Element, int kHeadDim, int kStageKeys, typename Cache>
void launch_prefill_sm90(const PrefillParams& params, const Sm90Launch& launch, cudaStream_t stream) {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the Hopper prefill kernel takes padded head dims 64 and 128");
  using Tiling = Sm90Tiling<kStageKeys>;
  constexpr int kSmemBytes = Sm90Smem<kHeadDim, Tiling>::kBytes;
  const Sm90TensorMaps maps = sm90_tensor_maps<Element, Cache>(params, launch.use_tma);
  auto kernel = prefill_sm90_kernel<Element, kHeadDim, Tiling, Cache, 128>;
  if constexpr (BSA_SM90_PRODUCER_WARPS == 1 && !CacheFormat<Cache>::kFp8) {
    // Contiguous K/V with Q and K/V through the TMA: a producer of one warp (prefill_sm90.cuh).
    if (!params.kv.paged() && maps.kv_enabled && maps.query_enabled)
      kernel = prefill_sm90_kernel<Element, kHeadDim, Tiling, Cache, 32>;
  }
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  const int64_t max_units = static_cast<int64_t>(launch.max_tiles) * (params.num_q_heads >> params.pack_gqa_shift);
  const int grid = static_cast<int>(std::min<int64_t>(launch.num_ctas, max_units));
  // A programmatic dependent of the plan kernel before it: the CTAs take their SMs, carve the shared
  // memory and set up their barriers while the plan runs, and wait for it (griddepcontrol.wait) before
  // their first global read. The launch gap leaves the path of short prompts: 256 x 128 tokens -0.5 %,
  // 64 x 512 -0.55 % (H200, 5 rounds, benchmarks/RESULTS.md). The decode kernels launch so too.
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kSm90Threads);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, kernel, params, maps);
#if BSA_SM90_TRACE
  print_sm90_trace(stream);
#endif
}
}  // namespace blocksparse_attn
