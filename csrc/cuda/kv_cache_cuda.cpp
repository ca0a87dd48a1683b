// CUDA host glue of the KV-cache ops.
//
// write_kv_cache and copy_blocks read no device data on the host: out-of-range slots and block ids
// are skipped by the kernels (never written out of bounds); BSA_CHECK_INPUTS=1 turns them into
// errors raised before anything is written, at the cost of a device->host copy. swap_blocks takes
// its mapping on the CPU (as the spec says), so it always validates.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <vector>

#include "common/kv_cache_args.h"
#include "common/settings.h"
#include "cuda/kv_cache_launch.h"

namespace blocksparse_attn {

namespace {

void write_kv_cache_cuda(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                         const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const Settings settings = read_settings();
  check_write_kv_cache_args(key, value, key_cache, value_cache, slot_mapping, {k_scale, v_scale},
                            settings.check_inputs);
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const at::Tensor slots = slot_mapping.contiguous();
  const bool per_kv_head = slots.dim() == 2;  // slot_mapping [T, Hkv]: pages of one kv head
  if (settings.check_inputs) check_slot_values(slots.cpu(), key_cache);
  if (is_fp8(key_cache.scalar_type())) {
    BSA_CHECK(key_cache.size(3) % 16 == 0, "an fp8 key_cache on CUDA needs a head size that is a multiple of 16, got ",
              key_cache.size(3));
    const KvInput input = key.scalar_type() == at::kFloat ? KvInput::kFloat
                          : key.scalar_type() == at::kHalf ? KvInput::kHalf
                                                            : KvInput::kBFloat16;
    launch_write_kv_cache_fp8(key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                              slots.data_ptr<int64_t>(), key.size(0), static_cast<int>(key.size(1)), per_kv_head,
                              static_cast<int>(key_cache.size(3)), key.stride(0), key.stride(1),
                              static_cast<int>(key_cache.size(2)), key_cache.size(0) * key_cache.size(2),
                              k_scale ? k_scale->data_ptr<float>() : nullptr,
                              v_scale ? v_scale->data_ptr<float>() : nullptr, input,
                              key_cache.scalar_type() == at::kFloat8_e5m2, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t elem = key.element_size();
  const int64_t row_bytes = key_cache.size(3) * elem;
  const int64_t token_stride = key.stride(0) * elem, head_stride = key.stride(1) * elem;
  const bool vectorized = row_bytes % 16 == 0 && token_stride % 16 == 0 && head_stride % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(key.data_ptr()) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(value.data_ptr()) % 16 == 0;
  launch_write_kv_cache(key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                        slots.data_ptr<int64_t>(), key.size(0), static_cast<int>(key.size(1)), per_kv_head, row_bytes,
                        token_stride, head_stride, static_cast<int>(key_cache.size(2)),
                        key_cache.size(0) * key_cache.size(2), vectorized, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy_blocks_cuda(at::TensorList kv_caches, const at::Tensor& block_mapping) {
  check_block_mapping_shape(block_mapping);
  if (kv_caches.empty()) return;
  const at::Tensor& first = kv_caches[0];
  for (size_t l = 0; l < kv_caches.size(); ++l) {
    const std::string name = "kv_caches[" + std::to_string(l) + "]";
    check_kv_cache(kv_caches[l], name);
    check_same_device(kv_caches[l], name.c_str(), first, "kv_caches[0]");
    BSA_CHECK(kv_caches[l].sizes() == first.sizes() && kv_caches[l].scalar_type() == first.scalar_type(), name,
                " must have the shape and dtype of kv_caches[0] (", first.sizes(), ", ", first.scalar_type(),
                "), got ", kv_caches[l].sizes(), ", ", kv_caches[l].scalar_type());
  }
  const int64_t num_blocks = first.size(1);
  const int64_t block_bytes = first.numel() / (2 * num_blocks) * first.element_size();
  BSA_CHECK(block_bytes % 16 == 0, "copy_blocks needs blocks of a multiple of 16 bytes, got ", block_bytes);
  const c10::cuda::CUDAGuard guard(first.device());
  if (read_settings().check_inputs || block_mapping.device().is_cpu())
    check_block_mapping_values(block_mapping.cpu().contiguous(), num_blocks, num_blocks);
  const at::Tensor mapping = block_mapping.to(first.device()).contiguous();
  std::vector<int64_t> ptrs;
  for (const auto& c : kv_caches) ptrs.push_back(reinterpret_cast<int64_t>(c.data_ptr()));
  const at::Tensor cache_ptrs = at::tensor(ptrs, at::kLong).to(first.device());
  launch_copy_blocks(cache_ptrs.data_ptr<int64_t>(), mapping.data_ptr<int64_t>(), mapping.size(0),
                     static_cast<int>(kv_caches.size()), num_blocks, block_bytes, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One cudaMemcpyAsync per run of consecutive (src, dst) blocks and half, on the current stream. The
// host side is asynchronous only when it is pinned memory (pin_memory=True).
void swap_blocks_cuda(const at::Tensor& src_kv_cache, const at::Tensor& dst_kv_cache, const at::Tensor& block_mapping) {
  check_swap_caches(src_kv_cache, dst_kv_cache);
  check_block_mapping_shape(block_mapping);
  BSA_CHECK(block_mapping.device().is_cpu(), "block_mapping must be on the CPU, got ", block_mapping.device());
  const at::Tensor mapping = block_mapping.contiguous();
  check_block_mapping_values(mapping, src_kv_cache.size(1), dst_kv_cache.size(1));
  const at::Tensor& gpu = src_kv_cache.is_cuda() ? src_kv_cache : dst_kv_cache;
  const c10::cuda::CUDAGuard guard(gpu.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t block_bytes = src_kv_cache.numel() / (2 * src_kv_cache.size(1)) * src_kv_cache.element_size();
  const int64_t* pair = mapping.data_ptr<int64_t>();
  const int64_t n = mapping.size(0);
  auto* src = static_cast<const char*>(src_kv_cache.data_ptr());
  auto* dst = static_cast<char*>(dst_kv_cache.data_ptr());
  const int64_t src_half = src_kv_cache.size(1) * block_bytes, dst_half = dst_kv_cache.size(1) * block_bytes;
  for (int64_t i = 0; i < n;) {
    int64_t run = 1;
    while (i + run < n && pair[2 * (i + run)] == pair[2 * i] + run && pair[2 * (i + run) + 1] == pair[2 * i + 1] + run)
      ++run;
    for (int half = 0; half < 2; ++half)
      C10_CUDA_CHECK(cudaMemcpyAsync(dst + half * dst_half + pair[2 * i + 1] * block_bytes,
                                     src + half * src_half + pair[2 * i] * block_bytes, run * block_bytes,
                                     cudaMemcpyDefault, stream));
    i += run;
  }
}

}  // namespace
}  // namespace blocksparse_attn

TORCH_LIBRARY_IMPL(blocksparse_attn, CUDA, m) {
  m.impl("write_kv_cache", &blocksparse_attn::write_kv_cache_cuda);
  m.impl("copy_blocks", &blocksparse_attn::copy_blocks_cuda);
  m.impl("swap_blocks", &blocksparse_attn::swap_blocks_cuda);
}
