// Plain-data parameters of the CUDA attention kernels: the seam between host glue (which fills them
// from tensors) and device code (which never sees a torch type).
#pragma once

#include <cstdint>

#include "common/pattern.h"

namespace blocksparse_attn {

// Query rows per CTA of the prefill kernel (one Phi-3-small sparse block) and keys per K/V tile.
constexpr int kPrefillBlockM = 64;
// 32-key tiles (measured on an H100 at 8k x 4: 3.94 ms with 32-key tiles and a 3-stage ring, three CTAs
// per SM; 5.27 ms with 64-key tiles and 2 stages, two CTAs per SM: the kernel is latency bound, and
// the smaller S tile frees the registers and shared memory for a third CTA).
#ifndef BSA_PREFILL_BLOCK_N
#define BSA_PREFILL_BLOCK_N 32
#endif
constexpr int kPrefillBlockN = BSA_PREFILL_BLOCK_N;  // 32 or 64
// Query rows per CTA of the Hopper prefill kernel: two consumer warp groups of 64 rows.
constexpr int kPrefillSm90BlockM = 128;

// Where a sequence's keys and values live: packed contiguous tensors or the paged cache.
struct KeyValueSource {
  const void* key;    // contiguous: k [Tk, Hkv, D]; paged: key_cache [NB, Hkv or 1, kvbs, D]
  const void* value;  // same layout as key
  // contiguous tensors (element strides)
  int64_t row_stride;   // between tokens
  int64_t head_stride;  // between kv heads
  int64_t num_rows;     // Tk
  const int32_t* cu_seqlens_k;  // [S + 1] (contiguous) or null (paged)
  // paged cache
  // Two layouts (common/attention_args.h): pages of every kv head, one table row per sequence
  // (block_table_head_stride 0, cache_head_stride kvbs * D); or pages of one kv head, a row per
  // (sequence, kv head) (block_table_head_stride = the row stride, cache_head_stride 0).
  const int32_t* block_tables;  // [S, max_blocks] or [S, Hkv, max_blocks]; null (contiguous)
  const int32_t* seq_lens;      // [S] (paged)
  int64_t block_table_stride;       // between sequences
  int64_t block_table_head_stride;  // between kv heads' rows of one sequence
  int64_t block_table_width;        // entries per row (max_blocks): what a row can address
  int64_t cache_block_stride;  // elements between cache blocks (Hkv * kvbs * D, or kvbs * D)
  int64_t cache_head_stride;   // elements between kv heads inside a block (kvbs * D, or 0)
  int kv_block_size;           // kvbs
  int kv_block_shift;          // log2(kvbs) where kvbs is a power of two (vLLM's 8 .. 256), else -1
  int num_cache_blocks;        // NB: a block id outside [0, NB) is never dereferenced
  // A quantized (fp8) cache is read as float(stored) * scale: [1] float32 on the device, or null (1).
  // Pointers, not values, so a captured CUDA graph picks up new scales without a re-capture.
  const float* k_scale;
  const float* v_scale;
  BSA_HOST_DEVICE bool paged() const { return block_tables != nullptr; }
  // Whether the Hopper kernel can read pages of this many rows through the TMA (the model's dtype
  // only): boxes of min(kvbs, 64) rows inside one page, each starting at a multiple of 8 rows, at most
  // 4 a 64-key tile. Other sizes take cp.async copies (launch_prefill_sm90.cuh, sm90_tensor_maps).
  BSA_HOST_DEVICE bool sm90_tma_pages() const {
    return kv_block_size % 16 == 0 && (kv_block_size <= 64 || kv_block_size % 64 == 0);
  }
  // The table row kv head kv_head of sequence seq reads its pages from.
  BSA_HOST_DEVICE const int32_t* table_row(int seq, int kv_head) const {
    return block_tables + seq * block_table_stride + kv_head * block_table_head_stride;
  }
  // A key position's entry in its table row and its row in that page: shifts where kvbs is a power
  // of two (an integer division by a run-time divisor is ~20 instructions, paid per row by the
  // prefill producers' page lookups).
  BSA_HOST_DEVICE int page_index(int pos) const {
    return kv_block_shift >= 0 ? page_index_as<true>(pos) : page_index_as<false>(pos);
  }
  BSA_HOST_DEVICE int row_in_page(int pos) const {
    return kv_block_shift >= 0 ? row_in_page_as<true>(pos) : row_in_page_as<false>(pos);
  }
  // The same with kPowerOfTwo (kv_block_shift >= 0) known, for a caller that tests it once for many rows.
  template <bool kPowerOfTwo>
  BSA_HOST_DEVICE int page_index_as(int pos) const {
    return kPowerOfTwo ? pos >> kv_block_shift : pos / kv_block_size;
  }
  template <bool kPowerOfTwo>
  BSA_HOST_DEVICE int row_in_page_as(int pos) const {
    return kPowerOfTwo ? pos & (kv_block_size - 1) : pos % kv_block_size;
  }
  // Element offset of kv head kv_head's first row in cache block `page` (>= 0), plus `within` (an
  // offset inside the block). One widening 32 x 32-bit product: a block's stride is below 2^31
  // elements (the host checks it), where the 64-bit product took ~6 instructions a row in the paged
  // copies.
  BSA_HOST_DEVICE int64_t page_offset(int page, int kv_head, int within = 0) const {
    return static_cast<int64_t>(static_cast<uint64_t>(static_cast<uint32_t>(page)) *
                                    static_cast<uint32_t>(cache_block_stride) +
                                static_cast<uint32_t>(kv_head * static_cast<int>(cache_head_stride) + within));
  }
  // Element offset of column col of key position pos (of sequence seq, kv head kv_head) in a paged
  // cache (either layout); clears `valid` where the row reads zeros instead: past k_len, or a page id
  // out of range (a bad id never reaches memory).
  BSA_HOST_DEVICE int64_t paged_row_offset(int seq, int kv_head, int pos, int k_len, int col, int head_size,
                                           bool& valid) const {
    valid = valid && pos < k_len;
    if (!valid) return 0;
    const int page = table_row(seq, kv_head)[page_index(pos)];
    valid = page >= 0 && page < num_cache_blocks;
    return page_offset(page, kv_head) + static_cast<int64_t>(row_in_page(pos)) * head_size + col;
  }
};

// The cache pages of one thread's rows of a key tile: rows row0 + u * kRowStep (u < kRows) of the tile
// at key position pos0, each page's table entry read once (with kv blocks of 16, the four rows a
// thread copies of a 32-key tile lie in two pages). `lookup` issues the table reads and nothing
// waits for them until `for_each_row`, so a kernel can look a tile's pages up an iteration before its
// copy and let the reads' latency pass under other work. Host and device:
// tests/cpp/paged_rows_check.cpp checks the offsets against the table, row by row.
template <int kRows, int kRowStep>
struct PagedRows {
  static_assert(kRows <= 32, "one bit a row");
  // Rows share what the first of them holds: page[u] is set where bit u of `starts` is (the row
  // starts a run of rows in one page, or the run of rows past rows_end, whose id is -1), -1 elsewhere.
  int page[kRows];
  unsigned starts;

  // rows_end: rows at positions >= rows_end read zeros and not even their table entry (k_len, or 0
  // for a tile or a column that reads zeros).
  BSA_HOST_DEVICE void lookup(const KeyValueSource& kv, const int32_t* table_row, int pos0, int row0, int rows_end) {
    const int first = pos0 + row0;
    int index[kRows];
    if (kv.kv_block_shift >= 0) {  // one test for all rows (page_index tests per call)
      page_indices<true>(kv, first, index);
    } else {
      page_indices<false>(kv, first, index);
    }
    const int rows_left = first < rows_end ? (rows_end - first + kRowStep - 1) / kRowStep : 0;
    const int live_rows = rows_left < kRows ? rows_left : kRows;
    // Bit u (0 < u < live_rows) where row u's page differs from row u - 1's, and bit live_rows (the
    // dead rows' run): masks, not branches (the per-row tests compiled to 7 branches a tile).
    unsigned changed = 0;
#pragma unroll
    for (int u = 1; u < kRows; ++u) changed |= static_cast<unsigned>(index[u] != index[u - 1]) << u;
    const unsigned live = static_cast<unsigned>((uint64_t{1} << live_rows) - 1);  // live_rows ones
    starts = 1u | (changed & live) | (live_rows < kRows ? 1u << live_rows : 0u);
#pragma unroll
    for (int u = 0; u < kRows; ++u) page[u] = (starts >> u & 1) && u < live_rows ? table_row[index[u]] : -1;
  }

  // Calls visit(u, offset, reads) for each row u in order: its element offset for column col of kv
  // head kv_head (head_size: a page row's elements), and whether it reads at all. A row past rows_end
  // or in a page whose id lies outside [0, NB) reads zeros and never touches memory (its offset lies
  // in page 0). Row by row, so a copy issues each row as soon as its offset is known.
  template <typename Visit>
  BSA_HOST_DEVICE void for_each_row(const KeyValueSource& kv, int kv_head, int pos0, int row0, int col, int head_size,
                                    Visit visit) const {
    if (kv.kv_block_shift >= 0) {
      rows_in_pages<true>(kv, kv_head, pos0 + row0, col, head_size, visit);
    } else {
      rows_in_pages<false>(kv, kv_head, pos0 + row0, col, head_size, visit);
    }
  }

 private:
  template <bool kPowerOfTwo>
  BSA_HOST_DEVICE static void page_indices(const KeyValueSource& kv, int first, int (&index)[kRows]) {
#pragma unroll
    for (int u = 0; u < kRows; ++u) index[u] = kv.page_index_as<kPowerOfTwo>(first + u * kRowStep);
  }
  template <bool kPowerOfTwo, typename Visit>
  BSA_HOST_DEVICE void rows_in_pages(const KeyValueSource& kv, int kv_head, int first, int col, int head_size,
                                     Visit& visit) const {
    int id = -1;
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      if (starts >> u & 1) id = page[u];
      const int pos = first + u * kRowStep;
      const int in_page = kv.row_in_page_as<kPowerOfTwo>(pos);
      const bool valid = id >= 0 && id < kv.num_cache_blocks;
      // A row that reads nothing gets page 0's address: no branch, and no address outside the cache.
      visit(u, kv.page_offset(valid ? id : 0, kv_head, in_page * head_size + col), valid);
    }
  }
};

// The gather of a batch's keys and values out of the paged cache into contiguous tensors
// (cuda/kernels/kv_gather.cuh, BSA_PAGED_PREFILL=gather|auto).
struct GatherParams {
  KeyValueSource kv;  // paged (either layout), in the model's dtype or fp8
  void* key_out;      // [num_seqs * capacity, Hkv, D] contiguous, in the model's dtype
  void* value_out;
  int capacity;       // rows a sequence may take: the block table's width times kvbs
  int head_size;      // a multiple of 8 (chunks of 8 elements)
  FastDivisor chunks_per_token;  // Hkv * head_size / 8
  FastDivisor chunks_per_row;    // head_size / 8

  // The rows of sequence seq that are copied: its length, cut to the capacity (a length past it is
  // invalid input, unchecked without BSA_CHECK_INPUTS, and never writes outside the sequence's rows).
  BSA_HOST_DEVICE int rows(int seq) const { return kv.seq_lens[seq] < capacity ? kv.seq_lens[seq] : capacity; }

  // 8-element chunk c (c < chunks_per_token: kv head, then column) of token t of sequence seq (t <
  // rows(seq)): its element offsets in the cache (src, where valid) and in the gathered tensors
  // (dst); valid is false where the page id is out of range (the chunk reads zeros; src 0). Two
  // steps, so that a kernel can issue the table reads of many chunks before it waits for one: the
  // table entry that holds the chunk's page id (inside the row, as t < capacity), then the offsets
  // from that id. Host and device: tests/cpp/paged_rows_check.cpp checks both against the table.
  template <bool kPowerOfTwo>
  BSA_HOST_DEVICE const int32_t* chunk_page_entry(int seq, int t, int c) const {
    return kv.table_row(seq, chunks_per_row.div(c)) + kv.page_index_as<kPowerOfTwo>(t);
  }
  template <bool kPowerOfTwo>
  BSA_HOST_DEVICE void chunk_offsets(int page, int seq, int t, int c, int64_t& src, int64_t& dst, bool& valid) const {
    const int head = chunks_per_row.div(c), col = (c - head * chunks_per_row.divisor()) * 8;
    valid = page >= 0 && page < kv.num_cache_blocks;
    // a bad id's offset never becomes an address, even speculatively
    src = valid ? kv.page_offset(page, head) + static_cast<int64_t>(kv.row_in_page_as<kPowerOfTwo>(t)) * head_size + col
                : 0;
    dst = ((static_cast<int64_t>(seq) * capacity + t) * chunks_per_token.divisor() + c) * 8;
  }
};

// One item of the plan's work list (a sequence's query tile) with its sequence's lengths and offsets
// copied in, so that a kernel resolves a work unit from one 32-byte load instead of a chain of two
// (the list, then the sequence's cu_seqlens): short prompts' units are that chain's length apart.
struct alignas(16) PlanItem {
  int32_t seq;
  int32_t tile_index;  // absolute query tile (positions tile_index * block_m ...)
  int32_t q_begin;     // the sequence's first row in the packed q / out
  int32_t q_len;
  int32_t k_begin;     // contiguous K/V: the sequence's first row (cu_seqlens_k); paged: 0
  int32_t k_len;       // keys of the sequence (context + new tokens)
  int32_t unused[2];
};

// Kv-head-major numbering (PrefillParams::kv_head_major_keys): a sequence's units in groups of `group`
// kv heads (a divisor of the kv heads), each group's tiles from the sequence's last one back, the
// group's group x (q heads per kv head) q heads side by side; then its first `tail_tiles` tiles
// (PrefillParams::kv_tail_keys) tile by tile, all q heads side by side, from the last of them back.
// The local-th unit of the sequence ([0, tiles * Hq)) is q head `head` of the tile `tiles_back`
// before the last. heads_per_kv: the q heads per kv head (SparsePattern::q_heads_per_kv_divisor).
// Why the tail: the CTAs claim their units two ahead, so a list that ends with a kv head's tiles
// (four units a tile for Phi-3-small, the last 264 claims reaching 66 tiles back at 16k) ends on
// long units committed behind long units. A model of the claims (scripts/claims_model.py) put 1.4 %
// of dense 16k x 2's SM time idle at the end, with the tail 0.1 %; Nsight Compute measured 1.5 % and
// 0.15 % (H100, 2026-12-05).
struct KvMajorUnit {
  int head, tiles_back;
};
BSA_HOST_DEVICE KvMajorUnit kv_major_unit(int local, int tiles, int tail_tiles, int group, int num_kv_heads,
                                          const FastDivisor& heads_per_kv) {
  const int group_tiles = tiles - tail_tiles;
  const int group_part = group_tiles * num_kv_heads * heads_per_kv.divisor();
  int first_back = 0;
  if (local >= group_part) {  // the tail: one group of every kv head is tile by tile
    local -= group_part;
    first_back = group_tiles;
    tiles = tail_tiles;
    group = num_kv_heads;
  } else {
    tiles = group_tiles;
  }
  const int group_heads = group * heads_per_kv.divisor();
  const int group_units = tiles * group_heads;
  const int group_index = local / group_units;
  const int rest = local - group_index * group_units;  // tiles_back * group_heads + the head in the group
  const int kv_rows = heads_per_kv.div(rest);           // tiles_back * group + the kv head in the group
  const int tiles_back = kv_rows / group;
  return {group_index * group_heads + rest - tiles_back * group_heads, first_back + tiles_back};
}

// The kv heads a group of that numbering takes: `requested` (at least 1) cut to the largest divisor
// of num_kv_heads not above it, so that every group is whole (BSA_PREFILL_KV_GROUP=n).
BSA_HOST_DEVICE int kv_group_size(int requested, int num_kv_heads) {
  int group = requested < 1 ? 1 : (requested > num_kv_heads ? num_kv_heads : requested);
  while (num_kv_heads % group != 0) --group;
  return group;
}

// BSA_PREFILL_KV_GROUP=l2, per sequence: the most kv heads whose K/V of k_len keys fit the L2 together
// (l2_keys: keys of one kv head's K/V that the L2 holds), a power of two that divides the kv heads,
// at least 1. FlashAttention-4's forward scheduler sections its (batch, kv head) pairs by this rule.
BSA_HOST_DEVICE int kv_group_for_l2(int l2_keys, int k_len, int num_kv_heads) {
  const int fit = k_len > 0 ? l2_keys / k_len : num_kv_heads;
  int group = num_kv_heads & -num_kv_heads;  // the largest power of two dividing the kv heads
  while (group > 1 && group > fit) group >>= 1;
  return group;
}

struct PrefillParams {
  const void* q;  // [T, Hq, D], element strides below
  void* out;      // [T, Hq, D] contiguous
  float* lse;     // [Hq, T] or null
  int64_t q_row_stride, q_head_stride;
  int64_t out_row_stride, out_head_stride;
  const int32_t* cu_seqlens_q;  // [S + 1]
  KeyValueSource kv;
  int num_seqs;
  int num_q_tokens;
  int num_q_heads;
  int num_kv_heads;
  int head_size;
  float scale_log2;  // softmax scale * log2(e): the kernels use exp2
  SparsePattern pattern;
  // The work list written by the plan kernel: packed (sequence, query tile) items, sequence by
  // sequence, each one's longest rows first.
  const PlanItem* items;     // [max_items], the first *num_tiles written
  const int32_t* num_tiles;  // [1]
  int max_items;
  // Work units claimed so far by the persistent Hopper kernel's CTAs; zeroed by the plan kernel.
  int32_t* work_counter;  // [1]
  // How a sequence's units are numbered (load_prefill_item): tile by tile, each tile's q heads side
  // by side, or kv head by kv head for a sequence of more than kv_head_major_keys keys (its K/V
  // outgrows the L2; decided per sequence from its own length; 0: every sequence, INT_MAX: none).
  int kv_head_major_keys;
  // Numbered kv head by kv head, a sequence's units go through its kv heads in groups of kv_group
  // (kv_major_unit; BSA_PREFILL_KV_GROUP, 1 by default), or, where kv_group is 0, of
  // kv_group_for_l2(kv_head_l2_keys, its length) kv heads (BSA_PREFILL_KV_GROUP=l2).
  int kv_group;
  int kv_head_l2_keys;  // keys of one kv head's K and V that the L2 holds
  // Numbered kv head by kv head, a sequence's tiles whose keys all lie below kv_tail_keys come last,
  // tile by tile (kv_major_unit's tail; BSA_PREFILL_KV_TAIL): the list ends on short units. 0: none.
  int kv_tail_keys;
  // Hopper kernel only: log2 of the q heads one work unit computes together (0: one). With s > 0 a
  // unit is (query tile of kPrefillSm90BlockM >> s tokens, kv head) and its 128 rows are the tile's
  // tokens times the kv group's 2^s q heads, row = token * 2^s + head in the group: the group's K/V
  // is read once for all of them, and short query runs fill the rows. Only where every q head of
  // a group sees the same key blocks (every causal block visible); the host picks (tile by tile).
  int pack_gqa_shift;
  // A plan item's work units, num_q_heads >> pack_gqa_shift (plan_item_anchor divides by it).
  FastDivisor units_per_item;
};

// How the host launches the persistent Hopper prefill kernel (cuda/launch_prefill_sm90.cuh).
struct Sm90Launch {
  int max_tiles;  // the plan's bound on (sequence, query tile) items
  int num_ctas;   // persistent CTAs (one per SM unless BSA_SM90_GRID says otherwise)
  bool use_tma;   // Q and contiguous K/V through the TMA where the tensors allow it (BSA_SM90_TMA)
};

// Query heads of one kv group computed together by a decode CTA: the rows of one m16n8k16 tile.
constexpr int kDecodeHeadsPerCta = 16;
constexpr int kDecodeSliceTokens = 16;  // keys per warp step (the k extent of one P.V mma)
constexpr int kDecodeWarpsPerCta = 4;
constexpr int kMaxDecodeSplits = 64;
// The largest cluster of splits that merges on chip (sm_90's non-portable cluster limit).
constexpr int kMaxClusterSplits = 16;

struct DecodeParams {
  const void* q;  // [S, Hq, D], element strides below
  void* out;      // [S, Hq, D]
  float* lse;     // [Hq, S] or null
  int64_t q_row_stride, q_head_stride;
  int64_t out_row_stride, out_head_stride;
  KeyValueSource kv;  // paged
  int num_seqs;
  int num_q_heads;
  int num_kv_heads;
  int head_size;
  int head_chunks;  // ceil(heads per kv group / kDecodeHeadsPerCta): CTAs per (sequence, kv head, split)
  int num_splits;   // CTAs sharing one sequence's key blocks (flash-decoding)
  float scale_log2;
  SparsePattern pattern;
  // num_splits > 1, without cluster_merge: each split writes its normalised output and lse here; a
  // merge kernel combines them.
  float* partial_out;  // [S, Hq, num_splits, head_size]
  float* partial_lse;  // [S, Hq, num_splits]
  // 1 (sm_90, num_splits in 2..kMaxClusterSplits): the splits of a (sequence, kv head, head chunk)
  // are one thread-block cluster and merge through distributed shared memory; no partials, no merge
  // kernel.
  int cluster_merge;
  // 1: run the fp8 kernel's small-grid build (launch_decode_sm80; the host sets it where the grid fits
  // one wave of that build). Read by the launcher only.
  int small_grid_build;
};

// The plan kernel's inputs and outputs (cuda/kernels/plan.cuh).
struct PlanParams {
  const int32_t* cu_seqlens_q;  // [S + 1]
  const int32_t* cu_seqlens_k;  // [S + 1] or null
  const int32_t* seq_lens;      // [S] or null (then cu_seqlens_k)
  // The most keys a sequence can hold: the block table's capacity for the paged cache and gathered
  // K/V, INT_MAX for contiguous K/V. A length past it (invalid input, unchecked without
  // BSA_CHECK_INPUTS) is cut to it, so no kernel reads past a sequence's table row or gathered rows.
  int max_k_len;
  int num_seqs;
  int block_m;
  PlanItem* items;       // [max_tiles]
  int32_t* num_tiles;    // [1]
  int32_t* work_counter;  // [1]: set to 0
};

}  // namespace blocksparse_attn
