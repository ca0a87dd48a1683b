// What the prefill kernels (sm80 and sm90) share: block-level visibility (the parametric pattern of
// common/pattern.h, or a binary search in the explicit CSR layout's row) and the rows a work item
// covers. Torch-free.
#pragma once

#include <cstdint>

#include "common/pattern.h"
#include "cuda/kernels/params.h"

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

// One (sequence, query tile, q head) work unit of the plan kernel's list, resolved: unit =
// item * Hq + head, so the q heads of one tile (and of one kv group) run side by side.
struct PrefillItem {
  int seq, head, kv_head;
  int q_begin;      // the sequence's first row in the packed q / out
  int k_len;        // keys of the sequence (context + new tokens)
  int first_pos;    // absolute position of the sequence's first query (k_len - q_len)
  int tile_pos;     // absolute position of the tile's first row
  int valid_begin;  // the tile's rows that are queries of the sequence: [valid_begin, valid_end)
  int valid_end;
};

// False for a unit past the planned items (grids are sized by a host-side bound).
__device__ __forceinline__ bool load_prefill_item(const PrefillParams& params, int block_m, int unit, PrefillItem& it) {
  const int item = unit / params.num_q_heads;
  if (item >= *params.num_tiles) return false;
  it.head = unit % params.num_q_heads;
  it.seq = params.tile_seq[item];
  it.kv_head = it.head / params.pattern.q_heads_per_kv;
  const KeyValueSource& kv = params.kv;
  it.q_begin = params.cu_seqlens_q[it.seq];
  const int q_len = params.cu_seqlens_q[it.seq + 1] - it.q_begin;
  it.k_len = kv.paged() ? kv.seq_lens[it.seq] : kv.cu_seqlens_k[it.seq + 1] - kv.cu_seqlens_k[it.seq];
  it.first_pos = it.k_len - q_len;
  it.tile_pos = params.tile_index[item] * block_m;
  it.valid_begin = max(it.tile_pos, it.first_pos);
  it.valid_end = min(it.tile_pos + block_m, it.k_len);
  return true;
}

}  // namespace blocksparse_attn
