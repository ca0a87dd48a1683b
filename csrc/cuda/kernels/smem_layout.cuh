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

// Byte offset of (row, col) in a [rows][kHeadDimPad] tile of fp8 values whose 16-byte chunks are
// XOR-swizzled by row % 8 (as far as a row has chunks), so that a warp reading the same columns of 8
// rows (the decode kernel's K fragments) hits different banks.
template <int kHeadDimPad>
__device__ __forceinline__ int swizzle_fp8(int row, int col) {
  constexpr int kChunks = kHeadDimPad / 16;
  const int chunk = (col >> 4) ^ (row & (kChunks < 8 ? kChunks - 1 : 7));
  return row * kHeadDimPad + (chunk << 4) + (col & 15);
}

}  // namespace blocksparse_attn
