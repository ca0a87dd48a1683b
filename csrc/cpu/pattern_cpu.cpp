// pattern_block_mask: the pattern's visible blocks as the kernels enumerate them (common/pattern.h),
// as a dense mask, so tests can hold the one walk against layout.py and the reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "common/attention_args.h"
#include "common/pattern.h"

namespace blocksparse_attn {
namespace {

// Marks what VisibleBlocks<kRows> returns for every span of kRows query blocks (the kernels' tiles).
template <int kRows>
void mark_walks(const SparsePattern& p, int64_t num_q_heads, int64_t n, bool* mask) {
  for (int64_t h = 0; h < num_q_heads; ++h)
    for (int64_t first = 0; first < n; first += kRows) {
      VisibleBlocks<kRows> blocks;
      blocks.init(p, static_cast<int>(h), static_cast<int>(first), static_cast<int>(std::min(first + kRows, n) - 1));
      unsigned rows;
      for (int j = blocks.next(rows); j >= 0; j = blocks.next(rows))
        for (int r = 0; r < kRows; ++r)
          if ((rows >> r) & 1u) mask[(h * n + first + r) * n + j] = true;
    }
}

// Marks the decode kernel's closed-form union over each kv group's heads (chunks of 16, as the CUDA
// kernel takes them), with the heads that see each block.
void mark_head_sets(const SparsePattern& p, int64_t num_q_heads, int64_t n, bool* mask) {
  constexpr int kChunk = 16;
  for (int64_t first = 0; first < num_q_heads; first += std::min<int64_t>(kChunk, p.q_heads_per_kv)) {
    const int group_end = static_cast<int>((first / p.q_heads_per_kv + 1) * p.q_heads_per_kv);
    const int count = std::min<int>(kChunk, group_end - static_cast<int>(first));
    int residues[kChunk];
    unsigned residue_rows[kChunk];
    const int num_residues = head_residues(p, static_cast<int>(first), count, residues, residue_rows);
    for (int64_t i = 0; i < n; ++i) {
      HeadSetBlocks blocks;
      blocks.init(p, static_cast<int>(i), residues, residue_rows, num_residues, (1u << count) - 1);
      for (int k = 0; k < blocks.total; ++k) {
        unsigned rows;
        const int j = blocks.block(k, rows);
        for (int r = 0; r < count; ++r)
          if ((rows >> r) & 1u) mask[((first + r) * n + i) * n + j] = true;
      }
    }
  }
}

at::Tensor pattern_block_mask_cpu(c10::IntArrayRef pattern, const std::optional<at::Tensor>& layout_crow,
                                  const std::optional<at::Tensor>& layout_col, int64_t num_q_heads,
                                  int64_t num_kv_heads, int64_t num_q_blocks, int64_t rows_per_walk) {
  BSA_CHECK(num_q_heads >= 1 && num_kv_heads >= 1 && num_q_heads % num_kv_heads == 0, "num_kv_heads (",
            num_kv_heads, ") must be >= 1 and divide num_q_heads (", num_q_heads, ")");
  BSA_CHECK(num_q_blocks >= 0, "num_q_blocks must be >= 0, got ", num_q_blocks);
  BSA_CHECK(rows_per_walk == 0 || rows_per_walk == 1 || rows_per_walk == 2 || rows_per_walk == 4,
            "rows_per_walk must be 0, 1, 2 or 4, got ", rows_per_walk);
  AttentionShape shape;
  shape.num_q_heads = num_q_heads;
  shape.num_kv_heads = num_kv_heads;
  const at::Tensor on_cpu = at::empty({0});
  const SparsePattern p = check_pattern(shape, pattern, layout_crow, layout_col, on_cpu, /*check_values=*/true);
  if (p.has_layout())
    BSA_CHECK(num_q_blocks <= p.layout_rows, "the explicit layout describes ", p.layout_rows,
              " query blocks, num_q_blocks = ", num_q_blocks, " were asked for");
  at::Tensor mask = at::zeros({num_q_heads, num_q_blocks, num_q_blocks}, at::kBool);
  bool* m = mask.data_ptr<bool>();
  switch (rows_per_walk) {
    case 1: mark_walks<1>(p, num_q_heads, num_q_blocks, m); break;
    case 2: mark_walks<2>(p, num_q_heads, num_q_blocks, m); break;
    case 4: mark_walks<4>(p, num_q_heads, num_q_blocks, m); break;
    default:
      BSA_CHECK(!p.has_layout(), "rows_per_walk = 0 (the decode kernel's closed form) takes the parametric pattern, "
                "not an explicit layout");
      mark_head_sets(p, num_q_heads, num_q_blocks, m);
  }
  return mask;
}

}  // namespace
}  // namespace blocksparse_attn

// CompositeExplicitAutograd: the op may have no tensor argument at all (no layout), so no backend key
// could be dispatched on; it computes on the host whatever the layout's device.
TORCH_LIBRARY_IMPL(blocksparse_attn, CompositeExplicitAutograd, m) {
  m.impl("pattern_block_mask", &blocksparse_attn::pattern_block_mask_cpu);
}
