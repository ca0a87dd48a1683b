// The block-sparse pattern (spec §2), as plain data and integer math.
//
// Torch-free and usable from host and device code alike: the CPU kernels, the CUDA kernels and the
// argument checks all read the pattern through these functions, so there is one definition of
// "key block j is visible to query block i of head h".
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BSA_HOST_DEVICE inline
#endif

namespace blocksparse_attn {

// Either the parametric Phi-3-small pattern or an explicit per-head CSR block layout.
struct SparsePattern {
  int block_size;         // B: tokens per sparse block (16, 32, 64, 128)
  int local_blocks;       // L: width of the causal band, the diagonal block included (>= 1)
  int vert_stride;        // V: every V-th key block is a vertical column (>= 1; 1 = dense causal)
  int head_sliding_step;  // s: how far the vertical columns move from one head to the next (>= 0)
  int head_offset;        // global index of this rank's q head 0 (tp_rank * Hq)
  int q_heads_per_kv;     // Hq / Hkv: contiguous q heads share one kv head
  bool slide_by_kv_head;  // homo_head_group: q heads of one kv group share the vertical columns

  // Explicit layout (all null/zero for the parametric pattern). Row i of head h holds the ascending
  // key blocks layout_col[h * layout_col_stride + layout_crow[h * (layout_rows + 1) + i] ...].
  const int32_t* layout_crow;  // [Hq, layout_rows + 1]
  const int32_t* layout_col;   // [Hq, layout_col_stride]
  int layout_rows;             // number of query blocks the layout describes
  int layout_col_stride;

  BSA_HOST_DEVICE bool has_layout() const { return layout_crow != nullptr; }
};

// The pattern's vertical offset of local q head h: off(h) in spec §2.
BSA_HOST_DEVICE int vertical_offset(const SparsePattern& p, int h) {
  const int global_head = p.head_offset + h;
  const int sliding_index = p.slide_by_kv_head ? global_head / p.q_heads_per_kv : global_head;
  return sliding_index * p.head_sliding_step + 1;
}

// The residue rho in [0, V) such that the vertical columns of head h are j = rho, rho + V, ...
BSA_HOST_DEVICE int vertical_residue(const SparsePattern& p, int h) {
  const int v = p.vert_stride;
  const int off = vertical_offset(p, h) % v;
  return (v - off) % v;
}

// Parametric pattern only: is key block j visible to query block i of local q head h?
BSA_HOST_DEVICE bool pattern_block_visible(const SparsePattern& p, int h, int i, int j) {
  if (j > i) return false;
  if (i - j < p.local_blocks) return true;
  return (j + vertical_offset(p, h)) % p.vert_stride == 0;
}

// Calls visit(first_block, num_blocks) for each maximal run of consecutive key blocks visible to
// query block i of head h, in ascending order. Runs let the CPU kernels work on whole slices of
// contiguous keys (the local band is one run), while the explicit layout is visited block by block
// merged into runs the same way.
template <typename Visit>
BSA_HOST_DEVICE void for_each_visible_run(const SparsePattern& p, int h, int i, Visit&& visit) {
  int run_start = -1, run_len = 0;
  auto emit = [&](int j) {
    if (run_len > 0 && j == run_start + run_len) {
      ++run_len;
      return;
    }
    if (run_len > 0) visit(run_start, run_len);
    run_start = j;
    run_len = 1;
  };
  if (p.has_layout()) {
    const int32_t* crow = p.layout_crow + static_cast<int64_t>(h) * (p.layout_rows + 1);
    const int32_t* col = p.layout_col + static_cast<int64_t>(h) * p.layout_col_stride;
    for (int e = crow[i]; e < crow[i + 1]; ++e) emit(col[e]);
  } else {
    const int band_start = i - p.local_blocks + 1 > 0 ? i - p.local_blocks + 1 : 0;
    // Verticals strictly below the band: j = rho, rho + V, ... < band_start.
    for (int j = vertical_residue(p, h); j < band_start; j += p.vert_stride) emit(j);
    for (int j = band_start; j <= i; ++j) emit(j);
  }
  if (run_len > 0) visit(run_start, run_len);
}

}  // namespace blocksparse_attn
