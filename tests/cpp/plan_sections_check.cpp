// The plan's work list (plan_write_sequence in csrc/cuda/kernels/plan.cuh) with sections
// (PlanParams::section_seqs): for random batches (equal and mixed lengths, sequences without queries,
// chunks that start mid-tile, long sequences numbered kv head by kv head) and section sizes 1-9, the
// list holds every (sequence, query tile) once; a section of sequences that all span the same tiles,
// none of them kv-head-major, lists them tile by tile across the section, the last tile first and the
// sequences in order; every other sequence's items stand together, its last tile first. The host
// replays the kernel's offsets (its scan) and calls the kernel's own per-sequence writer. Built and
// run by tests/test_cpp_checks.py; prints the first mismatch and exits 1, else the number of checks.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/kernels/plan.cuh"

using blocksparse_attn::PlanItem;
using blocksparse_attn::PlanParams;
using blocksparse_attn::plan_write_sequence;

int main() {
  std::mt19937 rng(1205);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int64_t checks = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    const int num_seqs = pick(1, 40), block_m = pick(0, 1) ? 128 : 32;
    const bool equal = pick(0, 2) > 0;
    const int shared_len = pick(1, 600);
    std::vector<int32_t> cu_q{0}, cu_k{0};
    for (int s = 0; s < num_seqs; ++s) {
      int k_len = equal ? shared_len : pick(1, 600);
      int q_len = pick(0, 5) == 0 ? pick(0, k_len) : k_len;  // chunks, some without queries
      if (equal && pick(0, 30) == 0) q_len = 0;
      cu_q.push_back(cu_q.back() + q_len);
      cu_k.push_back(cu_k.back() + k_len);
    }
    PlanParams p{};
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
    p.max_k_len = INT32_MAX;
    p.num_seqs = num_seqs;
    p.block_m = block_m;
    p.section_seqs = pick(1, 9);
    p.kv_head_major_keys = pick(0, 3) == 0 ? pick(1, 600) : INT32_MAX;
    std::vector<int> tiles(num_seqs), first(num_seqs), last(num_seqs);
    int total = 0;
    for (int s = 0; s < num_seqs; ++s) {
      blocksparse_attn::plan_tile_range(p, s, first[s], last[s]);
      tiles[s] = last[s] - first[s] + 1;
      total += tiles[s];
    }
    std::vector<PlanItem> items(total + 1);
    for (auto& it : items) it.seq = -1;
    p.items = items.data();
    int offset = 0;
    for (int s = 0; s < num_seqs; ++s) {
      const int wrote = plan_write_sequence(p, s, offset);
      ++checks;
      if (wrote != tiles[s]) return std::printf("trial %d: sequence %d wrote %d items, not %d\n", trial, s, wrote, tiles[s]), 1;
      offset += wrote;
    }
    // every (sequence, tile) once
    std::vector<std::vector<char>> seen(num_seqs);
    for (int s = 0; s < num_seqs; ++s) seen[s].assign(tiles[s], 0);
    for (int i = 0; i < total; ++i) {
      const PlanItem& it = items[i];
      ++checks;
      if (it.seq < 0 || it.seq >= num_seqs || it.tile_index < first[it.seq] || it.tile_index > last[it.seq] ||
          seen[it.seq][it.tile_index - first[it.seq]]++)
        return std::printf("trial %d: slot %d holds no new item of the batch\n", trial, i), 1;
    }
    ++checks;
    if (items[total].seq != -1) return std::printf("trial %d: a write past the list\n", trial), 1;
    // the order, section by section
    int base = 0;
    for (int a = 0; a < num_seqs; a += p.section_seqs) {
      const int b = a + p.section_seqs < num_seqs ? a + p.section_seqs : num_seqs;
      bool uniform = b - a > 1;
      int section_items = 0;
      for (int s = a; s < b; ++s) {
        uniform &= first[s] == first[a] && last[s] == last[a] && tiles[s] > 0 &&
                   blocksparse_attn::plan_key_length(p, s) <= p.kv_head_major_keys;
        section_items += tiles[s];
      }
      int i = base;
      if (uniform) {
        for (int t = last[a]; t >= first[a]; --t)
          for (int s = a; s < b; ++s, ++i) {
            ++checks;
            if (items[i].seq != s || items[i].tile_index != t)
              return std::printf("trial %d: section %d..%d not tile by tile at slot %d\n", trial, a, b - 1, i), 1;
          }
      } else {
        for (int s = a; s < b; ++s)
          for (int t = last[s]; t >= first[s]; --t, ++i) {
            ++checks;
            if (items[i].seq != s || items[i].tile_index != t)
              return std::printf("trial %d: sequence %d not together, last tile first, at slot %d\n", trial, s, i), 1;
          }
      }
      base += section_items;
    }
  }
  std::printf("%lld checks\n", static_cast<long long>(checks));
  return 0;
}
