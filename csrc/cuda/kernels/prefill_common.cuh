// What the prefill kernels (sm80 and sm90) share: the work unit a CTA resolves from the plan's list
// and the end of a row's softmax. Torch-free.
#pragma once

#include <cstdint>

#include "common/pattern.h"
#include "cuda/kernels/params.h"
#include "cuda/kernels/softmax.cuh"

namespace blocksparse_attn {

// One (sequence, query tile, q head) work unit of the plan kernel's list, resolved. A sequence's
// items own units [first item * Hq, (first item + tiles) * Hq), numbered either tile by tile (unit =
// item * Hq + head: the q heads of one tile side by side) or, for a sequence of more than
// params.kv_head_major_keys keys, kv head by kv head (each kv head's tiles from the longest rows, its
// q heads side by side; in groups of kv heads, params.kv_group; the first tiles, below
// params.kv_tail_keys, last and tile by tile). The vertical columns of all
// heads together touch every key block, so tile by tile the CTAs in flight read the whole sequence's
// K/V: at 32k (134 MB) more than the L2 holds, where one kv head's is 17 MB.
struct PrefillItem {
  int seq, head, kv_head;
  int q_begin;      // the sequence's first row in the packed q / out
  int k_begin;      // contiguous K/V: the sequence's first row; paged: 0
  int k_len;        // keys of the sequence (context + new tokens)
  int first_pos;    // absolute position of the sequence's first query (k_len - q_len)
  int tile_pos;     // absolute position of the tile's first row
  int valid_begin;  // the tile's rows that are queries of the sequence: [valid_begin, valid_end)
  int valid_end;
};

// The plan item a work unit belongs to (its anchor: an item of the unit's sequence).
__device__ __forceinline__ int plan_item_anchor(const PrefillParams& params, int unit) {
  return params.units_per_item.div(unit);
}

// The work unit `unit` of plan item `item` at `anchor` (plan_item_anchor). A unit with packed heads
// (pack_shift = PrefillParams::pack_gqa_shift > 0) carries its kv group's first q head in `head`.
__device__ __forceinline__ void resolve_prefill_item(const PrefillParams& params, int block_m, int pack_shift, int unit,
                                                     int anchor, const PlanItem& item, PrefillItem& it) {
  it.seq = item.seq;
  it.q_begin = item.q_begin;
  it.k_begin = item.k_begin;
  it.k_len = item.k_len;
  it.first_pos = it.k_len - item.q_len;
  if (it.k_len > params.kv_head_major_keys) {
    // The plan lists a sequence's tiles from the last one (last_tile) down to the first.
    const int num_q_heads = params.num_q_heads;
    const int last_tile = (it.k_len - 1) / block_m, first_tile = it.first_pos / block_m;
    const int tiles = last_tile - first_tile + 1;
    const int first_item = anchor - (last_tile - item.tile_index);
    const int group =
        params.kv_group > 0 ? params.kv_group : kv_group_for_l2(params.kv_head_l2_keys, it.k_len, params.num_kv_heads);
    // the tiles [first_tile, params.kv_tail_keys / block_m): every key they see lies below kv_tail_keys
    const int tail_tiles = min(tiles, max(0, params.kv_tail_keys / block_m - first_tile));
    const KvMajorUnit u = kv_major_unit(unit - first_item * num_q_heads, tiles, tail_tiles, group,
                                        params.num_kv_heads, params.pattern.q_heads_per_kv_divisor);
    it.head = u.head;
    it.kv_head = params.pattern.q_heads_per_kv_divisor.div(it.head);
    it.tile_pos = (last_tile - u.tiles_back) * block_m;
  } else {
    // units_per_item is Hq >> params.pack_gqa_shift, pack_shift the kernel's: the host packs heads
    // only with 64-key fills (run_prefill), so the two shifts agree.
    it.head = (unit - anchor * params.units_per_item.divisor()) << pack_shift;
    it.kv_head = params.pattern.q_heads_per_kv_divisor.div(it.head);
    it.tile_pos = item.tile_index * block_m;
  }
  it.valid_begin = max(it.tile_pos, it.first_pos);
  it.valid_end = min(it.tile_pos + block_m, it.k_len);
}

// The work unit read from the plan and resolved; false for a unit past the planned items (grids
// are sized by a host-side bound).
__device__ __forceinline__ bool load_prefill_item(const PrefillParams& params, int block_m, int pack_shift, int unit,
                                                  PrefillItem& it) {
  const int num_items = *params.num_tiles;
  const int anchor = plan_item_anchor(params, unit);
  if (anchor >= num_items) return false;
  PlanItem item;
  item = params.items[anchor];
  resolve_prefill_item(params, block_m, pack_shift, unit, anchor, item, it);
  return true;
}

// The end of a query row's online softmax in both prefill kernels: the quad's sum, the row's lse
// written from the quad's first thread (tig 0) when the row, q head `head` at absolute position
// `pos`, is one of the item's queries, and the factor that normalises O.
__device__ __forceinline__ float finish_prefill_row(const PrefillParams& params, const PrefillItem& it,
                                                    const OnlineSoftmax& softmax, int r, int pos, int head, int tig) {
  const float l = softmax.quad_sum(r);
  if (params.lse != nullptr && tig == 0 && pos >= it.valid_begin && pos < it.valid_end)
    params.lse[static_cast<int64_t>(head) * params.num_q_tokens + it.q_begin + pos - it.first_pos] =
        row_lse(softmax.row_max[r], l);
  return inverse_sum(l);
}

}  // namespace blocksparse_attn
