// PagedRows (csrc/cuda/kernels/params.h), the paged K/V row addressing the kernels' cp.async copies
// use, against the table read row by row: for kv block sizes that are powers of two and multiples of a
// sparse block, tables with bad ids (negative, NB and beyond), tile positions, thread rows, row ends
// and column offsets at random, and the kernels' row shapes (kRows x kRowStep). Per row: whether it
// reads, its element offset where it reads, an offset inside the cache where it does not; per tile:
// one table read per page the live rows touch. The table is sized to the entries the live rows
// address (built with AddressSanitizer where the compiler has it, a read past them fails).
// Also GatherParams::chunk_offsets, the gather of BSA_PAGED_PREFILL=gather: every chunk of every live
// token once, at its row, from its page. Built and run by tests/test_cpp_checks.py; prints the first
// mismatch and exits 1, else the number of checks.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include "cuda/kernels/params.h"

using blocksparse_attn::KeyValueSource;
using blocksparse_attn::GatherParams;
using blocksparse_attn::PagedRows;

namespace {

std::mt19937_64 rng(20261204);
int64_t checks = 0;

int uniform(int lo, int hi) { return lo + static_cast<int>(rng() % static_cast<uint64_t>(hi - lo + 1)); }

// A paged cache's sizes in either layout (common/attention_args.h): pages of every kv head, or
// (head_major_pages) pages of one kv head each.
KeyValueSource paged_cache(int kv_block_size, int head_size, int num_kv_heads, int num_blocks, bool head_major_pages) {
  KeyValueSource kv{};
  kv.kv_block_size = kv_block_size;
  kv.kv_block_shift = (kv_block_size & (kv_block_size - 1)) == 0 ? __builtin_ctz(kv_block_size) : -1;
  kv.num_cache_blocks = num_blocks;
  kv.cache_head_stride = head_major_pages ? 0 : int64_t{kv_block_size} * head_size;
  kv.cache_block_stride = int64_t{kv_block_size} * head_size * (head_major_pages ? 1 : num_kv_heads);
  return kv;
}

template <int kRows, int kRowStep>
bool check_case(int kv_block_size, bool head_major_pages) {
  const int head_size = 8 * uniform(1, 32), num_kv_heads = uniform(1, 4), num_blocks = uniform(1, 40);
  KeyValueSource kv = paged_cache(kv_block_size, head_size, num_kv_heads, num_blocks, head_major_pages);
  const int64_t cache_elems = kv.cache_block_stride * num_blocks;
  const int kv_head = head_major_pages ? 0 : uniform(0, num_kv_heads - 1);
  const int pos0 = uniform(0, 4096), row0 = uniform(0, kRowStep - 1), col = uniform(0, head_size / 8 - 1) * 8;
  const int first = pos0 + row0, last = first + (kRows - 1) * kRowStep;
  // rows_end: before the first row, inside the rows, past them, or 0 (a tile that reads nothing).
  const int choice = uniform(0, 3);
  const int rows_end = choice == 0 ? 0 : choice == 1 ? uniform(first, last + 1) : choice == 2 ? last + uniform(1, 100)
                                                                                               : uniform(0, first);
  int entries = 0;  // what the live rows address
  for (int u = 0; u < kRows; ++u)
    if (first + u * kRowStep < rows_end) entries = (first + u * kRowStep) / kv_block_size + 1;
  std::vector<int32_t> table(entries > 0 ? entries : 1);
  for (int32_t& id : table) {
    const int kind = uniform(0, 9);
    id = kind == 0 ? -uniform(1, 3) : kind == 1 ? num_blocks + uniform(0, 2) : uniform(0, num_blocks - 1);
  }

  PagedRows<kRows, kRowStep> rows;
  rows.lookup(kv, table.data(), pos0, row0, rows_end);
  int64_t offset[kRows];
  bool valid[kRows];
  int visits = 0;
  bool in_order = true;
  rows.for_each_row(kv, kv_head, pos0, row0, col, head_size, [&](int u, int64_t row_offset, bool reads) {
    in_order = in_order && u == visits++;
    offset[u] = row_offset;
    valid[u] = reads;
  });
  if (visits != kRows || !in_order) {
    std::printf("PagedRows<%d, %d>: %d rows visited, in order: %d\n", kRows, kRowStep, visits, in_order);
    return false;
  }

  std::set<int> pages_touched;
  for (int u = 0; u < kRows; ++u) {
    ++checks;
    const int pos = first + u * kRowStep;
    bool want_valid = false;
    int64_t want_offset = 0;
    if (pos < rows_end) {
      pages_touched.insert(pos / kv_block_size);
      const int id = table[pos / kv_block_size];
      want_valid = id >= 0 && id < num_blocks;
      want_offset = int64_t{id} * kv.cache_block_stride + kv_head * kv.cache_head_stride +
                    int64_t{pos % kv_block_size} * head_size + col;
    }
    const bool inside = offset[u] >= 0 && offset[u] + 8 <= cache_elems;
    if (valid[u] != want_valid || (want_valid && offset[u] != want_offset) || !inside) {
      std::printf("PagedRows<%d, %d>: kvbs %d, head-major pages %d, pos0 %d, row0 %d, rows_end %d, row %d: valid %d "
                  "offset %lld (want %d, %lld; cache %lld elements)\n",
                  kRows, kRowStep, kv_block_size, head_major_pages, pos0, row0, rows_end, u, valid[u],
                  static_cast<long long>(offset[u]), want_valid, static_cast<long long>(want_offset),
                  static_cast<long long>(cache_elems));
      return false;
    }
  }
  unsigned live = 0;  // the rows that read their table entry: the live ones that start a run
  for (int u = 0; u < kRows; ++u)
    if (first + u * kRowStep < rows_end) live |= 1u << u;
  const size_t table_reads = __builtin_popcount(rows.starts & live);
  if (table_reads != pages_touched.size()) {
    std::printf("PagedRows<%d, %d>: kvbs %d, pos0 %d, row0 %d, rows_end %d: %zu table reads for %zu pages\n", kRows,
                kRowStep, kv_block_size, pos0, row0, rows_end, table_reads, pages_touched.size());
    return false;
  }
  return true;
}

template <int kRows, int kRowStep>
bool check_shape() {
  // Powers of two (vLLM's 8 .. 256 and below) and multiples of a sparse block that are not.
  for (const int kv_block_size : {1, 2, 4, 8, 16, 32, 64, 128, 256, 48, 96, 192, 320})
    for (int i = 0; i < 2000; ++i)
      if (!check_case<kRows, kRowStep>(kv_block_size, i % 2 == 1)) return false;
  return true;
}

// GatherParams::chunk_offsets (BSA_PAGED_PREFILL=gather) against the table: every chunk of every
// token below its sequence's length (cut to the capacity: GatherParams::rows) lands once, at row
// s * capacity + t, read from its page (or zeros for a bad or released id), for both cache layouts.
bool check_gather(bool head_major_pages) {
  const int kv_block_size = std::vector<int>{1, 8, 16, 48, 64, 256}[uniform(0, 5)];
  const int head_size = 8 * uniform(1, 32), num_kv_heads = uniform(1, 4), num_blocks = uniform(1, 60);
  const int num_seqs = uniform(1, 4), width = uniform(1, 6), capacity = width * kv_block_size;
  KeyValueSource kv = paged_cache(kv_block_size, head_size, num_kv_heads, num_blocks, head_major_pages);
  const int rows_per_seq = head_major_pages ? num_kv_heads : 1;  // table rows of a sequence
  std::vector<int32_t> tables(static_cast<size_t>(num_seqs) * rows_per_seq * width), lens(num_seqs);
  for (int32_t& id : tables) {
    const int kind = uniform(0, 9);
    id = kind == 0 ? -uniform(1, 3) : kind == 1 ? num_blocks + uniform(0, 2) : uniform(0, num_blocks - 1);
  }
  // lengths past the capacity too (invalid input): the rows copied stop at it
  for (int32_t& len : lens) len = uniform(0, 7) == 0 ? capacity + uniform(1, 50) : uniform(0, capacity);
  kv.block_tables = tables.data();
  kv.block_table_stride = int64_t{rows_per_seq} * width;
  kv.block_table_head_stride = head_major_pages ? width : 0;
  kv.block_table_width = width;
  kv.seq_lens = lens.data();
  GatherParams g{};
  g.kv = kv;
  g.capacity = capacity;
  g.head_size = head_size;
  g.chunks_per_token = blocksparse_attn::FastDivisor(num_kv_heads * head_size / 8);
  g.chunks_per_row = blocksparse_attn::FastDivisor(head_size / 8);
  std::vector<char> written(static_cast<size_t>(num_seqs) * capacity * num_kv_heads * head_size / 8, 0);
  for (int seq = 0; seq < num_seqs; ++seq) {
    if (g.rows(seq) != std::min(lens[seq], capacity)) {
      std::printf("gather: seq %d of length %d copies %d rows (capacity %d)\n", seq, lens[seq], g.rows(seq), capacity);
      return false;
    }
    for (int t = 0; t < g.rows(seq); ++t)
      for (int c = 0; c < num_kv_heads * head_size / 8; ++c) {
        ++checks;
        int64_t src = 0, dst = 0;
        bool valid = false;
        if (kv.kv_block_shift >= 0) {  // the kernel's two steps: the table entry, then the offsets
          g.chunk_offsets<true>(*g.chunk_page_entry<true>(seq, t, c), seq, t, c, src, dst, valid);
        } else {
          g.chunk_offsets<false>(*g.chunk_page_entry<false>(seq, t, c), seq, t, c, src, dst, valid);
        }
        const int head = c / (head_size / 8), col = c % (head_size / 8) * 8;
        const int id = tables[(static_cast<size_t>(seq) * rows_per_seq + (head_major_pages ? head : 0)) * width +
                              t / kv_block_size];
        const bool want_valid = id >= 0 && id < num_blocks;
        const int64_t want_src = int64_t{id} * kv.cache_block_stride + head * kv.cache_head_stride +
                                 int64_t{t % kv_block_size} * head_size + col;
        const int64_t want_dst = ((int64_t{seq} * capacity + t) * num_kv_heads + head) * head_size + col;
        if (valid != want_valid || (valid && src != want_src) || dst != want_dst || dst % 8 != 0 ||
            written[dst / 8]++ != 0) {
          std::printf("gather: kvbs %d, seq %d, token %d, chunk %d: valid %d src %lld dst %lld (want %d, %lld, %lld)\n",
                      kv_block_size, seq, t, c, valid, static_cast<long long>(src), static_cast<long long>(dst),
                      want_valid, static_cast<long long>(want_src), static_cast<long long>(want_dst));
          return false;
        }
      }
  }
  return true;
}

}  // namespace

int main() {
  // The kernels' shapes: sm80 prefill (32-key tiles: 4 x 8 at head dim 128, 8 x 4 at 256, 2 x 16 at
  // 64 and for fp8), Hopper cp.async tiles (64 keys: 8 x 8, 4 x 16, 16 x 4), decode's 16-row slices
  // (8 x 2, 4 x 4, 16 x 1).
  const bool ok = check_shape<4, 8>() && check_shape<8, 4>() && check_shape<2, 16>() && check_shape<8, 8>() &&
                  check_shape<4, 16>() && check_shape<16, 4>() && check_shape<8, 2>() && check_shape<4, 4>() &&
                  check_shape<16, 1>();
  if (!ok) return 1;
  for (int i = 0; i < 400; ++i)
    if (!check_gather(i % 2 == 1)) return 1;
  std::printf("%lld checks\n", static_cast<long long>(checks));
  return 0;
}
