// The block-sparse pattern (spec §2): its fields, how the ops receive them, which key blocks a query
// block sees, and the one walk over those blocks that every kernel takes.
//
// Torch-free and usable from host and device code alike: the CPU kernels, the three CUDA kernels and
// the argument checks all read the pattern through this header, so there is one definition of "key
// block j is visible to query block i of head h" and one enumeration of the visible blocks (and the
// prefill kernels' split of it into key tiles, BlockKeyTiles); the other kernels keep their own tile
// splitting. A new pattern parameter is a field here (plus its place in PatternArgs and its check), in
// blocksparse_attn/layout.py (which writes the ops' argument) and in blocksparse_attn/reference.py.
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <string>
#endif

#include "supported.h"

#if defined(__CUDACC__)
#define BSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BSA_HOST_DEVICE inline
#endif

namespace blocksparse_attn {

// Division of an int 0 <= n < 2^31 by a divisor d >= 1 fixed for a whole call, as one wide multiply
// and a shift: n / d = (n * m) >> (31 + l) with l = ceil(log2 d) and m = ceil(2^(31 + l) / d), which
// is below 2^32. Exact: m = 2^(31 + l) / d + e with 0 <= e < 1, so n m / 2^(31 + l) exceeds n / d by
// n e / 2^(31 + l) < 2^-l <= 1 / d, less than n / d's distance to the next integer. The kernels set
// up a pattern walk for every work unit, where each integer division by a run-time value is ~15
// dependent instructions (SASS) on the producer's path; this is 2 to 3. Made on the host, once.
class FastDivisor {
 public:
  FastDivisor() = default;  // divides by 1
  // A divisor below 1 (an explicit layout's unused vert_stride of 0) divides by 1.
  explicit FastDivisor(int d) : divisor_(d > 1 ? d : 1) {
    int l = 0;
    while ((int64_t{1} << l) < divisor_) ++l;
    shift_ = 31 + l;
    multiplier_ = static_cast<uint32_t>(((uint64_t{1} << shift_) + static_cast<uint64_t>(divisor_) - 1) /
                                        static_cast<uint64_t>(divisor_));
  }
  BSA_HOST_DEVICE int divisor() const { return divisor_; }
  BSA_HOST_DEVICE int div(int n) const {
    return static_cast<int>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * multiplier_) >> shift_);
  }
  BSA_HOST_DEVICE int mod(int n) const { return n - div(n) * divisor_; }

 private:
  int divisor_ = 1;
  int shift_ = 31;
  uint32_t multiplier_ = 1u << 31;
};

// Either the parametric Phi-3-small pattern or an explicit per-head CSR block layout.
struct SparsePattern {
  int block_size;         // B: tokens per sparse block (kSupportedSparseBlockSizes)
  int block_shift;        // log2(B): every supported B is a power of two
  int local_blocks;       // L: width of the causal band, the diagonal block included (>= 1)
  int vert_stride;        // V: every V-th key block is a vertical column (>= 1; 1 = dense causal)
  int head_sliding_step;  // s: how far the vertical columns move from one head to the next (>= 0)
  int head_offset;        // global index of this rank's q head 0 (tp_rank * Hq)
  int q_heads_per_kv;     // Hq / Hkv: contiguous q heads share one kv head
  bool slide_by_kv_head;  // homo_head_group: q heads of one kv group share the vertical columns
  // vert_stride and q_heads_per_kv as FastDivisors, made with them (check_pattern): the divisions of
  // the walk's setup below, which the kernels make for every work unit.
  FastDivisor vert_stride_divisor;
  FastDivisor q_heads_per_kv_divisor;

  // Explicit layout (all null/zero for the parametric pattern). Row i of head h holds the ascending
  // key blocks layout_col[h * layout_col_stride + layout_crow[h * (layout_rows + 1) + i] ...].
  const int32_t* layout_crow;  // [Hq, layout_rows + 1]
  const int32_t* layout_col;   // [Hq, layout_col_stride]
  int layout_rows;             // number of query blocks the layout describes
  int layout_col_stride;

  BSA_HOST_DEVICE bool has_layout() const { return layout_crow != nullptr; }
};

// The attention ops take the pattern as one `int[] pattern` argument (csrc/ops.cpp), these fields in
// this order (SparsePattern.op_args / BlockLayout.op_args in layout.py write them); an explicit
// layout passes local_blocks = vert_stride = 0 and its CSR tensors beside.
struct PatternArgs {
  enum : int { kBlockSize, kLocalBlocks, kVertStride, kHeadSlidingStep, kSlideByKvHead, kHeadOffset, kCount };
};

#if !defined(__CUDA_ARCH__)
// Decodes and validates the ops' pattern argument into p (layout pointers left null, q_heads_per_kv
// untouched). Returns what is wrong, naming the field and its value, or an empty string.
inline std::string decode_pattern_args(const int64_t* args, int64_t count, bool has_layout, SparsePattern& p) {
  if (count != PatternArgs::kCount)
    return "pattern must hold " + std::to_string(int{PatternArgs::kCount}) +
           " ints (block_size, local_blocks, vert_stride, head_sliding_step, slide_by_kv_head, head_offset), got " +
           std::to_string(count);
  const int64_t b = args[PatternArgs::kBlockSize], local = args[PatternArgs::kLocalBlocks],
                vert = args[PatternArgs::kVertStride], step = args[PatternArgs::kHeadSlidingStep],
                by_kv = args[PatternArgs::kSlideByKvHead], offset = args[PatternArgs::kHeadOffset];
  if (!is_listed(kSupportedSparseBlockSizes, b))
    return "sparse_block_size must be " + std::string(kSupportedSparseBlockSizesText) + ", got " + std::to_string(b);
  if (step < 0) return "head_sliding_step must be >= 0, got " + std::to_string(step);
  if (by_kv != 0 && by_kv != 1) return "slide_by_kv_head must be 0 or 1, got " + std::to_string(by_kv);
  if (offset < 0) return "head_offset must be >= 0, got " + std::to_string(offset);
  if (has_layout) {
    if (local != 0 || vert != 0)
      return "with an explicit block layout pass local_blocks = 0 and vert_stride = 0, got local_blocks = " +
             std::to_string(local) + ", vert_stride = " + std::to_string(vert);
  } else {
    if (local < 1) return "local_blocks must be >= 1, got " + std::to_string(local);
    if (vert < 1) return "vert_stride must be >= 1, got " + std::to_string(vert);
  }
  constexpr int64_t kMax = 1 << 30;  // every field is an int in the kernels
  if (local > kMax || vert > kMax || step > kMax || offset > kMax)
    return "pattern fields must be below 2^30, got local_blocks = " + std::to_string(local) + ", vert_stride = " +
           std::to_string(vert) + ", head_sliding_step = " + std::to_string(step) + ", head_offset = " +
           std::to_string(offset);
  p.block_size = static_cast<int>(b);
  p.block_shift = 0;
  while ((1 << p.block_shift) < p.block_size) ++p.block_shift;
  p.local_blocks = static_cast<int>(local);
  p.vert_stride = static_cast<int>(vert);
  p.head_sliding_step = static_cast<int>(step);
  p.slide_by_kv_head = by_kv != 0;
  p.head_offset = static_cast<int>(offset);
  return {};
}
#endif

template <int kCount>
constexpr bool all_powers_of_two(const int (&values)[kCount]) {
  for (int v : values)
    if (v < 1 || (v & (v - 1)) != 0) return false;
  return true;
}
static_assert(all_powers_of_two(kSupportedSparseBlockSizes), "SparsePattern::block_shift needs powers of two");

// The pattern's vertical offset of local q head h: off(h) in spec §2 (below 2^31: check_pattern).
BSA_HOST_DEVICE int vertical_offset(const SparsePattern& p, int h) {
  const int global_head = p.head_offset + h;
  const int sliding_index = p.slide_by_kv_head ? p.q_heads_per_kv_divisor.div(global_head) : global_head;
  return sliding_index * p.head_sliding_step + 1;
}

// The residue rho in [0, V) such that the vertical columns of head h are j = rho, rho + V, ...
BSA_HOST_DEVICE int vertical_residue(const SparsePattern& p, int h) {
  const int off = p.vert_stride_divisor.mod(vertical_offset(p, h));
  return off == 0 ? 0 : p.vert_stride - off;  // (V - off) mod V
}

// First key block of query block i's local band.
BSA_HOST_DEVICE int band_start(const SparsePattern& p, int i) { return i - p.local_blocks + 1 > 0 ? i - p.local_blocks + 1 : 0; }

// Does every query block up to qb_last see every key block at or before it, for every q head? True
// for a parametric pattern whose vertical stride is 1 (every block is a vertical column) or whose
// local band reaches back past block 0 from qb_last (block_visible: i - j < local_blocks). An explicit
// layout would need its rows: false.
BSA_HOST_DEVICE bool every_block_visible_up_to(const SparsePattern& p, int64_t qb_last) {
  return !p.has_layout() && (p.vert_stride == 1 || qb_last < p.local_blocks);
}

// Is key block j visible to query block i of local q head h? An explicit layout's row is searched
// (rows are ascending); query blocks past the layout's rows see nothing (the CPU path rejects such
// calls; the GPU path cannot without a device->host sync).
BSA_HOST_DEVICE bool block_visible(const SparsePattern& p, int h, int i, int j) {
  if (j > i) return false;
  if (!p.has_layout())
    // j + off(h) is a multiple of V, without forming the sum (which can pass 2^31 - 1)
    return i - j < p.local_blocks || p.vert_stride_divisor.mod(j) == vertical_residue(p, h);
  if (i >= p.layout_rows) return false;
  const int32_t* crow = p.layout_crow + static_cast<int64_t>(h) * (p.layout_rows + 1);
  const int32_t* col = p.layout_col + static_cast<int64_t>(h) * p.layout_col_stride;
  int lo = crow[i], hi = crow[i + 1];
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (col[mid] == j) return true;
    if (col[mid] < j) lo = mid + 1; else hi = mid;
  }
  return false;
}

// One explicit-layout row's visible blocks (its CSR entries), ascending, read from the head's column
// list `col` (LayoutRow::columns; kept by the caller: a walk's rows share their head's); query
// blocks past the layout's rows see nothing.
struct LayoutRow {
  int entry, entry_end;

  BSA_HOST_DEVICE static const int32_t* columns(const SparsePattern& p, int h) {
    return p.layout_col + static_cast<int64_t>(h) * p.layout_col_stride;
  }
  BSA_HOST_DEVICE void init(const SparsePattern& p, int h, int i) {
    const int32_t* crow = p.layout_crow + static_cast<int64_t>(h) * (p.layout_rows + 1);
    const bool covered = i < p.layout_rows;
    entry = covered ? crow[i] : 0;
    entry_end = covered ? crow[i + 1] : 0;
  }
  // The row's next block, INT32_MAX when done.
  BSA_HOST_DEVICE int peek(const int32_t* col) const { return entry < entry_end ? col[entry] : INT32_MAX; }
  BSA_HOST_DEVICE void advance() { ++entry; }
};

// THE walk: the key blocks visible to some query block of [qb_first, qb_last] (at most kMaxRows of
// them) of q head h, ascending, each with the query blocks that see it (bit r: qb_first + r).
//  - parametric pattern: the vertical columns below qb_first's band, then the band from there to
//    qb_last. That is exactly the union: a row's band and its later rows' bands are contiguous, and
//    every vertical column at or past the band start lies inside it. The verticality of band blocks
//    (needed only by rows whose band starts later) is tracked by a running phase, never a division.
//  - explicit layout: a merge of the rows' LayoutRow cursors (the decode kernel merges one per lane
//    across its warp instead: one head per lane).
// Host and device; one instance per thread (kernels call it identically in every thread that needs
// it).
template <int kMaxRows>
struct VisibleBlocks {
  static_assert(kMaxRows >= 1 && kMaxRows <= 32, "rows are bits of an unsigned");
  const SparsePattern* p;
  int qb_first, num_rows;
  int block;       // pattern: the next block of the stream
  int start;       // pattern: qb_first's band start
  int phase;       // pattern, band part: (block - residue) mod V, 0 = a vertical column
  int residue;     // pattern: the head's vertical residue
  bool last_vertical;  // pattern, kMaxRows > 1: the block next() returned last is a vertical column
  const int32_t* col;                // layout: the head's column list
  LayoutRow layout_rows[kMaxRows];  // layout: each row's cursor

  BSA_HOST_DEVICE void init(const SparsePattern& pattern, int h, int first, int last) {
    p = &pattern;
    qb_first = first;
    num_rows = last - first + 1 < kMaxRows ? last - first + 1 : kMaxRows;
    if (pattern.has_layout()) {
      col = LayoutRow::columns(pattern, h);
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        layout_rows[r].init(pattern, h, first + r);
        if (r >= num_rows) layout_rows[r].entry_end = layout_rows[r].entry;  // not one of the walk's rows
      }
      return;
    }
    start = band_start(pattern, first);
    residue = vertical_residue(pattern, h);
    block = residue < start ? residue : start;
    // (start - residue) mod V, where residue < V
    phase = start >= residue ? pattern.vert_stride_divisor.mod(start - residue)
                             : start - residue + pattern.vert_stride;
  }

  // The next visible block (>= 0), with `rows` = the query blocks that see it; -1 at the end.
  BSA_HOST_DEVICE int next(unsigned& rows) {
    if (p->has_layout()) {
      int j = INT32_MAX;
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) j = layout_rows[r].peek(col) < j ? layout_rows[r].peek(col) : j;
      if (j == INT32_MAX) return -1;
      rows = 0;
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r)
        if (layout_rows[r].peek(col) == j) {
          rows |= 1u << r;
          layout_rows[r].advance();
        }
      return j;
    }
    const int last = qb_first + num_rows - 1;
    if (block > last) return -1;
    const int j = block;
    if (j < start) {  // a vertical column below the band
      last_vertical = true;
      block += p->vert_stride;
      if (block >= start) block = start;
    } else {
      ++block;
      if constexpr (kMaxRows > 1) {
        last_vertical = phase == 0;
        phase = phase + 1 == p->vert_stride ? 0 : phase + 1;
      }
    }
    if constexpr (kMaxRows == 1) {
      rows = 1u;  // the stream of a single row is that row's visible list
    } else {
      rows = 0;
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        const int i = qb_first + r;
        if (r < num_rows && j <= i && (i - j < p->local_blocks || last_vertical)) rows |= 1u << r;
      }
    }
    return j;
  }
};

// Calls visit(first_block, num_blocks) for each maximal run of consecutive key blocks visible to
// query block i of head h, in ascending order (the CPU kernels work on whole slices of contiguous
// keys: the local band is one run).
template <typename Visit>
inline void for_each_visible_run(const SparsePattern& p, int h, int i, Visit&& visit) {
  VisibleBlocks<1> blocks;
  blocks.init(p, h, i, i);
  int run_start = -1, run_len = 0;
  unsigned rows;
  for (int j = blocks.next(rows); j >= 0; j = blocks.next(rows)) {
    if (run_len > 0 && j == run_start + run_len) {
      ++run_len;
      continue;
    }
    if (run_len > 0) visit(run_start, run_len);
    run_start = j;
    run_len = 1;
  }
  if (run_len > 0) visit(run_start, run_len);
}

// The prefill kernels' split of THE walk into kTileKeys-key tiles, in order, for sparse blocks of at
// least kTileKeys tokens (a power of two, as B is); tiles that start after last_key (the query tile's
// last position) are skipped: they hold no key its queries can see. `rows`: the query blocks that see
// the current tile's block. tests/cpp/key_tiles_check.cpp checks it against block_visible.
// (Counting the tiles where every block is visible, instead of stepping the walk, ran 6-7 % more
// cycles on dense layers in the four-warp Hopper producer: benchmarks/RESULTS.md, twenty-third
// session. The one-warp producer counts them (BSA_SM90_COUNT_TILES): 2.2-2.4 % fewer cycles there.)
template <int kTileKeys, int kMaxRows>
struct BlockKeyTiles {
  VisibleBlocks<kMaxRows> walk;
  int tiles_per_block;  // B / kTileKeys
  int block, sub;       // the current block and its next tile
  int last_key;
  unsigned rows;

  BSA_HOST_DEVICE void init(const SparsePattern& pattern, int h, int first, int qb_last, int last_key_pos) {
    walk.init(pattern, h, first, qb_last);
    tiles_per_block = pattern.block_size / kTileKeys;
    sub = tiles_per_block;
    last_key = last_key_pos;
  }

  // The next key tile (absolute keys key_tile * kTileKeys ...), or false at the end.
  BSA_HOST_DEVICE bool next(int& key_tile) {
    while (true) {
      if (sub == tiles_per_block) {
        block = walk.next(rows);
        sub = 0;
        if (block < 0) return false;
      }
      const int t = block * tiles_per_block + sub++;
      if (t * kTileKeys > last_key) {  // the rest of this block lies after every query of the tile
        sub = tiles_per_block;
        continue;
      }
      key_tile = t;
      return true;
    }
  }
};

// BlockKeyTiles' tiles of a parametric pattern in closed form: tile(k) is the walk's k-th tile (the
// verticals below the first row's band, then the band up to the last row, each block split into
// kTileKeys-key tiles and cut at last_key), so that the 32 lanes of a warp can find 32 tiles at once
// instead of stepping the walk tile by tile (tests/cpp/key_tiles_check.cpp checks it against
// BlockKeyTiles). Not for an explicit layout.
template <int kTileKeys, int kMaxRows>
struct ClosedKeyTiles {
  static constexpr int kTileShift = kTileKeys == 64 ? 6 : kTileKeys == 32 ? 5 : kTileKeys == 16 ? 4 : -1;
  static_assert(kTileShift > 0, "tiles of 16, 32 or 64 keys");
  // Only what the unit sets: the pattern's fields are read from it (the kernels' parameters), so that
  // a producer keeps no copy of them in registers.
  int first, last;          // the walk's query blocks
  int start, residue;       // the first row's band start, the head's vertical residue
  int num_far, num_blocks;  // the columns below the band; all the walk's blocks
  int last_key;

  BSA_HOST_DEVICE void init(const SparsePattern& p, int h, int qb_first, int qb_last, int last_key_pos) {
    first = qb_first;
    last = qb_last - qb_first + 1 < kMaxRows ? qb_last : qb_first + kMaxRows - 1;
    start = band_start(p, qb_first);
    residue = vertical_residue(p, h);
    // the columns residue, residue + V, ... below the band
    num_far = residue < start ? p.vert_stride_divisor.div(start - 1 - residue) + 1 : 0;
    num_blocks = num_far + last + 1 - start;
    last_key = last_key_pos;
  }
  // The walk's tile k (k >= 0) with the rows that see its block (bit r: query block first + r), or
  // -1 past the walk's end (every later k is past it too).
  BSA_HOST_DEVICE int tile(const SparsePattern& p, int k, unsigned& rows) const {
    const int tile_shift = p.block_shift - kTileShift;  // tiles a block: 2^tile_shift
    const int blk = k >> tile_shift;
    if (blk >= num_blocks) return -1;
    const int j = blk < num_far ? residue + blk * p.vert_stride : start + (blk - num_far);
    const int t = (j << tile_shift) + (k & ((1 << tile_shift) - 1));
    // the walk's blocks ascend, so the first tile past the last key ends it
    if (static_cast<int64_t>(t) * kTileKeys > last_key) return -1;
    const bool vertical = p.vert_stride_divisor.mod(j) == residue;
    rows = 0;  // VisibleBlocks::next's test (block_visible's), row by row
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      const int i = first + r;
      if (i <= last && j <= i && (i - j < p.local_blocks || vertical)) rows |= 1u << r;
    }
    return t;
  }
};

// The same union for a set of q heads at one query block i (decode: the heads of one kv group), in
// closed form for the parametric pattern: the far blocks below the band whose residue belongs to some
// head, then the band, seen by every head. block(k) is O(1), so a split of the list starts anywhere
// and lanes look ahead independently. `residues` (sorted, distinct) and `residue_rows` (bit r: head r
// of the set has residues[e]) come from head_residues().
struct HeadSetBlocks {
  int vert_stride, start, num_far, num_residues, total;
  const int* residues;
  const unsigned* residue_rows;
  unsigned all_rows;

  BSA_HOST_DEVICE void init(const SparsePattern& p, int i, const int* sorted_residues, const unsigned* rows_of,
                            int count, unsigned every_row) {
    vert_stride = p.vert_stride;
    start = band_start(p, i);
    residues = sorted_residues;
    residue_rows = rows_of;
    num_residues = count;
    all_rows = every_row;
    int far = (start / vert_stride) * count;
    for (int e = 0; e < count; ++e) far += residues[e] < start % vert_stride;
    num_far = far;
    total = far + i - start + 1;
  }

  // Block k of the union (k < total) and the heads that see it.
  BSA_HOST_DEVICE int block(int k, unsigned& rows) const {
    if (k >= num_far) {
      rows = all_rows;
      return start + (k - num_far);
    }
    const int e = k % num_residues;
    rows = residue_rows[e];
    return (k / num_residues) * vert_stride + residues[e];
  }
};

// The distinct vertical residues of q heads first_head .. first_head + num_heads - 1, sorted, with the
// heads (bit r: first_head + r) of each; returns their count (<= num_heads).
BSA_HOST_DEVICE int head_residues(const SparsePattern& p, int first_head, int num_heads, int* residues,
                                  unsigned* rows) {
  int n = 0;
  for (int r = 0; r < num_heads; ++r) {
    const int rho = vertical_residue(p, first_head + r);
    int e = 0;
    while (e < n && residues[e] < rho) ++e;
    if (e < n && residues[e] == rho) {
      rows[e] |= 1u << r;
      continue;
    }
    for (int m = n; m > e; --m) {
      residues[m] = residues[m - 1];
      rows[m] = rows[m - 1];
    }
    residues[e] = rho;
    rows[e] = 1u << r;
    ++n;
  }
  return n;
}

}  // namespace blocksparse_attn
