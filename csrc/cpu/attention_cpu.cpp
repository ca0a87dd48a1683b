// CPU kernels of the attention ops: varlen_prefill, paged_prefill, paged_decode.
//
// The work unit is one (sequence, q head, query block): its visible key blocks come from the shared
// pattern enumeration (common/pattern.h) as runs of consecutive blocks. Long runs (the local band)
// are used in place; short runs (vertical columns) are gathered into one buffer, so each unit costs
// at most a few BLAS calls. All arithmetic is float32: inputs are converted once per sequence.
// Work units of one sequence run in parallel (cpu/parallel.h: at::parallel_for with the caller's
// thread-local state, so inference mode holds in every worker); the per-unit ATen calls then run
// single-threaded, which is what we want for small matrices. Decode has its own path
// (decode_sequence): one query row per sequence makes the q heads of a kv group the unit instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common/attention_args.h"
#include "common/pattern.h"
#include "cpu/parallel.h"

namespace blocksparse_attn {
namespace {

// Runs of at least this many keys are used in place; shorter ones are gathered.
constexpr int64_t kMinInPlaceRunTokens = 128;

// One sequence's keys and values in float32, head-major [Hkv, len, D], and where its queries are.
struct SequenceInputs {
  at::Tensor key;    // [Hkv, len, D] float32
  at::Tensor value;  // [Hkv, len, D] float32
  int64_t len = 0;           // keys of the sequence (= its current length)
  int64_t q_start = 0;       // first packed query row of the sequence
  int64_t q_len = 0;         // its new tokens, at positions len - q_len ... len - 1
};

struct KeyRange {
  int64_t begin, end;  // key positions [begin, end)
};

// Attention of the query rows of one sequence, head h, query block i.
//   q_scaled [T, Hq, D] float32 (already multiplied by scale), out [T, Hq, D] (any float dtype),
//   lse [Hq, T] float32 or undefined.
void attend_query_block(const SparsePattern& pattern, const SequenceInputs& seq, int64_t h, int64_t i,
                        const at::Tensor& q_scaled, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t b = pattern.block_size;
  const int64_t first_pos = seq.len - seq.q_len;
  const int64_t pos_begin = std::max(i * b, first_pos);
  const int64_t pos_end = std::min((i + 1) * b, seq.len);
  if (pos_begin >= pos_end) return;
  const int64_t rows = pos_end - pos_begin;
  const int64_t row0 = seq.q_start + (pos_begin - first_pos);
  const int64_t kv_head = h / pattern.q_heads_per_kv;

  std::vector<KeyRange> runs;
  for_each_visible_run(pattern, static_cast<int>(h), static_cast<int>(i), [&](int first_block, int num_blocks) {
    runs.push_back({first_block * b, std::min<int64_t>((first_block + num_blocks) * b, seq.len)});
  });

  at::Tensor out_rows = out.select(1, h).narrow(0, row0, rows);  // [rows, D]
  if (runs.empty()) {  // only an explicit layout can leave a row with nothing to see
    out_rows.zero_();
    if (lse.defined()) lse.select(0, h).narrow(0, row0, rows).fill_(-std::numeric_limits<float>::infinity());
    return;
  }

  // Segments of keys in the order their scores are laid out: the run holding the diagonal block (the
  // last run) must come last, so its causal mask is on the last columns.
  const at::Tensor keys = seq.key[kv_head];
  const at::Tensor values = seq.value[kv_head];
  std::vector<at::Tensor> short_keys, short_values;
  std::vector<std::pair<at::Tensor, at::Tensor>> segments;
  for (const KeyRange& run : runs) {
    const int64_t n = run.end - run.begin;
    if (n >= kMinInPlaceRunTokens) {
      segments.emplace_back(keys.narrow(0, run.begin, n), values.narrow(0, run.begin, n));
    } else {
      short_keys.push_back(keys.narrow(0, run.begin, n));
      short_values.push_back(values.narrow(0, run.begin, n));
    }
  }
  if (!short_keys.empty()) {
    auto gathered = std::make_pair(at::cat(short_keys), at::cat(short_values));
    const bool last_run_is_short = runs.back().end - runs.back().begin < kMinInPlaceRunTokens;
    if (last_run_is_short)
      segments.push_back(std::move(gathered));
    else
      segments.insert(segments.begin(), std::move(gathered));
  }

  int64_t num_keys = 0;
  for (const auto& s : segments) num_keys += s.first.size(0);
  const at::Tensor q_rows = q_scaled.select(1, h).narrow(0, row0, rows);  // [rows, D]
  at::Tensor scores = at::empty({rows, num_keys}, q_scaled.options());
  int64_t col = 0;
  for (const auto& s : segments) {
    at::Tensor dst = scores.narrow(1, col, s.first.size(0));
    at::mm_out(dst, q_rows, s.first.t());
    col += s.first.size(0);
  }

  // Causal cut of the diagonal block: key position t > query position p is masked. Only keys of
  // block i can lie after a query of block i, and they are the last columns.
  if (runs.back().end > i * b) {
    const int64_t diag_keys = runs.back().end - i * b;
    float* s = scores.data_ptr<float>();
    for (int64_t x = 0; x < rows; ++x) {
      const int64_t p = pos_begin + x;
      for (int64_t u = 0; u < diag_keys; ++u)
        if (i * b + u > p) s[x * num_keys + (num_keys - diag_keys) + u] = -std::numeric_limits<float>::infinity();
    }
  }

  // Softmax over all visible keys at once (every row sees at least its own key, so max is finite
  // unless the inputs hold inf/NaN, which then propagate as in dense attention).
  at::Tensor row_max = scores.amax(1, /*keepdim=*/true);
  scores.sub_(row_max).exp_();
  at::Tensor row_sum = scores.sum(1, /*keepdim=*/true);
  at::Tensor acc = at::empty({rows, keys.size(1)}, q_scaled.options());
  col = 0;
  bool first = true;
  for (const auto& s : segments) {
    const int64_t n = s.first.size(0);
    if (first)
      at::mm_out(acc, scores.narrow(1, col, n), s.second);
    else
      acc.addmm_(scores.narrow(1, col, n), s.second);
    first = false;
    col += n;
  }
  acc.div_(row_sum);
  out_rows.copy_(acc);
  if (lse.defined()) lse.select(0, h).narrow(0, row0, rows).copy_((row_max + row_sum.log()).squeeze(1));
}

void attend_sequence(const SparsePattern& pattern, const SequenceInputs& seq, const at::Tensor& q_scaled,
                     const at::Tensor& out, const at::Tensor& lse) {
  if (seq.q_len == 0) return;
  const int64_t b = pattern.block_size;
  const int64_t first_block = (seq.len - seq.q_len) / b;
  const int64_t num_blocks = (seq.len - 1) / b + 1 - first_block;
  const int64_t num_heads = q_scaled.size(1);
  parallel_for_with_caller_state(0, num_heads * num_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit)
      attend_query_block(pattern, seq, unit / num_blocks, first_block + unit % num_blocks, q_scaled, out, lse);
  });
}

at::Tensor scaled_float_queries(const at::Tensor& q, double scale) {
  return q.to(at::kFloat).mul(scale);  // out of place: for float32 q, to() returns q itself
}

at::Tensor lse_or_undefined(const std::optional<at::Tensor>& lse) { return lse ? *lse : at::Tensor(); }

// [len, Hkv, D] contiguous-source keys -> [Hkv, len, D] float32.
at::Tensor head_major_float(const at::Tensor& tokens) { return tokens.to(at::kFloat).transpose(0, 1).contiguous(); }

// The scale a cache's values are read with: float(stored) * scale for fp8, 1 otherwise.
float read_scale(const at::Tensor& cache, const std::optional<at::Tensor>& scale) {
  return is_fp8(cache.scalar_type()) && scale ? scale->item<float>() : 1.f;
}

// Stored cache elements (any dtype; fp8 dequantized) as float32.
at::Tensor dequantize(const at::Tensor& stored, float scale) {
  at::Tensor x = stored.to(at::kFloat);
  return scale == 1.f ? x : x.mul_(scale);
}

// Gathers from a cache through `gather` (index_select, index, ...) on its bytes when it holds fp8: older
// torch CPU builds (2.7, what vLLM 0.9 pins) have no indexing kernels for the fp8 dtypes.
template <typename Gather>
at::Tensor gather_stored(const at::Tensor& cache, Gather gather) {
  if (!is_fp8(cache.scalar_type())) return gather(cache);
  return gather(cache.view(at::kByte)).view(cache.scalar_type());
}

// One sequence's rows of the block tables: [max_blocks] (shared pages: every kv head reads it) or
// [Hkv, max_blocks] (per-kv-head pages, kv head g reads row g); see common/attention_args.h.
struct SequenceTable {
  const int32_t* rows;
  int64_t head_stride;  // 0 for shared pages
  const int32_t* row(int64_t kv_head) const { return rows + kv_head * head_stride; }
};

SequenceTable sequence_table(const at::Tensor& block_tables, int64_t r) {
  return {block_tables[r].data_ptr<int32_t>(), per_kv_head_tables(block_tables) ? block_tables.stride(1) : 0};
}

// The first `len` keys (or values) of a sequence from a paged cache [NB, Hc, kvbs, D] -> [Hkv, len, D]:
// Hc = Hkv pages of every kv head, or Hc = 1 with a table row per kv head. A released page (-1) reads
// as zeros: no query of the call reads it (check_paged_table_values).
at::Tensor gather_paged(const at::Tensor& cache, float scale, const SequenceTable& table, int64_t num_kv_heads,
                        int64_t len) {
  const int64_t kvbs = cache.size(2), d = cache.size(3), num_pages = (len + kvbs - 1) / kvbs;
  if (table.head_stride == 0) {
    const at::Tensor page_ids = at::from_blob(const_cast<int32_t*>(table.rows), {num_pages}, at::kInt).to(at::kLong);
    at::Tensor pages = gather_stored(cache, [&](const at::Tensor& c) { return c.index_select(0, page_ids); });
    return dequantize(pages, scale).permute({1, 0, 2, 3}).reshape({num_kv_heads, num_pages * kvbs, d})
        .narrow(1, 0, len).contiguous();
  }
  const at::Tensor ids = at::from_blob(const_cast<int32_t*>(table.rows), {num_kv_heads, num_pages},
                                       {table.head_stride, 1}, at::kInt).to(at::kLong);  // [Hkv, pages]
  const at::Tensor released = ids.lt(0);
  const at::Tensor flat = ids.clamp_min(0).flatten();
  at::Tensor pages = gather_stored(cache, [&](const at::Tensor& c) { return c.index_select(0, flat); });
  pages = dequantize(pages, scale).view({num_kv_heads, num_pages, kvbs, d});
  if (released.any().item<bool>()) pages.masked_fill_(released.view({num_kv_heads, num_pages, 1, 1}), 0.f);
  return pages.reshape({num_kv_heads, num_pages * kvbs, d}).narrow(1, 0, len).contiguous();
}

// Decode of one sequence: its single query (position len - 1, query block i) for every q head. Per
// kv head, the keys of the union of key blocks that the group's q heads see are gathered once, only
// those pages are read, and the group's heads are answered by one GEMM pair, with a per-head mask
// on the blocks a head does not see (Phi-3-small: 4 heads, 4 different vertical residues).
void decode_sequence(const SparsePattern& pattern, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     float k_scale, float v_scale, const SequenceTable& table, int64_t num_kv_heads, int64_t len,
                     int64_t row,
                     const at::Tensor& q_scaled, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t b = pattern.block_size, kvbs = key_cache.size(2), group = pattern.q_heads_per_kv;
  const int64_t i = (len - 1) / b;
  const int64_t cache_heads = key_cache.size(1);  // Hkv, or 1 for per-kv-head pages
  for (int64_t g = 0; g < num_kv_heads; ++g) {
    const int32_t* block_table_row = table.row(g);
    std::vector<std::vector<char>> head_sees(group, std::vector<char>(i + 1, 0));
    std::vector<char> group_sees(i + 1, 0);
    for (int64_t hh = 0; hh < group; ++hh)
      for_each_visible_run(pattern, static_cast<int>(g * group + hh), static_cast<int>(i), [&](int j0, int n) {
        for (int j = j0; j < j0 + n; ++j) head_sees[hh][j] = group_sees[j] = 1;
      });
    std::vector<int64_t> pages, offsets, token_block;
    for (int64_t j = 0; j <= i; ++j) {
      if (!group_sees[j]) continue;
      for (int64_t t = j * b; t < std::min((j + 1) * b, len); ++t) {
        pages.push_back(block_table_row[t / kvbs]);
        offsets.push_back(t % kvbs);
        token_block.push_back(j);
      }
    }
    at::Tensor out_rows = out[row].narrow(0, g * group, group);  // [group, D]
    const int64_t n = static_cast<int64_t>(pages.size());
    if (n == 0) {  // only an explicit layout can leave a query with nothing to see
      out_rows.zero_();
      if (lse.defined()) lse.select(1, row).narrow(0, g * group, group).fill_(-std::numeric_limits<float>::infinity());
      continue;
    }
    const at::Tensor page_idx = at::tensor(pages, at::kLong), offset_idx = at::tensor(offsets, at::kLong);
    auto rows = [&](const at::Tensor& c) { return c.select(1, cache_heads == 1 ? 0 : g).index({page_idx, offset_idx}); };
    const at::Tensor keys = dequantize(gather_stored(key_cache, rows), k_scale);      // [n, D]
    const at::Tensor values = dequantize(gather_stored(value_cache, rows), v_scale);  // [n, D]
    at::Tensor scores = at::mm(q_scaled[row].narrow(0, g * group, group), keys.t());  // [group, n]
    float* sc = scores.data_ptr<float>();
    std::vector<char> sees_any(group, 0);
    for (int64_t hh = 0; hh < group; ++hh)
      for (int64_t c = 0; c < n; ++c) {
        if (head_sees[hh][token_block[c]])
          sees_any[hh] = 1;
        else
          sc[hh * n + c] = -std::numeric_limits<float>::infinity();
      }
    const at::Tensor row_max = scores.amax(1, /*keepdim=*/true);
    scores.sub_(row_max).exp_();
    const at::Tensor row_sum = scores.sum(1, /*keepdim=*/true);
    out_rows.copy_(at::mm(scores, values).div_(row_sum));
    at::Tensor head_lse = (row_max + row_sum.log()).squeeze(1);
    for (int64_t hh = 0; hh < group; ++hh) {
      if (sees_any[hh]) continue;
      out_rows[hh].zero_();
      head_lse[hh] = -std::numeric_limits<float>::infinity();
    }
    if (lse.defined()) lse.select(1, row).narrow(0, g * group, group).copy_(head_lse);
  }
}

void varlen_prefill_cpu(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, double scale,
                        c10::IntArrayRef pattern, const std::optional<at::Tensor>& layout_crow,
                        const std::optional<at::Tensor>& layout_col, const std::optional<at::Tensor>& lse) {
  const CheckedArgs args = check_varlen_prefill_args(out, q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                     {pattern, layout_crow, layout_col}, lse, /*check_values=*/true);
  const AttentionShape& shape = args.shape;
  const SparsePattern& p = args.pattern;

  check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", shape.num_q_tokens);
  check_cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", k.size(0));
  const int32_t* cu_q = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* cu_k = cu_seqlens_k.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t r = 0; r < shape.num_seqs; ++r) {
    const int64_t q_len = cu_q[r + 1] - cu_q[r], k_len = cu_k[r + 1] - cu_k[r];
    BSA_CHECK(q_len <= k_len, "sequence ", r, " has ", q_len, " queries (cu_seqlens_q) but only ", k_len,
                " keys (cu_seqlens_k): queries are the last positions of their sequence, so q_len <= k_len");
    max_len = std::max(max_len, k_len);
  }
  check_layout_covers(p, max_len);

  const at::Tensor q_scaled = scaled_float_queries(q, scale);
  const at::Tensor lse_t = lse_or_undefined(lse);
  for (int64_t r = 0; r < shape.num_seqs; ++r) {
    SequenceInputs seq;
    seq.len = cu_k[r + 1] - cu_k[r];
    seq.q_start = cu_q[r];
    seq.q_len = cu_q[r + 1] - cu_q[r];
    if (seq.q_len == 0) continue;
    seq.key = head_major_float(k.narrow(0, cu_k[r], seq.len));
    seq.value = head_major_float(v.narrow(0, cu_k[r], seq.len));
    attend_sequence(p, seq, q_scaled, out, lse_t);
  }
}

void paged_prefill_cpu(const at::Tensor& out, const at::Tensor& q, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q,
                       const at::Tensor& seq_lens, double scale, c10::IntArrayRef pattern,
                       const std::optional<at::Tensor>& layout_crow, const std::optional<at::Tensor>& layout_col,
                       const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& k_scale,
                       const std::optional<at::Tensor>& v_scale) {
  const CheckedArgs args = check_paged_prefill_args(out, q, key_cache, value_cache, block_tables, cu_seqlens_q,
                                                    seq_lens, {pattern, layout_crow, layout_col}, lse,
                                                    {k_scale, v_scale}, /*check_values=*/true);
  const AttentionShape& shape = args.shape;
  const SparsePattern& p = args.pattern;
  const int64_t kv_block_size = args.kv_block_size;
  const float key_scale = read_scale(key_cache, k_scale), value_scale = read_scale(value_cache, v_scale);

  check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", shape.num_q_tokens);
  const int32_t* cu_q = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t r = 0; r < shape.num_seqs; ++r) max_len = std::max<int64_t>(max_len, lens[r]);
  check_layout_covers(p, max_len);
  check_paged_table_values(block_tables, seq_lens, cu_q, key_cache.size(0), kv_block_size, p);

  const at::Tensor q_scaled = scaled_float_queries(q, scale);
  const at::Tensor lse_t = lse_or_undefined(lse);
  for (int64_t r = 0; r < shape.num_seqs; ++r) {
    SequenceInputs seq;
    seq.len = lens[r];
    seq.q_start = cu_q[r];
    seq.q_len = cu_q[r + 1] - cu_q[r];
    if (seq.q_len == 0) continue;
    const SequenceTable table = sequence_table(block_tables, r);
    seq.key = gather_paged(key_cache, key_scale, table, shape.num_kv_heads, seq.len);
    seq.value = gather_paged(value_cache, value_scale, table, shape.num_kv_heads, seq.len);
    attend_sequence(p, seq, q_scaled, out, lse_t);
  }
}

void paged_decode_cpu(const at::Tensor& out, const at::Tensor& q, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                      double scale, c10::IntArrayRef pattern, const std::optional<at::Tensor>& layout_crow,
                      const std::optional<at::Tensor>& layout_col, const std::optional<at::Tensor>& lse,
                      const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const CheckedArgs args = check_paged_decode_args(out, q, key_cache, value_cache, block_tables, seq_lens,
                                                   {pattern, layout_crow, layout_col}, lse, {k_scale, v_scale},
                                                   /*check_values=*/true);
  const AttentionShape& shape = args.shape;
  const SparsePattern& p = args.pattern;
  const int64_t kv_block_size = args.kv_block_size;
  const float key_scale = read_scale(key_cache, k_scale), value_scale = read_scale(value_cache, v_scale);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t r = 0; r < shape.num_seqs; ++r) max_len = std::max<int64_t>(max_len, lens[r]);
  check_layout_covers(p, max_len);
  check_paged_table_values(block_tables, seq_lens, nullptr, key_cache.size(0), kv_block_size, p);

  const at::Tensor q_scaled = scaled_float_queries(q, scale);
  const at::Tensor lse_t = lse_or_undefined(lse);
  // One decode row is little work, so the threads take whole sequences: one parallel region per call.
  parallel_for_with_caller_state(0, shape.num_seqs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (lens[r] == 0) {  // padding row (e.g. a CUDA-graph batch padded to a captured size)
        out[r].zero_();
        if (lse_t.defined()) lse_t.select(1, r).fill_(-std::numeric_limits<float>::infinity());
        continue;
      }
      decode_sequence(p, key_cache, value_cache, key_scale, value_scale, sequence_table(block_tables, r),
                      shape.num_kv_heads, lens[r], r, q_scaled, out, lse_t);
    }
  });
}

}  // namespace
}  // namespace blocksparse_attn

TORCH_LIBRARY_IMPL(blocksparse_attn, CPU, m) {
  m.impl("varlen_prefill", &blocksparse_attn::varlen_prefill_cpu);
  m.impl("paged_prefill", &blocksparse_attn::paged_prefill_cpu);
  m.impl("paged_decode", &blocksparse_attn::paged_decode_cpu);
}
