// Where a sequence's keys and values live (contiguous tensors or the paged cache) and the one
// cp.async loader of K/V rows that the prefill kernels and the decode kernel's general path share.
// Torch-free.
#pragma once

#include <cstdint>

#include "cuda/kernels/params.h"
#include "cuda/kernels/ptx.cuh"

namespace blocksparse_attn {

// Copies rows of one kv head's keys and values into shared memory with 16-byte cp.async: this
// thread's rows are row0 + u * kRowStep (u < kCopies) of the tile starting at key position pos0, its
// 16-byte chunk starts at column col, and dst_offset(row, col) is the byte offset of (row, col) in both
// destination tiles (each kernel's own swizzle). Rows past k_len, rows in a page whose id is out of
// range, columns past head_size and a whole invalid tile (tile_valid false) read as zeros, which keeps
// unwritten (possibly NaN) cache slots out of P.V and never touches memory out of bounds.
template <typename Element, int kCopies, int kRowStep, typename DstOffset>
__device__ __forceinline__ void copy_kv_rows(const KeyValueSource& kv, int seq, int kv_head, int pos0, int row0,
                                             int col, int k_len, int head_size, bool tile_valid, void* dst_k,
                                             void* dst_v, DstOffset dst_offset) {
  const Element* key = static_cast<const Element*>(kv.key);
  const Element* value = static_cast<const Element*>(kv.value);
  unsigned char* to_k = static_cast<unsigned char*>(dst_k);
  unsigned char* to_v = static_cast<unsigned char*>(dst_v);
  const bool col_valid = tile_valid && col < head_size;
  if (!kv.paged()) {
    // Contiguous keys: one base offset per tile, then fixed steps (a 64-bit product per copy costs
    // more issue slots than the copy itself). An invalid row reads nothing (source size 0), so its
    // address needs no clamp.
    const int64_t base =
        static_cast<int64_t>(kv.cu_seqlens_k[seq] + pos0 + row0) * kv.row_stride + kv_head * kv.head_stride + col;
    const int64_t step = kRowStep * kv.row_stride;
#pragma unroll
    for (int u = 0; u < kCopies; ++u) {
      const int row = row0 + u * kRowStep;
      const bool valid = col_valid && pos0 + row < k_len;
      const int64_t offset = base + u * step;
      const int dst = dst_offset(row, col);
      ptx::cp_async_16(to_k + dst, key + offset, valid);
      ptx::cp_async_16(to_v + dst, value + offset, valid);
    }
    return;
  }
  // Paged cache [NB, Hkv, kvbs, D]: a page lookup per row.
#pragma unroll
  for (int u = 0; u < kCopies; ++u) {
    const int row = row0 + u * kRowStep;
    const int pos = pos0 + row;
    bool valid = col_valid && pos < k_len;
    int64_t offset = 0;
    if (valid) {
      const int page = kv.block_tables[seq * kv.block_table_stride + pos / kv.kv_block_size];
      valid = page >= 0 && page < kv.num_cache_blocks;  // a bad id reads zeros, never wild memory
      offset = page * kv.cache_block_stride + kv_head * kv.cache_head_stride +
               static_cast<int64_t>(pos % kv.kv_block_size) * head_size + col;
    }
    const int dst = dst_offset(row, col);
    ptx::cp_async_16(to_k + dst, valid ? key + offset : key, valid);
    ptx::cp_async_16(to_v + dst, valid ? value + offset : value, valid);
  }
}

}  // namespace blocksparse_attn
