// Runtime -> compile-time switches of the CUDA kernels, in one place: element type x padded head dim.
//
// Build knob: setup.py defines BSA_HEAD_DIM_PAD_<n> for the padded head dims to instantiate (all by
// default; BSA_HEAD_DIMS=128 builds only the 128 family for quick development). A head size whose
// family was not built fails loudly, never silently rounds.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <type_traits>

#include "common/checks.h"
#include "cuda/kernels/params.h"

namespace blocksparse_attn {

// Shared memory rows of the sm80 kernels are padded to multiples of 64 elements (128 bytes).
constexpr int padded_head_dim(int head_size) { return (head_size + 63) / 64 * 64; }

template <int kPad>
using HeadDimPad = std::integral_constant<int, kPad>;

template <typename Element, typename Fn>
void dispatch_head_dim_pad(int64_t head_size, Fn&& fn) {
  switch (padded_head_dim(static_cast<int>(head_size))) {
#if BSA_HEAD_DIM_PAD_64
    case 64: return fn(Element{}, HeadDimPad<64>{});
#endif
#if BSA_HEAD_DIM_PAD_128
    case 128: return fn(Element{}, HeadDimPad<128>{});
#endif
#if BSA_HEAD_DIM_PAD_256
    case 256: return fn(Element{}, HeadDimPad<256>{});
#endif
    default:
      BSA_CHECK(false, "head size ", head_size, " (padded to ", padded_head_dim(static_cast<int>(head_size)),
                  ") is not compiled into this build; rebuild without BSA_HEAD_DIMS or include it");
  }
}

// fn(Element{}, HeadDimPad<n>{}) with Element = __half or __nv_bfloat16.
template <typename Fn>
void dispatch_element_and_head_dim(at::ScalarType dtype, int64_t head_size, Fn&& fn) {
  switch (dtype) {
    case at::kHalf: return dispatch_head_dim_pad<__half>(head_size, fn);
    case at::kBFloat16: return dispatch_head_dim_pad<__nv_bfloat16>(head_size, fn);
    default:
      BSA_CHECK(false, "the CUDA kernels take float16 or bfloat16 inputs, got ", dtype,
                  " (float32 attention runs on the CPU only)");
  }
}

// fn(Cache{}): what the K/V source stores, Element (q's dtype) or an fp8 format.
template <typename Element, typename Fn>
void dispatch_cache_format(at::ScalarType cache_dtype, Fn&& fn) {
  switch (cache_dtype) {
    case at::kFloat8_e4m3fn: return fn(__nv_fp8_e4m3{});
    case at::kFloat8_e5m2: return fn(__nv_fp8_e5m2{});
    default: return fn(Element{});  // the checks made it q's dtype
  }
}

// The launchers, each defined once per instantiation in csrc/cuda/generated/*.cu (scripts/gen_kernels.py).
// Cache: Element, or an fp8 format (paged caches). The Hopper kernel is launched only on compute
// capability 9.x by an extension built for sm_90a (setup.py defines BSA_BUILT_SM90A); its grid is
// persistent (at most launch.num_ctas CTAs) and fp8 caches take its 64-key fills only.
template <typename Element, int kHeadDimPad, typename Cache>
void launch_prefill_sm80(const PrefillParams& params, int max_tiles, cudaStream_t stream);
template <typename Element, int kHeadDimPad, int kStageKeys, typename Cache>
void launch_prefill_sm90(const PrefillParams& params, const Sm90Launch& launch, cudaStream_t stream);
template <typename Element, int kHeadDimPad, typename Cache>
void launch_decode_sm80(const DecodeParams& params, cudaStream_t stream);
// How many decode CTAs of this instantiation one SM runs at once (the occupancy calculator, asked once).
template <typename Element, int kHeadDimPad, typename Cache>
int decode_sm80_ctas_per_sm();
// The same for the build a small grid runs (DecodeParams::small_grid_build); 0 where the instantiation
// has no such build.
template <typename Element, int kHeadDimPad, typename Cache>
int decode_sm80_small_grid_ctas_per_sm();
// The most decode splits one thread-block cluster of this instantiation holds on this device (2..16;
// 0: no cluster merge here), asked once.
template <typename Element, int kHeadDimPad, typename Cache>
int decode_sm80_max_cluster_splits();

}  // namespace blocksparse_attn
