// Block-level visibility on the GPU: the parametric pattern (common/pattern.h) or a binary search in
// the explicit CSR layout's row. Torch-free; shared by the prefill kernels.
#pragma once

#include <cstdint>

#include "common/pattern.h"

namespace blocksparse_attn {

// Query blocks past the layout's rows see nothing (the CPU path rejects such calls; the GPU path
// cannot without a device->host sync).
__device__ __forceinline__ bool layout_block_visible(const SparsePattern& p, int h, int i, int j) {
  if (i >= p.layout_rows) return false;
  const int32_t* crow = p.layout_crow + static_cast<int64_t>(h) * (p.layout_rows + 1);
  const int32_t* col = p.layout_col + static_cast<int64_t>(h) * p.layout_col_stride;
  int lo = crow[i], hi = crow[i + 1];
  while (lo < hi) {  // binary search: rows are ascending
    const int mid = (lo + hi) >> 1;
    const int c = col[mid];
    if (c == j) return true;
    if (c < j) lo = mid + 1; else hi = mid;
  }
  return false;
}

__device__ __forceinline__ bool block_visible(const SparsePattern& p, int h, int i, int j) {
  if (j > i) return false;
  return p.has_layout() ? layout_block_visible(p, h, i, j) : pattern_block_visible(p, h, i, j);
}

}  // namespace blocksparse_attn
