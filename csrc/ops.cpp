// The schema of every blocksparse_attn op, in one place. Backends register implementations at the
// end of their own files (csrc/cpu/*.cpp, csrc/cuda/*.cpp); fake kernels live in blocksparse_attn/ops.py.
//
// Conventions (shapes are in the comments of each op):
//   T   packed query tokens            Tk  packed key tokens           S   sequences in the batch
//   Hq  query heads                    Hkv key/value heads (Hq % Hkv == 0; q head h reads h / (Hq/Hkv))
//   D   head size (blocksparse_attn/supported.py: 64, 80, 96, 112, 128, 256)
//   NB  KV-cache blocks                kvbs tokens per cache block
// Outputs are passed in (`Tensor(a!) out`) so that the hot path allocates nothing and calls can be
// captured in CUDA graphs. Query positions are absolute: the new tokens of a sequence are its last
// ones, so sequence r's query row x sits at position seq_len_k[r] - seq_len_q[r] + x.
//
// The sparsity of every attention op (spec §2), one bundle:
//   pattern            int[6]: sparse_block_size B (16, 32, 64, 128), local_blocks L >= 1 (the band,
//                      the diagonal block included), vert_stride V >= 1 (V = 1: dense causal),
//                      head_sliding_step s >= 0, slide_by_kv_head (0/1, homo_head_group), head_offset
//                      (global index of this rank's q head 0); written by SparsePattern.op_args and
//                      BlockLayout.op_args (blocksparse_attn/layout.py), read by common/pattern.h
//   layout_crow        optional [Hq, num_q_blocks + 1] int32 row pointers of an explicit block layout
//   layout_col         optional [Hq, max_nnz] int32 ascending key blocks of each row
// With an explicit layout the pattern's L and V are 0: the layout alone decides visibility.
//
// Quantized caches: key_cache / value_cache may hold fp8 (Float8_e4m3fn or Float8_e5m2) instead of
// q's dtype; k_scale / v_scale are then their per-tensor scales, optional float32 [1] tensors on the
// cache's device (stored = fp8(x / scale), read = float(fp8) * scale; absent = 1). A cache in q's
// dtype ignores them.
#include <Python.h>
#include <torch/library.h>

// `import blocksparse_attn._C` loads this library, which runs the registrations below; the module
// itself has no Python functions (every op is reached through torch.ops.blocksparse_attn).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(blocksparse_attn, m) {
  // ---- attention -----------------------------------------------------------------------------
  // Prefill over packed variable-length sequences whose keys and values are contiguous tensors.
  //   out [T, Hq, D], q [T, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_q/k [S + 1] int32,
  //   lse [Hq, T] float32 (natural-log log-sum-exp of each query row), written when given.
  m.def(
      "varlen_prefill(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, float scale, int[] pattern, Tensor? layout_crow, Tensor? layout_col, "
      "Tensor(b!)? lse) -> ()");

  // Prefill (chunked, or with a reused prefix) whose keys and values are all read from the paged
  // cache; the new tokens' k/v must have been written there first (write_kv_cache).
  //   out/q [T, Hq, D], key_cache/value_cache [NB, Hkv, kvbs, D], block_tables [S, max_blocks] int32,
  //   cu_seqlens_q [S + 1] int32, seq_lens [S] int32 (context + new tokens), lse [Hq, T] float32.
  //   Per-kv-head pages: key_cache/value_cache [NB, 1, kvbs, D], block_tables [S, Hkv, max_blocks]
  //   (row [r, g]: kv head g's pages; -1 = a released page, which no query of the call may read).
  m.def(
      "paged_prefill(Tensor(a!) out, Tensor q, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor cu_seqlens_q, Tensor seq_lens, float scale, int[] pattern, "
      "Tensor? layout_crow, Tensor? layout_col, Tensor(b!)? lse, Tensor? k_scale=None, "
      "Tensor? v_scale=None) -> ()");

  // One new token per sequence at position seq_lens[r] - 1, against the paged cache. A sequence
  // with seq_len 0 is padding: its output rows are zero (and its lse -inf).
  //   out/q [S, Hq, D], key_cache/value_cache [NB, Hkv, kvbs, D], block_tables [S, max_blocks] int32
  //   (or per-kv-head pages as paged_prefill), seq_lens [S] int32, lse [Hq, S] float32.
  m.def(
      "paged_decode(Tensor(a!) out, Tensor q, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale, int[] pattern, Tensor? layout_crow, "
      "Tensor? layout_col, Tensor(b!)? lse, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");

  // ---- KV cache ------------------------------------------------------------------------------
  // Writes token t's key/value to cache slot slot_mapping[t] = block * kvbs + offset; negative
  // slots are skipped, a slot >= NB * kvbs is an error raised before anything is written.
  //   key/value [T, Hkv, D] (any strides with a unit last stride, e.g. views of a fused QKV),
  //   key_cache/value_cache [NB, Hkv, kvbs, D] (key's dtype, or fp8: quantized with k_scale / v_scale),
  //   slot_mapping [T] int64; per-kv-head pages: key_cache/value_cache [NB, 1, kvbs, D] and
  //   slot_mapping [T, Hkv] (kv head h of token t to slot_mapping[t, h]).
  m.def(
      "write_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");

  // In every cache of the list, copies block src to block dst in both halves (copy-on-write).
  //   kv_caches: each [2, NB, ...] on one device, block_mapping [N, 2] int64 (src, dst).
  // The pairs are copied concurrently on CUDA (in order on the CPU): a block that is the destination of
  // one pair must not be the source of another (engines never chain copy-on-write copies).
  m.def("copy_blocks(Tensor(a!)[] kv_caches, Tensor block_mapping) -> ()");

  // Copies blocks between two caches that may live on different devices (swap in / swap out).
  //   src_kv_cache [2, NB_src, ...], dst_kv_cache [2, NB_dst, ...] of the same dtype and block shape,
  //   block_mapping [N, 2] int64 on the CPU (src block, dst block).
  m.def("swap_blocks(Tensor src_kv_cache, Tensor(a!) dst_kv_cache, Tensor block_mapping) -> ()");

  // ---- the pattern as the kernels walk it ----------------------------------------------------------
  // Dense bool [Hq, num_q_blocks, num_q_blocks]: key block j is visible to query block i of head h,
  // as common/pattern.h enumerates it (CPU only; tests hold it against layout.py and the reference).
  // rows_per_walk: 1, 2 or 4 query blocks per VisibleBlocks walk (the kernels' tile spans), or 0 for
  // the decode kernel's closed form over each kv group's heads.
  m.def(
      "pattern_block_mask(int[] pattern, Tensor? layout_crow, Tensor? layout_col, int num_q_heads, "
      "int num_kv_heads, int num_q_blocks, int rows_per_walk) -> Tensor");
}
