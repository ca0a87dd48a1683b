"""Typed wrappers over torch.ops.blocksparse_attn.* and their fake (meta) kernels.

The schemas are declared in csrc/ops.cpp. These wrappers only allocate outputs and unpack a
`SparsePattern` / `BlockLayout` into the ops' sparsity arguments; all checks happen in C++.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library that registers the ops)
from .layout import Pattern

_ops = torch.ops.blocksparse_attn


def _maybe_lse(q: torch.Tensor, return_lse: bool) -> torch.Tensor | None:
    return q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32) if return_lse else None


def varlen_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, scale: float, pattern: Pattern, *,
                   out=None, return_lse: bool = False):
    """Block-sparse causal attention over packed sequences with contiguous keys/values.

    q [T, Hq, D]; k, v [Tk, Hkv, D]; cu_seqlens_q/k [S + 1] int32. Sequence r's queries are its last
    cu_seqlens_q[r+1] - cu_seqlens_q[r] positions. Returns out [T, Hq, D] (and lse [Hq, T] float32).
    """
    out = torch.empty_like(q) if out is None else out
    lse = _maybe_lse(q, return_lse)
    _ops.varlen_prefill(out, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, *pattern.op_args(), lse)
    return (out, lse) if return_lse else out


def paged_prefill(q, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, scale: float,
                  pattern: Pattern, *, out=None, return_lse: bool = False, k_scale=None, v_scale=None):
    """Prefill whose keys/values (context and new tokens) are read from the paged cache.

    q [T, Hq, D]; key_cache/value_cache [NB, Hkv, kvbs, D] in q's dtype or fp8 (then read as
    float(stored) * k_scale / v_scale, float32 [1] tensors on the cache's device, absent = 1);
    block_tables [S, max_blocks] int32; cu_seqlens_q [S + 1] int32; seq_lens [S] int32.
    Per-kv-head pages: caches [NB, 1, kvbs, D] and block_tables [S, Hkv, max_blocks] (kv head g of
    sequence r reads its pages from row [r, g]); an entry -1 is a page the engine released
    (SparsePattern.pages_read_later), which no query of the call may see (checked where values are).
    Returns out [T, Hq, D] (and lse [Hq, T]).
    """
    out = torch.empty_like(q) if out is None else out
    lse = _maybe_lse(q, return_lse)
    _ops.paged_prefill(out, q, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                       *pattern.op_args(), lse, k_scale, v_scale)
    return (out, lse) if return_lse else out


def paged_decode(q, key_cache, value_cache, block_tables, seq_lens, scale: float, pattern: Pattern, *,
                 out=None, return_lse: bool = False, k_scale=None, v_scale=None):
    """One query token per sequence (at position seq_lens[r] - 1) against the paged cache.

    q [S, Hq, D]; key_cache/value_cache [NB, Hkv, kvbs, D] (q's dtype, or fp8 with k_scale / v_scale
    as in paged_prefill); block_tables [S, max_blocks] int32, or per-kv-head pages as in paged_prefill;
    seq_lens [S] int32 (0 = padding row, answered with zeros). Returns out [S, Hq, D] (and lse [Hq, S]).
    """
    out = torch.empty_like(q) if out is None else out
    lse = _maybe_lse(q, return_lse)
    _ops.paged_decode(out, q, key_cache, value_cache, block_tables, seq_lens, scale, *pattern.op_args(), lse,
                      k_scale, v_scale)
    return (out, lse) if return_lse else out


def write_kv_cache(key, value, key_cache, value_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """key/value [T, Hkv, D] into key_cache/value_cache [NB, Hkv, kvbs, D] at slot_mapping [T] int64
    (slot = block * kvbs + offset; negative slots are skipped); per-kv-head pages: caches [NB, 1, kvbs, D]
    and slot_mapping [T, Hkv], kv head h of token t at slot_mapping[t, h]. An fp8 cache stores
    fp8(x / scale), rounded to nearest even and saturated (k_scale / v_scale: float32 [1] tensors on
    the cache's device, absent = 1)."""
    _ops.write_kv_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def copy_blocks(kv_caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """In each cache [2, NB, ...] copy block src to dst (block_mapping [N, 2] int64) in both halves."""
    _ops.copy_blocks(kv_caches, block_mapping)


def swap_blocks(src_kv_cache, dst_kv_cache, block_mapping) -> None:
    """Copy blocks between caches [2, NB, ...], possibly on different devices (block_mapping [N, 2])."""
    _ops.swap_blocks(src_kv_cache, dst_kv_cache, block_mapping)


def pattern_block_mask(pattern: Pattern, num_heads: int, num_q_blocks: int, num_kv_heads: int | None = None,
                       rows_per_walk: int = 1) -> torch.Tensor:
    """The pattern's visible blocks as the kernels enumerate them (csrc/common/pattern.h): bool
    [num_heads, num_q_blocks, num_q_blocks]. rows_per_walk: query blocks per walk (1, 2 or 4, as the
    kernels' tiles span them) or 0 for the decode kernel's closed form over each kv group's heads."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    return _ops.pattern_block_mask(*pattern.op_args(), num_heads, num_kv_heads, num_q_blocks, rows_per_walk)


# ---- fake kernels ----------------------------------------------------------------------------------------
# The ops that write into tensors they are given return nothing, so their fakes take the schema's
# arguments as one bundle: they cannot drift from csrc/ops.cpp.

for _name in ("varlen_prefill", "paged_prefill", "paged_decode", "write_kv_cache", "copy_blocks", "swap_blocks"):
    torch.library.register_fake(f"blocksparse_attn::{_name}")(lambda *args, **kwargs: None)


@torch.library.register_fake("blocksparse_attn::pattern_block_mask")
def _(pattern, layout_crow, layout_col, num_q_heads, num_kv_heads, num_q_blocks, rows_per_walk):
    return torch.empty((num_q_heads, num_q_blocks, num_q_blocks), dtype=torch.bool)
