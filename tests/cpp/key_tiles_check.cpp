// The prefill kernels' key tiles (BlockKeyTiles in csrc/common/pattern.h) against block_visible: for
// random parametric patterns (blocks of 64 and 128 tokens, bands and strides from 1 up, sliding heads)
// and random query spans of one and two blocks with a random last key, the tiles come out ascending,
// exactly those of a block some row of the span sees that start at or before the last key, each with
// the rows that see its block; ClosedKeyTiles gives the same tiles and rows in closed form. Built and
// run by tests/test_cpp_checks.py; prints the first mismatch and exits 1, else the number of checks.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>

#include "common/pattern.h"

using blocksparse_attn::BlockKeyTiles;
using blocksparse_attn::block_visible;
using blocksparse_attn::ClosedKeyTiles;
using blocksparse_attn::every_block_visible_up_to;
using blocksparse_attn::FastDivisor;
using blocksparse_attn::SparsePattern;

namespace {

SparsePattern make_pattern(int block_size, int local, int vert, int step, int q_heads_per_kv, bool by_kv) {
  SparsePattern p{};
  p.block_size = block_size;
  while ((1 << p.block_shift) < block_size) ++p.block_shift;
  p.local_blocks = local;
  p.vert_stride = vert;
  p.head_sliding_step = step;
  p.head_offset = 0;
  p.q_heads_per_kv = q_heads_per_kv;
  p.slide_by_kv_head = by_kv;
  p.vert_stride_divisor = FastDivisor(vert);
  p.q_heads_per_kv_divisor = FastDivisor(q_heads_per_kv);
  return p;
}

template <int kTileKeys, int kMaxRows>
int check_span(const SparsePattern& p, int h, int qb_first, int qb_last, int last_key, int64_t& checks) {
  BlockKeyTiles<kTileKeys, kMaxRows> tiles;
  tiles.init(p, h, qb_first, qb_last, last_key);
  const int rows_in_walk = qb_last - qb_first + 1 < kMaxRows ? qb_last - qb_first + 1 : kMaxRows;
  const int tiles_per_block = p.block_size / kTileKeys;
  int expect = 0;  // the next tile the walk should give
  auto visible_rows = [&](int block) {
    unsigned rows = 0;
    for (int r = 0; r < rows_in_walk; ++r)
      if (block_visible(p, h, qb_first + r, block)) rows |= 1u << r;
    return rows;
  };
  auto next_expected = [&](int from) {
    for (int t = from; t * kTileKeys <= last_key && t / tiles_per_block <= qb_first + rows_in_walk - 1; ++t)
      if (visible_rows(t / tiles_per_block) != 0) return t;
    return -1;
  };
  expect = next_expected(0);
  int key_tile = -1;
  ClosedKeyTiles<kTileKeys, kMaxRows> closed;
  closed.init(p, h, qb_first, qb_last, last_key);
  int closed_k = 0;  // the closed form's index of the walk's next tile
  // Where every block up to qb_last is visible (every_block_visible_up_to), the Hopper producer counts
  // the tiles instead (BSA_SM90_COUNT_TILES): 0, 1, ... up to last_key, block j seen by the rows at or
  // past it. The walk must give exactly those.
  const bool counted = every_block_visible_up_to(p, qb_last);
  int count = 0;
  while (tiles.next(key_tile)) {
    ++checks;
    if (key_tile != expect) return 1;
    if (tiles.rows != visible_rows(key_tile / tiles_per_block)) return 2;
    unsigned closed_rows = 0;
    if (closed.tile(p, closed_k++, closed_rows) != key_tile || closed_rows != tiles.rows) return 5;
    if (counted) {
      unsigned rows = 0;
      for (int r = 0; r < rows_in_walk; ++r)
        if (key_tile / tiles_per_block <= qb_first + r) rows |= 1u << r;
      if (key_tile != count++ || tiles.rows != rows) return 4;
    }
    expect = next_expected(key_tile + 1);
  }
  ++checks;
  unsigned unused_rows = 0;
  for (int k = closed_k; k < closed_k + 40; ++k)
    if (closed.tile(p, k, unused_rows) != -1) return 5;
  // (the kernel's last key lies in its last row's block; here it may lie past the walk's rows)
  const int last_tile = std::min(last_key / kTileKeys, (qb_first + rows_in_walk) * tiles_per_block - 1);
  if (counted && count != (last_key < 0 ? 0 : last_tile + 1)) return 4;
  return expect != -1 ? 3 : 0;
}

}  // namespace

int main() {
  std::mt19937 rng(2026);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int64_t checks = 0;
  const char* what[] = {"ok", "wrong tile", "wrong rows", "tiles missing at the end",
                        "every block visible, but the walk is not the count",
                        "the closed form is not the walk"};
  for (int trial = 0; trial < 60000; ++trial) {
    const int block_size = pick(0, 1) ? 64 : 128;
    // bands from 1 block to past the span (dense), strides from 1 (every block a column)
    const int local = pick(0, 3) == 0 ? pick(40, 200) : pick(1, 24);
    const SparsePattern p = make_pattern(block_size, local, pick(1, 12), pick(0, 5), pick(1, 4), pick(0, 1));
    const int h = pick(0, 15);
    const int qb_first = pick(0, 0) + (pick(0, 2) == 0 ? pick(0, 3) : pick(0, 60));
    const int span = pick(1, 2);
    const int qb_last = qb_first + span - 1;
    // the last key: anywhere from the first row's block to the last row's block's end
    const int last_key = pick(qb_first * block_size, (qb_last + 1) * block_size - 1) - (pick(0, 40) == 0 ? 100000 : 0);
    int bad = span == 1 || pick(0, 1) ? check_span<64, 1>(p, h, qb_first, qb_first, last_key, checks) : 0;
    if (!bad) bad = check_span<64, 2>(p, h, qb_first, qb_last, last_key, checks);
    if (bad) {
      std::printf("%s: B %d, local %d, vert %d, step %d, head %d, rows %d..%d, last key %d\n", what[bad], block_size,
                  local, p.vert_stride, p.head_sliding_step, h, qb_first, qb_last, last_key);
      return 1;
    }
  }
  std::printf("%lld checks\n", static_cast<long long>(checks));
  return 0;
}
