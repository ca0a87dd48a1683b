// The shared-memory tile layout of the mma.sync kernels (sm80 prefill, decode). Torch-free.
#pragma once

namespace blocksparse_attn {

// Element offset of (row, col) in a [rows][kHeadDimPad] tile whose 16-byte chunks are XOR-swizzled by
// row % 8, so that ldmatrix reads of 8 rows hit 8 different bank groups. Head dims are padded to a
// multiple of 64 elements (128-byte rows), so the swizzle is always defined; padding columns are zero.
template <int kHeadDimPad>
__device__ __forceinline__ int swizzle(int row, int col) {
  const int chunk = (col >> 3) ^ (row & 7);
  return row * kHeadDimPad + (chunk << 3) + (col & 7);
}

}  // namespace blocksparse_attn
