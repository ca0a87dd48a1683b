// Host side of the Hopper prefill kernel: the TMA maps and the persistent launch. Compiled by nvcc
// (it launches the kernel) but run on the host; included by the per-instantiation .cu files.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
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

// Builds the maps where the TMA can read the tensors (16-byte aligned base and strides); leaves
// them disabled otherwise. BSA_SM90_TMA=0 disables them (experiments).
template <typename Element>
Sm90TensorMaps sm90_tensor_maps(const PrefillParams& params, bool use_tma) {
  Sm90TensorMaps maps{};
  if (!use_tma) return maps;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = sm90_tensor_map_encoder();
  if (encode == nullptr) return maps;
  const CUtensorMapDataType type =
      std::is_same<Element, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  constexpr int64_t kElement = sizeof(Element);
  // (head dim, heads, rows) with element strides between heads and between rows.
  auto make = [&](CUtensorMap* map, const void* base, int64_t heads, int64_t rows, int64_t head_stride,
                  int64_t row_stride) {
    auto aligned = [](int64_t bytes) { return bytes % 16 == 0; };
    if (rows <= 0 || !aligned(static_cast<int64_t>(reinterpret_cast<uintptr_t>(base))) ||
        !aligned(head_stride * kElement) || !aligned(row_stride * kElement))
      return false;
    const cuuint64_t dims[3] = {static_cast<cuuint64_t>(params.head_size), static_cast<cuuint64_t>(heads),
                                static_cast<cuuint64_t>(rows)};
    const cuuint64_t strides[2] = {static_cast<cuuint64_t>(head_stride * kElement),
                                   static_cast<cuuint64_t>(row_stride * kElement)};
    const cuuint32_t box[3] = {64, 1, 64};
    const cuuint32_t element_strides[3] = {1, 1, 1};
    return encode(map, type, 3, const_cast<void*>(base), dims, strides, box, element_strides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  maps.query_enabled = make(&maps.query, params.q, params.num_q_heads, params.num_q_tokens, params.q_head_stride,
                            params.q_row_stride);
  const KeyValueSource& kv = params.kv;
  maps.kv_enabled =
      !kv.paged() && make(&maps.key, kv.key, params.num_kv_heads, kv.num_rows, kv.head_stride, kv.row_stride) &&
      make(&maps.value, kv.value, params.num_kv_heads, kv.num_rows, kv.head_stride, kv.row_stride);
  return maps;
}

// Persistent grid of num_ctas CTAs (one per SM: the ring and the Q buffers take most of the shared
// memory), at most one per work unit; fills of kStageKeys keys (64 or 128, see Sm90Tiling); K/V stored
// as Cache (Element, or fp8 in the paged cache).
template <typename Element, int kHeadDim, int kStageKeys, typename Cache>
void launch_prefill_sm90(const PrefillParams& params, const Sm90Launch& launch, cudaStream_t stream) {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the Hopper prefill kernel takes padded head dims 64 and 128");
  using Tiling = Sm90Tiling<kStageKeys>;
  constexpr int kSmemBytes = Sm90Smem<kHeadDim, Tiling>::kBytes;
  auto kernel = prefill_sm90_kernel<Element, kHeadDim, Tiling, Cache>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  const int64_t max_units = static_cast<int64_t>(launch.max_tiles) * params.num_q_heads;
  const int grid = static_cast<int>(std::min<int64_t>(launch.num_ctas, max_units));
  kernel<<<grid, kSm90Threads, kSmemBytes, stream>>>(params, sm90_tensor_maps<Element>(params, launch.use_tma));
}
}  // namespace blocksparse_attn
