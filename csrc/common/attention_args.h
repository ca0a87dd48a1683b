// Validation of the attention ops' arguments, shared by every backend's host code.
//
// Shape/dtype/device checks need no data and run on every call. The checks that must read tensor
// values (cu_seqlens monotone, block ids in range, a well-formed layout) are separate functions over
// host copies: the CPU kernels always run them; on the GPU they would cost a device->host sync.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string>

#include "checks.h"
#include "kv_cache_args.h"
#include "pattern.h"

namespace blocksparse_attn {

struct AttentionShape {
  int64_t num_q_tokens = 0;  // T
  int64_t num_q_heads = 0;   // Hq
  int64_t num_kv_heads = 0;  // Hkv
  int64_t head_size = 0;     // D
  int64_t num_seqs = 0;      // S
};

// out and q: [T, Hq, D] of one floating dtype, out contiguous; q needs only a unit last stride.
inline AttentionShape check_query_and_out(const at::Tensor& out, const at::Tensor& q) {
  check_dim(q, "q", 3, "[num_tokens, num_q_heads, head_size]");
  check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16});
  check_last_dim_contiguous(q, "q");
  check_head_size(q.size(2), "q");
  BSA_CHECK(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  check_same_dtype(out, "out", q, "q");
  check_same_device(out, "out", q, "q");
  check_contiguous(out, "out");
  AttentionShape shape;
  shape.num_q_tokens = q.size(0);
  shape.num_q_heads = q.size(1);
  shape.head_size = q.size(2);
  return shape;
}

inline void check_kv_heads(AttentionShape& shape, int64_t num_kv_heads, const char* name) {
  BSA_CHECK(num_kv_heads > 0 && shape.num_q_heads % num_kv_heads == 0, name, " has ", num_kv_heads,
              " kv heads, which must divide the ", shape.num_q_heads, " query heads of q");
  shape.num_kv_heads = num_kv_heads;
}

inline void check_int_vector(const at::Tensor& t, const char* name, int64_t length, const at::Tensor& q,
                             const char* what) {
  check_dim(t, name, 1, what);
  check_dtype(t, name, {at::kInt});
  check_same_device(t, name, q, "q");
  check_contiguous(t, name);
  if (length >= 0) check_size(t, name, 0, length, what);
}

inline void check_lse(const std::optional<at::Tensor>& lse, const AttentionShape& shape, const at::Tensor& q) {
  if (!lse) return;
  check_dim(*lse, "lse", 2, "[num_q_heads, num_tokens]");
  BSA_CHECK(lse->size(0) == shape.num_q_heads && lse->size(1) == shape.num_q_tokens, "lse must have shape [",
              shape.num_q_heads, ", ", shape.num_q_tokens, "] ([num_q_heads, num_tokens]), got ", lse->sizes());
  check_dtype(*lse, "lse", {at::kFloat});
  check_same_device(*lse, "lse", q, "q");
  check_contiguous(*lse, "lse");
}

// The paged cache comes in two layouts, told apart by block_tables' rank:
//  - shared pages (vLLM's): key_cache [NB, Hkv, kvbs, D], block_tables [S, max_blocks]; a page holds
//    kvbs tokens of every kv head;
//  - per-kv-head pages: key_cache [NB, 1, kvbs, D], block_tables [S, Hkv, max_blocks]; a page holds kvbs
//    tokens of one kv head, each (sequence, kv head) has its own row, and an entry -1 is a page the
//    engine released because no later query reads it (SparsePattern.pages_read_later); a call that
//    would read one is an error (check_paged_table_values).
inline bool per_kv_head_tables(const at::Tensor& block_tables) { return block_tables.dim() == 3; }

inline void check_block_tables(const at::Tensor& block_tables, const at::Tensor& q) {
  BSA_CHECK(block_tables.dim() == 2 || block_tables.dim() == 3, "block_tables must be [num_seqs, max_blocks_per_seq] "
            "(pages of every kv head) or [num_seqs, num_kv_heads, max_blocks_per_seq] (pages of one kv head), got "
            "shape ", block_tables.sizes());
  check_dtype(block_tables, "block_tables", {at::kInt});
  check_same_device(block_tables, "block_tables", q, "q");
  BSA_CHECK(block_tables.stride(-1) == 1, "block_tables rows must be contiguous, got strides ",
              block_tables.strides());
}

// key_cache/value_cache in q's dtype or an fp8 format (common/kv_cache_args.h), in the layout that
// block_tables' rank names; sets the kv heads and returns kvbs.
inline int64_t check_paged_cache(AttentionShape& shape, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_tables, const at::Tensor& q, const CacheScales& scales,
                                 bool check_values) {
  check_dim(key_cache, "key_cache", 4, "[num_blocks, num_kv_heads, kv_block_size, head_size]");
  BSA_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have the shape of key_cache ",
              key_cache.sizes(), ", got ", value_cache.sizes());
  check_cache_dtype(key_cache, "key_cache", q, "q");
  check_same_dtype(value_cache, "value_cache", key_cache, "key_cache");
  for (auto* cache : {&key_cache, &value_cache}) {
    const char* name = cache == &key_cache ? "key_cache" : "value_cache";
    check_same_device(*cache, name, q, "q");
    check_contiguous(*cache, name);
  }
  check_cache_scales(scales, key_cache, check_values);
  check_size(key_cache, "key_cache", 3, shape.head_size, "head_size of q");
  check_block_tables(block_tables, q);
  if (per_kv_head_tables(block_tables)) {
    BSA_CHECK(key_cache.size(1) == 1, "with block_tables [num_seqs, num_kv_heads, max_blocks_per_seq] (per-kv-head "
              "pages) a page holds one kv head: key_cache must be [num_blocks, 1, kv_block_size, head_size], got ",
              key_cache.sizes());
    check_kv_heads(shape, block_tables.size(1), "block_tables");
  } else {
    check_kv_heads(shape, key_cache.size(1), "key_cache");
  }
  BSA_CHECK(key_cache.size(2) > 0, "key_cache must have a positive kv block size, got shape ", key_cache.sizes());
  return key_cache.size(2);
}

// The explicit layout: row pointers from 0, non-decreasing, within max_nnz; columns ascending and
// causal (a key block after the query block is a user error, not something to mask silently).
inline void check_layout_values(const SparsePattern& p, int64_t num_q_heads) {
  for (int64_t h = 0; h < num_q_heads; ++h) {
    const int32_t* crow = p.layout_crow + h * (p.layout_rows + 1);
    const int32_t* col = p.layout_col + h * p.layout_col_stride;
    BSA_CHECK(crow[0] == 0, "layout_crow[", h, ", 0] must be 0, got ", crow[0]);
    for (int i = 0; i < p.layout_rows; ++i) {
      BSA_CHECK(crow[i + 1] >= crow[i] && crow[i + 1] <= p.layout_col_stride, "layout_crow[", h, ", ", i + 1,
                  "] = ", crow[i + 1], " must lie in [layout_crow[", h, ", ", i, "] = ", crow[i], ", max_nnz = ",
                  p.layout_col_stride, "]");
      for (int e = crow[i]; e < crow[i + 1]; ++e) {
        BSA_CHECK(col[e] >= 0 && col[e] <= i, "layout_col[", h, ", ", e, "] = ", col[e], " (query block ", i,
                    ") must be a key block in [0, ", i, "]: blocks above the diagonal are never visible");
        BSA_CHECK(e == crow[i] || col[e] > col[e - 1], "layout_col of head ", h, ", query block ", i,
                    " must be strictly ascending, got ", col[e - 1], " then ", col[e]);
      }
    }
  }
}

// The pattern argument (csrc/ops.cpp; decoded and validated by common/pattern.h) and the optional
// explicit layout, completed: q_heads_per_kv from the shapes, the layout pointers aimed at the layout
// tensors (on their device), and, with check_values, the layout's values checked on host copies.
// Both backends finish the pattern here and nowhere else.
inline SparsePattern check_pattern(const AttentionShape& shape, c10::IntArrayRef pattern_args,
                                   const std::optional<at::Tensor>& layout_crow,
                                   const std::optional<at::Tensor>& layout_col, const at::Tensor& q,
                                   bool check_values) {
  BSA_CHECK(layout_crow.has_value() == layout_col.has_value(),
            "layout_crow and layout_col must be given together (an explicit block layout) or not at all");
  SparsePattern p{};
  const std::string error =
      decode_pattern_args(pattern_args.data(), static_cast<int64_t>(pattern_args.size()), layout_crow.has_value(), p);
  BSA_CHECK(error.empty(), error);
  p.q_heads_per_kv = static_cast<int>(shape.num_q_heads / shape.num_kv_heads);
  p.q_heads_per_kv_divisor = FastDivisor(p.q_heads_per_kv);
  p.vert_stride_divisor = FastDivisor(p.vert_stride);
  if (!layout_crow) {
    // The kernels compute vertical_offset in int: the last q head's sliding index times the step.
    const int64_t last_head = int64_t{p.head_offset} + shape.num_q_heads - 1;
    const int64_t sliding_index = p.slide_by_kv_head ? last_head / p.q_heads_per_kv : last_head;
    BSA_CHECK(sliding_index * p.head_sliding_step + 1 < (int64_t{1} << 31), "head_sliding_step (",
              p.head_sliding_step, ") times the sliding index of the last q head (", sliding_index,
              ", from head_offset ", p.head_offset, " and ", shape.num_q_heads,
              " q heads) must stay below 2^31 - 1");
    return p;
  }
  const at::Tensor& crow = *layout_crow;
  const at::Tensor& col = *layout_col;
  check_dim(crow, "layout_crow", 2, "[num_q_heads, num_q_blocks + 1]");
  check_dim(col, "layout_col", 2, "[num_q_heads, max_nnz]");
  for (auto* t : {&crow, &col}) {
    const char* name = t == &crow ? "layout_crow" : "layout_col";
    check_dtype(*t, name, {at::kInt});
    check_same_device(*t, name, q, "q");
    check_contiguous(*t, name);
    check_size(*t, name, 0, shape.num_q_heads, "one row per query head");
  }
  BSA_CHECK(crow.size(1) >= 2, "layout_crow must describe at least one query block, got shape ", crow.sizes());
  p.layout_rows = static_cast<int>(crow.size(1) - 1);
  p.layout_col_stride = static_cast<int>(col.size(1));
  if (check_values) {
    const at::Tensor host_crow = crow.cpu(), host_col = col.cpu();
    SparsePattern host = p;
    host.layout_crow = host_crow.data_ptr<int32_t>();
    host.layout_col = host_col.data_ptr<int32_t>();
    check_layout_values(host, shape.num_q_heads);
  }
  p.layout_crow = crow.data_ptr<int32_t>();
  p.layout_col = col.data_ptr<int32_t>();
  return p;
}

inline void check_block_size_compatible(int64_t sparse_block_size, int64_t kv_block_size) {
  BSA_CHECK(sparse_block_size % kv_block_size == 0 || kv_block_size % sparse_block_size == 0,
              "sparse_block_size (", sparse_block_size, ") and the cache's kv block size (", kv_block_size,
              ") must divide one another");
}

// ---- whole-op argument checks (no data reads) ---------------------------------------------------

// The pattern as every attention op receives it (csrc/ops.cpp): the int list and the optional layout.
struct PatternInputs {
  c10::IntArrayRef args;
  const std::optional<at::Tensor>& layout_crow;
  const std::optional<at::Tensor>& layout_col;
};

struct CheckedArgs {
  AttentionShape shape;
  SparsePattern pattern;      // complete (check_pattern)
  int64_t kv_block_size = 0;  // paged ops
};

inline CheckedArgs check_varlen_prefill_args(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                             const at::Tensor& cu_seqlens_k, const PatternInputs& pattern,
                                             const std::optional<at::Tensor>& lse, bool check_values) {
  CheckedArgs args;
  AttentionShape& shape = args.shape;
  shape = check_query_and_out(out, q);
  check_dim(k, "k", 3, "[num_key_tokens, num_kv_heads, head_size]");
  BSA_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  for (auto* t : {&k, &v}) {
    const char* name = t == &k ? "k" : "v";
    check_same_dtype(*t, name, q, "q");
    check_same_device(*t, name, q, "q");
    check_last_dim_contiguous(*t, name);
  }
  check_size(k, "k", 2, shape.head_size, "head_size of q");
  check_kv_heads(shape, k.size(1), "k");
  check_int_vector(cu_seqlens_q, "cu_seqlens_q", -1, q, "[num_seqs + 1]");
  BSA_CHECK(cu_seqlens_q.numel() >= 1, "cu_seqlens_q must hold at least one entry (0)");
  shape.num_seqs = cu_seqlens_q.numel() - 1;
  check_int_vector(cu_seqlens_k, "cu_seqlens_k", shape.num_seqs + 1, q, "[num_seqs + 1], like cu_seqlens_q");
  check_lse(lse, shape, q);
  args.pattern = check_pattern(shape, pattern.args, pattern.layout_crow, pattern.layout_col, q, check_values);
  return args;
}

// What the paged ops check alike once the batch size is known: block tables, lse, the pattern, and
// the sparse block size against the cache's block size.
inline void check_paged_rest(CheckedArgs& args, const at::Tensor& q, const at::Tensor& block_tables,
                             const std::optional<at::Tensor>& lse, const PatternInputs& pattern, bool check_values) {
  check_size(block_tables, "block_tables", 0, args.shape.num_seqs, "one row per sequence");
  check_lse(lse, args.shape, q);
  args.pattern = check_pattern(args.shape, pattern.args, pattern.layout_crow, pattern.layout_col, q, check_values);
  check_block_size_compatible(args.pattern.block_size, args.kv_block_size);
}

inline CheckedArgs check_paged_prefill_args(const at::Tensor& out, const at::Tensor& q, const at::Tensor& key_cache,
                                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                                            const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens,
                                            const PatternInputs& pattern, const std::optional<at::Tensor>& lse,
                                            const CacheScales& scales, bool check_values) {
  CheckedArgs args;
  AttentionShape& shape = args.shape;
  shape = check_query_and_out(out, q);
  args.kv_block_size = check_paged_cache(shape, key_cache, value_cache, block_tables, q, scales, check_values);
  check_int_vector(cu_seqlens_q, "cu_seqlens_q", -1, q, "[num_seqs + 1]");
  BSA_CHECK(cu_seqlens_q.numel() >= 1, "cu_seqlens_q must hold at least one entry (0)");
  shape.num_seqs = cu_seqlens_q.numel() - 1;
  check_int_vector(seq_lens, "seq_lens", shape.num_seqs, q, "[num_seqs]");
  check_paged_rest(args, q, block_tables, lse, pattern, check_values);
  return args;
}

inline CheckedArgs check_paged_decode_args(const at::Tensor& out, const at::Tensor& q, const at::Tensor& key_cache,
                                           const at::Tensor& value_cache, const at::Tensor& block_tables,
                                           const at::Tensor& seq_lens, const PatternInputs& pattern,
                                           const std::optional<at::Tensor>& lse, const CacheScales& scales,
                                           bool check_values) {
  CheckedArgs args;
  AttentionShape& shape = args.shape;
  shape = check_query_and_out(out, q);
  args.kv_block_size = check_paged_cache(shape, key_cache, value_cache, block_tables, q, scales, check_values);
  shape.num_seqs = shape.num_q_tokens;
  check_int_vector(seq_lens, "seq_lens", shape.num_seqs, q, "[num_seqs], one per query row");
  check_paged_rest(args, q, block_tables, lse, pattern, check_values);
  return args;
}

// ---- checks that read values (host tensors) ------------------------------------------------------

// cu_seqlens: starts at 0, never decreases, ends at num_tokens.
inline void check_cu_seqlens_values(const at::Tensor& cu_seqlens_host, const char* name, int64_t num_tokens) {
  const int32_t* cu = cu_seqlens_host.data_ptr<int32_t>();
  const int64_t n = cu_seqlens_host.numel();
  BSA_CHECK(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
  for (int64_t r = 0; r + 1 < n; ++r)
    BSA_CHECK(cu[r + 1] >= cu[r], name, " must not decrease, got ", name, "[", r, "] = ", cu[r], " > ", name, "[",
                r + 1, "] = ", cu[r + 1]);
  BSA_CHECK(cu[n - 1] == num_tokens, name, "[-1] must equal the number of packed tokens ", num_tokens, ", got ",
              cu[n - 1]);
}

// The paged ops' table values (host tensors), checked by the CPU kernels always and on CUDA under
// BSA_CHECK_INPUTS: every length within what a table row addresses, q_len <= seq_len (prefill:
// cu_seqlens_q; null for decode, one query per row), and every entry of a used page a cache block.
// Per-kv-head tables may hold -1 (a released page), but not where a query of this call reads it:
// pattern must be usable on the host (an explicit layout's pointers at host copies).
inline void check_paged_table_values(const at::Tensor& tables, const at::Tensor& seq_lens, const int32_t* cu_seqlens_q,
                                     int64_t num_blocks, int64_t kv_block_size, const SparsePattern& pattern) {
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const bool per_head = per_kv_head_tables(tables);
  const int64_t num_rows = per_head ? tables.size(1) : 1, max_blocks = tables.size(-1);
  const int64_t capacity = max_blocks * kv_block_size;
  const int64_t b = pattern.block_size;
  for (int64_t r = 0; r < seq_lens.numel(); ++r) {
    BSA_CHECK(lens[r] >= 0, "seq_lens[", r, "] must be >= 0, got ", lens[r]);
    BSA_CHECK(lens[r] <= capacity, "seq_lens[", r, "] = ", lens[r], " exceeds what block_tables can address (",
                max_blocks, " blocks of ", kv_block_size, " = ", capacity, " tokens)");
    const int64_t q_len = cu_seqlens_q ? cu_seqlens_q[r + 1] - cu_seqlens_q[r] : (lens[r] > 0 ? 1 : 0);
    BSA_CHECK(q_len <= lens[r], "sequence ", r, " has ", q_len, " new tokens (cu_seqlens_q) but seq_lens[", r,
                "] = ", lens[r], ": seq_len counts context + new tokens");
    const int64_t used = (lens[r] + kv_block_size - 1) / kv_block_size;
    for (int64_t g = 0; g < num_rows; ++g) {
      const int32_t* row = per_head ? tables[r][g].data_ptr<int32_t>() : tables[r].data_ptr<int32_t>();
      bool released = false;
      for (int64_t m = 0; m < used; ++m) {
        released = released || (per_head && row[m] == -1);
        BSA_CHECK((row[m] >= 0 && row[m] < num_blocks) || (per_head && row[m] == -1), "block_tables[", r, ", ",
                    per_head ? std::to_string(g) + ", " : std::string(), m, "] = ", row[m],
                    " is not a cache block: expected [0, ", num_blocks, ")",
                    per_head ? " or -1 (a released page)" : "");
      }
      if (!released || q_len == 0) continue;
      // Released pages must hold no key this call's queries see: walk the group's heads' visible
      // blocks over the query blocks of the new tokens.
      const int64_t group = pattern.q_heads_per_kv;
      for (int64_t i = (lens[r] - q_len) / b; i <= (lens[r] - 1) / b; ++i)
        for (int64_t h = g * group; h < (g + 1) * group; ++h)
          for_each_visible_run(pattern, static_cast<int>(h), static_cast<int>(i), [&](int j0, int n) {
            const int64_t first = j0 * b / kv_block_size;
            const int64_t last = (std::min<int64_t>((j0 + n) * b, lens[r]) - 1) / kv_block_size;
            for (int64_t m = first; m <= last; ++m)
              BSA_CHECK(row[m] != -1, "block_tables[", r, ", ", g, ", ", m, "] = -1 (a released page), but q head ",
                        h, " reads its keys from query block ", i, " of sequence ", r, " (seq_len ", lens[r],
                        "): release only pages that no later query reads (SparsePattern.pages_read_later)");
          });
    }
  }
}

inline void check_layout_covers(const SparsePattern& p, int64_t max_seq_len) {
  if (!p.has_layout()) return;
  const int64_t needed = (max_seq_len + p.block_size - 1) / p.block_size;
  BSA_CHECK(needed <= p.layout_rows, "the explicit layout describes ", p.layout_rows,
              " query blocks, but a sequence of ", max_seq_len, " tokens needs ", needed, " blocks of ",
              p.block_size);
}

}  // namespace blocksparse_attn
