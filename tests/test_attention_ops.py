"""The attention ops (varlen_prefill, paged_prefill, paged_decode) against blocksparse_attn.reference.

Each case draws fresh seeded inputs in the tested dtype, computes the float32 reference from those
same inputs, NaN-poisons out and lse, runs the op and compares both (tests/_helpers.py). Paged caches
hold each sequence in shuffled physical blocks, and every slot no sequence owns is NaN, so a kernel
that reads a wrong block or past a sequence's end fails. Where a case claims to test sparsity, it
asserts that the reference mask really skips causal keys there.
"""
from __future__ import annotations

import pytest
import torch

from _helpers import (
    DTYPE_IDS, HEAD_MODES, assert_close_to_ref, assert_lse_close, assert_pattern_is_sparse, assert_unseen_rows_zero,
    build_paged_cache, cu_seqlens, make_pattern, one_thread, poison, random_block_mask, randn, skip_unsupported,
)
from blocksparse_attn import ops, reference
from blocksparse_attn.layout import BlockLayout, SparsePattern

_ops = torch.ops.blocksparse_attn

# ---- the axes (STYLE rule 12) ----------------------------------------------------------------------
HEAD_DIMS = (64, 80, 96, 112, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATTERN_DTYPES = (torch.float32, torch.bfloat16)  # pattern sweeps: near-exact fp32 + the coarsest type
SPARSE_BLOCK_SIZES = (16, 32, 64)
KV_BLOCK_SIZES = (16, 32, 64)
GQA = ((2, 2), (8, 2), (4, 1))  # (Hq, Hkv): Hq/Hkv = 1, 4 and Hq (MQA)
MODES = tuple(HEAD_MODES)  # homo_head, q-head sliding, slide_by_kv_head, and both with tp head offsets
LOCAL, VERT = 2, 3  # a small pattern, sparse from (L + 1) * B tokens on
DECODE_LENGTHS = (1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 500, 1024, 2999, 3072)

dtype_ids = DTYPE_IDS.get
gqa_ids = [f"Hq{hq}-Hkv{hkv}" for hq, hkv in GQA]


def long_len(block_size: int) -> int:
    """A length well past L * B, where every head of the small pattern skips some causal keys."""
    return (LOCAL + VERT + 1) * block_size + 5


def op_args(pattern, device) -> tuple:
    return (pattern.to(device) if isinstance(pattern, BlockLayout) else pattern).op_args()


def describe(pattern) -> str:
    if isinstance(pattern, BlockLayout):
        return f"BlockLayout(B={pattern.block_size}, heads={pattern.num_heads}, rows={pattern.num_q_blocks})"
    return repr(pattern)


# ---- runners: inputs -> reference -> poisoned op run -> comparison -------------------------------------

def kv_views(k, v, layout, device):
    """k and v on `device` as `layout`: "contiguous"; "head_major", views of [Hkv, T, D] storage (each
    head's rows contiguous, as in a page); "fused", views of [T, Hkv, 3, D] (k, v, then NaN: a fused
    projection's row stride, where a read past a row's own D elements brings the other tensor's values
    or NaN)."""
    if layout == "contiguous":
        return k.to(device), v.to(device)
    if layout == "head_major":
        return tuple(x.transpose(0, 1).contiguous().to(device).transpose(0, 1) for x in (k, v))
    assert layout == "fused", layout
    fused = torch.full((*k.shape[:2], 3, k.shape[2]), float("nan"), dtype=k.dtype)
    fused[:, :, 0], fused[:, :, 1] = k, v
    fused = fused.to(device)
    return fused[:, :, 0], fused[:, :, 1]


def run_varlen(device, dtype, hq, hkv, d, seqs, pattern, gen, scale=None, kv_layout="contiguous", key_scale=None):
    """seqs: [(q_len, k_len)]; the queries are each sequence's last q_len positions; kv_layout: how k
    and v are stored (kv_views); key_scale: a function of a key's position in its sequence (a
    float32 tensor of them) giving the factor its row of k is multiplied by."""
    q_lens, k_lens = [s[0] for s in seqs], [s[1] for s in seqs]
    q = randn((sum(q_lens), hq, d), dtype, gen)
    k, v = randn((sum(k_lens), hkv, d), dtype, gen), randn((sum(k_lens), hkv, d), dtype, gen)
    if key_scale is not None:
        pos = torch.cat([torch.arange(n, dtype=torch.float32) for n in k_lens])
        k = (k.float() * key_scale(pos)[:, None, None]).to(dtype)
    cu_q, cu_k = cu_seqlens(q_lens, "cpu"), cu_seqlens(k_lens, "cpu")
    scale = d ** -0.5 if scale is None else scale
    config = (f"varlen_prefill {device} {dtype_ids(dtype)} D={d} Hq={hq} Hkv={hkv} seqs={seqs} {describe(pattern)} "
              f"k/v {kv_layout}")
    with one_thread():
        ref_out, ref_lse = reference.varlen_prefill_ref(q, k, v, cu_q, cu_k, scale, pattern)
    out = poison(torch.empty(q.shape, dtype=dtype, device=device))
    lse = poison(torch.empty(hq, q.shape[0], dtype=torch.float32, device=device))
    k_dev, v_dev = kv_views(k, v, kv_layout, device)
    _ops.varlen_prefill(out, q.to(device), k_dev, v_dev, cu_q.to(device), cu_k.to(device), scale,
                        *op_args(pattern, device), lse)
    assert_close_to_ref(out, ref_out, dtype, config)
    assert_lse_close(lse, ref_lse, dtype, config)
    assert_unseen_rows_zero(out, ref_lse, config)
    return out, lse, ref_lse


def run_paged_prefill(device, dtype, hq, hkv, d, kvbs, seqs, pattern, gen, scale=None):
    """seqs: [(context_len, query_len)]; the cache holds all context_len + query_len keys of each."""
    seq_lens = [c + n for c, n in seqs]
    q_lens = [n for _, n in seqs]
    q = randn((sum(q_lens), hq, d), dtype, gen)
    keys = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
    values = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
    key_cache, value_cache, block_tables = build_paged_cache(keys, values, kvbs, gen, device)
    scale = d ** -0.5 if scale is None else scale
    config = (f"paged_prefill {device} {dtype_ids(dtype)} D={d} Hq={hq} Hkv={hkv} kvbs={kvbs} "
              f"(context, new)={seqs} {describe(pattern)}")
    # reference from the contiguous keys: independent of how the cache was filled
    with one_thread():
        ref_out, ref_lse = reference.varlen_prefill_ref(q, torch.cat(keys), torch.cat(values),
                                                        cu_seqlens(q_lens, "cpu"), cu_seqlens(seq_lens, "cpu"), scale,
                                                        pattern)
    out = poison(torch.empty(q.shape, dtype=dtype, device=device))
    lse = poison(torch.empty(hq, q.shape[0], dtype=torch.float32, device=device))
    _ops.paged_prefill(out, q.to(device), key_cache, value_cache, block_tables, cu_seqlens(q_lens, device),
                       torch.tensor(seq_lens, dtype=torch.int32, device=device), scale, *op_args(pattern, device), lse)
    assert_close_to_ref(out, ref_out, dtype, config)
    assert_lse_close(lse, ref_lse, dtype, config)
    assert_unseen_rows_zero(out, ref_lse, config)
    return out, lse, ref_lse


def run_paged_decode(device, dtype, hq, hkv, d, kvbs, seq_lens, pattern, gen, scale=None):
    """One query per sequence at position seq_len - 1; seq_len 0 is a padding row (out 0, lse -inf)."""
    q = randn((len(seq_lens), hq, d), dtype, gen)
    keys = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
    values = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
    key_cache, value_cache, block_tables = build_paged_cache(keys, values, kvbs, gen, device)
    scale = d ** -0.5 if scale is None else scale
    config = (f"paged_decode {device} {dtype_ids(dtype)} D={d} Hq={hq} Hkv={hkv} kvbs={kvbs} seq_lens={seq_lens} "
              f"{describe(pattern)}")
    ref_out = torch.zeros(q.shape)
    ref_lse = torch.full((hq, len(seq_lens)), float("-inf"))
    with one_thread():
        for r, n in enumerate(seq_lens):
            if n:
                o, l = reference.attention_ref(q[r: r + 1], keys[r], values[r], scale, pattern)
                ref_out[r], ref_lse[:, r] = o[0], l[:, 0]
    out = poison(torch.empty(q.shape, dtype=dtype, device=device))
    lse = poison(torch.empty(hq, len(seq_lens), dtype=torch.float32, device=device))
    _ops.paged_decode(out, q.to(device), key_cache, value_cache, block_tables,
                      torch.tensor(seq_lens, dtype=torch.int32, device=device), scale, *op_args(pattern, device), lse)
    assert_close_to_ref(out, ref_out, dtype, config)
    assert_lse_close(lse, ref_lse, dtype, config)
    assert_unseen_rows_zero(out, ref_lse, config)
    return out, lse, ref_lse


def edge_lengths(block_size: int) -> list[int]:
    return [1, block_size - 1, block_size, block_size + 1, long_len(block_size)]


# ---- varlen_prefill --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_varlen_prefill_head_dims(device, dtype, head_dim, gen):
    skip_unsupported(device, dtype)
    b = 16
    pattern = make_pattern("qslide", b, LOCAL, VERT, 4, 2)
    n = long_len(b)
    seqs = [(1, 1), (b - 1, b - 1), (b, b), (b + 1, b + 1), (0, 5), (20, n), (n, n)]
    assert_pattern_is_sparse(pattern, 4, 2, n, "head-dim sweep")
    run_varlen(device, dtype, 4, 2, head_dim, seqs, pattern, gen)


@pytest.mark.parametrize("dtype", PATTERN_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", GQA, ids=gqa_ids)
@pytest.mark.parametrize("block_size", SPARSE_BLOCK_SIZES, ids=lambda b: f"B{b}")
def test_varlen_prefill_patterns(device, block_size, heads, mode, dtype, gen):
    """Lengths 1, B-1, B, B+1 and past L*B (sparse) in one batch, for each head mode and GQA ratio."""
    skip_unsupported(device, dtype)
    hq, hkv = heads
    pattern = make_pattern(mode, block_size, LOCAL, VERT, hq, hkv)
    n = long_len(block_size)
    assert_pattern_is_sparse(pattern, hq, hkv, n, f"{mode} B={block_size}")
    seqs = [(m, m) for m in edge_lengths(block_size)]
    run_varlen(device, dtype, hq, hkv, 64, seqs, pattern, gen)


@pytest.mark.parametrize("kv_layout", ("head_major", "fused"))
def test_varlen_prefill_strided_kv(device, kv_layout, gen):
    """k and v as views of other storage (kv_views): any row and head strides are read correctly (on
    Hopper at head dim 128 through 5-D maps of whole rows, test_prefill_kernels.py)."""
    skip_unsupported(device, torch.bfloat16)
    pattern = make_pattern("qslide", 64, LOCAL, VERT, 8, 2)
    run_varlen(device, torch.bfloat16, 8, 2, 128, [(129, 129), (300, 701), (65, 65)], pattern, gen,
               kv_layout=kv_layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_varlen_prefill_chunked(device, dtype, gen):
    """k_len > q_len: the queries are the last positions of sequences whose keys are all given."""
    skip_unsupported(device, dtype)
    b = 32
    pattern = make_pattern("kvslide", b, LOCAL, VERT, 8, 2)
    n = long_len(b)
    seqs = [(1, n), (37, 37 + 64), (b, 5 * b), (0, 0), (0, 50), (64, 64), (5, 6), (b + 1, n + b)]
    assert_pattern_is_sparse(pattern, 8, 2, n, "chunked", num_queries=1)
    run_varlen(device, dtype, 8, 2, 96, seqs, pattern, gen)


@pytest.mark.parametrize("diagonal", (True, False), ids=("diag", "nodiag"))
@pytest.mark.parametrize("block_size", (16, 64), ids=lambda b: f"B{b}")
@pytest.mark.parametrize("dtype", PATTERN_DTYPES, ids=dtype_ids)
def test_varlen_prefill_explicit_layout(device, dtype, block_size, diagonal, gen):
    """Random per-head block masks; without the diagonal some rows see nothing (out 0, lse -inf)."""
    skip_unsupported(device, dtype)
    b, hq, hkv = block_size, 4, 2
    n = 5 * b + 2
    seqs = [(b + 1, b + 1), (0, 3), (3, n), (n, n), (b, 2 * b)]
    num_blocks = -(-n // b) + 1  # a layout longer than needed is fine
    lay = BlockLayout.from_block_mask(random_block_mask(hq, num_blocks, gen, diagonal), b)
    _, _, ref_lse = run_varlen(device, dtype, hq, hkv, 64, seqs, lay, gen)
    if not diagonal:
        assert (ref_lse == float("-inf")).any(), "test setup: no query row without keys"


@pytest.mark.parametrize("mode", MODES)
def test_varlen_prefill_to_layout_matches_pattern(device, mode, gen):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    b, hq, hkv = 16, 8, 2
    pattern = make_pattern(mode, b, LOCAL, VERT, hq, hkv)
    n = long_len(b) + 40
    seqs = [(n, n), (17, 17), (9, n - 3)]
    gen_state = gen.get_state()
    out_p, lse_p, _ = run_varlen(device, dtype, hq, hkv, 64, seqs, pattern, gen)
    gen.set_state(gen_state)  # the same inputs again
    out_l, lse_l, _ = run_varlen(device, dtype, hq, hkv, 64, seqs, pattern.to_layout(hq, n, hkv), gen)
    config = f"{mode}: layout vs pattern"
    assert_close_to_ref(out_l, out_p.float().cpu(), dtype, config)
    assert_lse_close(lse_l, lse_p.cpu(), dtype, config)


@pytest.mark.parametrize("dtype", PATTERN_DTYPES, ids=dtype_ids)
def test_varlen_prefill_phi3_small(device, dtype, gen):
    """Phi-3-small's pattern (B 64, L 16, V 8, scale 1/D) on tp rank 5 of 8: 4 q heads, 1 kv head."""
    skip_unsupported(device, dtype)
    pattern = SparsePattern.phi3_small(num_heads=4, tp_size=8, tp_rank=5)
    assert pattern.head_offset == 20 and pattern.head_sliding_step == 1
    assert_pattern_is_sparse(pattern, 4, 1, 1300, "phi3-small")
    seqs = [(1300, 1300), (100, 1500), (65, 65)]
    run_varlen(device, dtype, 4, 1, 128, seqs, pattern, gen, scale=1 / 128)


def test_varlen_prefill_wrapper(device, gen):
    """ops.varlen_prefill allocates (or fills the given) out and returns lse when asked."""
    dtype = torch.float16
    b, hq, hkv, d = 16, 4, 2, 64
    pattern = make_pattern("qslide", b, LOCAL, VERT, hq, hkv)
    seqs = [(40, 40), (3, 70)]
    q = randn((43, hq, d), dtype, gen).to(device)
    k, v = randn((110, hkv, d), dtype, gen).to(device), randn((110, hkv, d), dtype, gen).to(device)
    cu_q, cu_k = cu_seqlens([40, 3], device), cu_seqlens([40, 70], device)
    with one_thread():
        ref_out, ref_lse = reference.varlen_prefill_ref(q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), 0.125,
                                                        pattern)
    out, lse = ops.varlen_prefill(q, k, v, cu_q, cu_k, 0.125, pattern, return_lse=True)
    assert_close_to_ref(out, ref_out, dtype, f"wrapper {device} {seqs}")
    assert_lse_close(lse, ref_lse, dtype, f"wrapper {device} {seqs}")
    given = poison(torch.empty_like(q))
    assert ops.varlen_prefill(q, k, v, cu_q, cu_k, 0.125, pattern, out=given) is given
    assert_close_to_ref(given, ref_out, dtype, f"wrapper out= {device} {seqs}")


# ---- paged_prefill ---------------------------------------------------------------------------------

def prefill_seqs(block_size: int) -> list[tuple[int, int]]:
    """(context_len, query_len): contexts 0, 1, B-1, B, B+1 and past L*B; new tokens 0 to > B."""
    b = block_size
    return [(0, b + 1), (1, 1), (b - 1, 2), (b, b), (b + 1, 3), (long_len(b), 17), (2 * b + 3, 0), (0, 1),
            (long_len(b) + 1, b + 2)]


@pytest.mark.parametrize("kv_block_size", KV_BLOCK_SIZES, ids=lambda x: f"kvbs{x}")
@pytest.mark.parametrize("block_size", SPARSE_BLOCK_SIZES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_paged_prefill_block_sizes(device, dtype, block_size, kv_block_size, gen):
    skip_unsupported(device, dtype)
    hq, hkv = 4, 2
    pattern = make_pattern("qslide", block_size, LOCAL, VERT, hq, hkv)
    assert_pattern_is_sparse(pattern, hq, hkv, long_len(block_size) + 17, "paged prefill", num_queries=17)
    run_paged_prefill(device, dtype, hq, hkv, 64, kv_block_size, prefill_seqs(block_size), pattern, gen)


@pytest.mark.parametrize("dtype", PATTERN_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", GQA, ids=gqa_ids)
def test_paged_prefill_patterns(device, heads, mode, dtype, gen):
    skip_unsupported(device, dtype)
    hq, hkv = heads
    pattern = make_pattern(mode, 32, LOCAL, VERT, hq, hkv)
    assert_pattern_is_sparse(pattern, hq, hkv, long_len(32) + 17, f"{mode} paged prefill", num_queries=17)
    run_paged_prefill(device, dtype, hq, hkv, 64, 16, prefill_seqs(32), pattern, gen)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=dtype_ids)
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_paged_prefill_head_dims(device, head_dim, dtype, gen):
    pattern = make_pattern("kvslide-tp4r3", 16, LOCAL, VERT, 8, 2)
    seqs = [(0, 17), (16, 16), (long_len(16), 5), (33, 1)]
    run_paged_prefill(device, dtype, 8, 2, head_dim, 32, seqs, pattern, gen)


@pytest.mark.parametrize("diagonal", (True, False), ids=("diag", "nodiag"))
@pytest.mark.parametrize("dtype", PATTERN_DTYPES, ids=dtype_ids)
def test_paged_prefill_explicit_layout(device, dtype, diagonal, gen):
    skip_unsupported(device, dtype)
    b, hq, hkv = 32, 4, 1
    seqs = [(0, b + 1), (b - 1, 2), (3 * b + 5, b), (b, 0), (1, 4 * b)]
    lay = BlockLayout.from_block_mask(random_block_mask(hq, 5, gen, diagonal), b)
    _, _, ref_lse = run_paged_prefill(device, dtype, hq, hkv, 64, 16, seqs, lay, gen)
    if not diagonal:
        assert (ref_lse == float("-inf")).any(), "test setup: no query row without keys"


@pytest.mark.parametrize("dtype", PATTERN_DTYPES, ids=dtype_ids)
def test_write_kv_cache_then_paged_prefill(device, dtype, gen):
    """The serving flow: write the new tokens' k/v with write_kv_cache, then paged_prefill must agree
    with varlen_prefill over the same contiguous keys (context already cached)."""
    skip_unsupported(device, dtype)
    b, kvbs, hq, hkv, d = 16, 32, 4, 2, 80
    pattern = make_pattern("qslide", b, LOCAL, VERT, hq, hkv)
    seqs = [(0, 40), (70, 9), (long_len(b), 1)]
    seq_lens = [c + n for c, n in seqs]
    keys = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
    values = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
    key_cache, value_cache, block_tables = build_paged_cache(keys, values, kvbs, gen, device)
    # the context is cached already; the new tokens' slots are NaN until write_kv_cache fills them
    tables = block_tables.cpu().long()
    slots = [tables[r, t // kvbs] * kvbs + t % kvbs for r, t in enumerate(torch.arange(c, c + n) for c, n in seqs)]
    for slot in slots:
        key_cache[slot // kvbs, :, slot % kvbs] = float("nan")
        value_cache[slot // kvbs, :, slot % kvbs] = float("nan")
    new_k = [k[c:] for k, (c, _) in zip(keys, seqs)] + [torch.zeros(2, hkv, d, dtype=dtype)]
    new_v = [v[c:] for v, (c, _) in zip(values, seqs)] + [torch.zeros(2, hkv, d, dtype=dtype)]
    slot_mapping = torch.cat(slots + [torch.tensor([-1, -1])]).to(device)  # two padding tokens at the end
    ops.write_kv_cache(torch.cat(new_k).to(device), torch.cat(new_v).to(device), key_cache, value_cache, slot_mapping)
    q_lens = [n for _, n in seqs]
    q = randn((sum(q_lens), hq, d), dtype, gen).to(device)
    out = ops.paged_prefill(q, key_cache, value_cache, block_tables, cu_seqlens(q_lens, device),
                            torch.tensor(seq_lens, dtype=torch.int32, device=device), d ** -0.5, pattern)
    with one_thread():
        ref_out, _ = reference.varlen_prefill_ref(q.cpu(), torch.cat(keys), torch.cat(values),
                                                  cu_seqlens(q_lens, "cpu"), cu_seqlens(seq_lens, "cpu"), d ** -0.5,
                                                  pattern)
    assert_close_to_ref(out, ref_out, dtype, f"write + paged_prefill {device} {dtype_ids(dtype)} {seqs}")
    via_varlen = ops.varlen_prefill(q, torch.cat(keys).to(device), torch.cat(values).to(device),
                                    cu_seqlens(q_lens, device), cu_seqlens(seq_lens, device), d ** -0.5, pattern)
    assert_close_to_ref(out, via_varlen.float().cpu(), dtype, f"paged vs varlen {device} {dtype_ids(dtype)}")


# ---- paged_decode ----------------------------------------------------------------------------------

def decode_lengths(block_size: int, kv_block_size: int) -> list[int]:
    """Lengths 1..3072 with exact sparse- and cache-block boundaries, and a padding row (0)."""
    extra = [block_size - 1, block_size, block_size + 1, 3 * kv_block_size, 3 * kv_block_size + 1, 0]
    return sorted(set(DECODE_LENGTHS) | set(extra), key=lambda x: (x * 7919) % 97)  # unsorted batch


@pytest.mark.parametrize("kv_block_size", KV_BLOCK_SIZES, ids=lambda x: f"kvbs{x}")
@pytest.mark.parametrize("block_size", SPARSE_BLOCK_SIZES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_paged_decode_block_sizes(device, dtype, block_size, kv_block_size, gen):
    skip_unsupported(device, dtype)
    hq, hkv = 8, 2
    pattern = make_pattern("qslide", block_size, LOCAL, VERT, hq, hkv)
    assert_pattern_is_sparse(pattern, hq, hkv, long_len(block_size), "decode", num_queries=1)
    run_paged_decode(device, dtype, hq, hkv, 64, kv_block_size, decode_lengths(block_size, kv_block_size),
                     pattern, gen)


@pytest.mark.parametrize("dtype", PATTERN_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads", GQA, ids=gqa_ids)
def test_paged_decode_patterns(device, heads, mode, dtype, gen):
    skip_unsupported(device, dtype)
    hq, hkv = heads
    pattern = make_pattern(mode, 16, LOCAL, VERT, hq, hkv)
    lengths = [1, 15, 16, 17, 0, long_len(16), 48, 49, 333]
    assert_pattern_is_sparse(pattern, hq, hkv, long_len(16), f"{mode} decode", num_queries=1)
    run_paged_decode(device, dtype, hq, hkv, 64, 16, lengths, pattern, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_paged_decode_head_dims(device, head_dim, dtype, gen):
    skip_unsupported(device, dtype)
    pattern = make_pattern("qslide-tp2r1", 32, LOCAL, VERT, 4, 1)
    run_paged_decode(device, dtype, 4, 1, head_dim, 16, [1, 31, 32, 33, 0, 700], pattern, gen)


@pytest.mark.parametrize("dtype", PATTERN_DTYPES, ids=dtype_ids)
def test_paged_decode_phi3_small(device, dtype, gen):
    """Phi-3-small's pattern and scale on one GPU of 8 (4 q heads, 1 kv head), up to 3000 tokens."""
    skip_unsupported(device, dtype)
    pattern = SparsePattern.phi3_small(num_heads=4, tp_size=8, tp_rank=2)
    assert_pattern_is_sparse(pattern, 4, 1, 2999, "phi3-small decode", num_queries=1)
    run_paged_decode(device, dtype, 4, 1, 128, 16, [2999, 1, 1024, 1025, 64 * 17, 0], pattern, gen, scale=1 / 128)


@pytest.mark.parametrize("diagonal", (True, False), ids=("diag", "nodiag"))
@pytest.mark.parametrize("dtype", PATTERN_DTYPES, ids=dtype_ids)
def test_paged_decode_explicit_layout(device, dtype, diagonal, gen):
    skip_unsupported(device, dtype)
    b = 16
    lay = BlockLayout.from_block_mask(random_block_mask(4, 12, gen, diagonal), b)
    lengths = [1, 16, 17, 100, 0, 12 * 16, 33]
    _, _, ref_lse = run_paged_decode(device, dtype, 4, 2, 64, 32, lengths, lay, gen)
    if not diagonal:
        assert (ref_lse == float("-inf"))[:, 0].all(), "test setup: a first-block query must see nothing"


@pytest.mark.parametrize("splits", ("auto", "1", "3", "64", "100"))
def test_paged_decode_splits(device, splits, gen, monkeypatch):
    """The split-KV path (several CTAs per sequence merged by log-sum-exp) with forced split counts,
    including more splits than a short sequence has slices (empty splits must weigh nothing) and more
    than the merge takes (100: clamped to 64). The CPU path ignores BSA_DECODE_SPLITS and checks the
    same cases."""
    if splits != "auto":
        monkeypatch.setenv("BSA_DECODE_SPLITS", splits)
    pattern = make_pattern("qslide", 64, 4, 8, 8, 2)
    run_paged_decode(device, torch.bfloat16, 8, 2, 128, 16, [1, 64, 65, 5000, 0, 777, 4096], pattern, gen)


@pytest.mark.parametrize("splits", ("2", "5", "8", "16"))
@pytest.mark.parametrize("merge", ("kernel", "cluster"))
def test_paged_decode_merge_paths(device, merge, splits, gen, monkeypatch):
    """Both ways a decode's splits are combined (BSA_DECODE_MERGE): partials in global memory and a
    merge kernel, and on sm_90 one thread-block cluster per group that merges through distributed
    shared memory, at split counts up to the 16 a cluster takes. Short sequences leave splits empty
    (they must weigh nothing), a zero-length one gives zeros and lse -inf; groups of 4 heads and of 24
    (two CTAs' head chunks a group, each its own cluster)."""
    if device == "cpu":
        pytest.skip("the merge paths are the CUDA kernels'")
    if merge == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0")
    monkeypatch.setenv("BSA_DECODE_SPLITS", splits)
    monkeypatch.setenv("BSA_DECODE_MERGE", merge)
    for hq, hkv in ((8, 2), (24, 1)):
        pattern = make_pattern("qslide", 64, 4, 8, hq, hkv)
        try:
            run_paged_decode(device, torch.bfloat16, hq, hkv, 128, 16, [1, 64, 65, 3000, 0, 777], pattern, gen)
        except RuntimeError as e:
            if merge == "cluster" and splits == "16" and "do not fit one thread-block cluster" in str(e):
                pytest.skip(f"this GPU holds no cluster of 16 decode CTAs: {e}")
            raise


def test_forced_cluster_merge_that_cannot_run_is_an_error(device, gen, monkeypatch):
    """BSA_DECODE_MERGE=cluster with more splits than a cluster takes (17) is an error naming the knob."""
    if device == "cpu":
        pytest.skip("the merge paths are the CUDA kernels'")
    monkeypatch.setenv("BSA_DECODE_SPLITS", "17")
    monkeypatch.setenv("BSA_DECODE_MERGE", "cluster")
    with pytest.raises(RuntimeError, match="BSA_DECODE_MERGE=cluster"):
        run_paged_decode(device, torch.bfloat16, 8, 2, 128, 16, [3000, 5], make_pattern("qslide", 64, 4, 8, 8, 2), gen)


@pytest.mark.parametrize("heads", ((32, 8), (32, 1), (24, 1), (16, 2)), ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_paged_decode_large_batch(device, heads, gen):
    """256 sequences of random lengths up to 4096 (one split each on a GPU): group sizes 4, 8, 24
    and 32 (more heads than one CTA's 16 rows), Phi-3-small's pattern parameters."""
    if device == "cpu":
        pytest.skip("GPU-scale case; the CPU path is covered by the smaller ones")
    hq, hkv = heads
    lengths = torch.randint(1, 4097, (256,), generator=gen).tolist()
    lengths[:6] = [1, 64, 65, 4096, 0, 1024]
    pattern = make_pattern("qslide", 64, 16, 8, hq, hkv)
    run_paged_decode(device, torch.bfloat16, hq, hkv, 128, 16, lengths, pattern, gen, scale=1 / 128)


@pytest.mark.parametrize("kv_block_size", (16, 128))
def test_paged_decode_long_context(device, kv_block_size, gen):
    """Phi-3-small (32 q / 8 kv heads, D = 128) at 32k, 16k and block-boundary lengths; cache blocks
    smaller and larger than the sparse block."""
    if device == "cpu":
        pytest.skip("GPU-scale case; the CPU path is covered by the smaller ones")
    pattern = SparsePattern.phi3_small(num_heads=32)
    run_paged_decode(device, torch.bfloat16, 32, 8, 128, kv_block_size, [32768, 16384, 16385, 8191, 1],
                     pattern, gen, scale=1 / 128)


def test_paged_decode_all_padding(device, gen):
    """A batch of padding rows only (seq_len 0 everywhere): out all zeros, lse all -inf."""
    dtype = torch.float16 if device != "cpu" else torch.float32
    run_paged_decode(device, dtype, 4, 2, 64, 16, [0, 0, 0], make_pattern("homo", 16, 2, 3, 4, 2), gen)


# ---- torch.library.opcheck -----------------------------------------------------------------------

def _small_layout_and_pattern(device):
    pattern = SparsePattern(16, 2, 3, 1)
    return pattern, pattern.to_layout(4, 48, 2).to(device)


def test_opcheck_varlen_prefill(device, gen):
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    pattern, lay = _small_layout_and_pattern(device)
    q = randn((30, 4, 64), dtype, gen).to(device)
    k, v = randn((45, 2, 64), dtype, gen).to(device), randn((45, 2, 64), dtype, gen).to(device)
    cu_q, cu_k = cu_seqlens([20, 10], device), cu_seqlens([20, 25], device)
    out, lse = torch.zeros_like(q), torch.zeros(4, 30, device=device)
    torch.library.opcheck(_ops.varlen_prefill.default,
                          (out, q, k, v, cu_q, cu_k, 0.125, *pattern.op_args(), lse))
    torch.library.opcheck(_ops.varlen_prefill.default,
                          (out, q, k, v, cu_q, cu_k, 0.125, *lay.op_args(), None))


def test_opcheck_paged_prefill(device, gen):
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    pattern, lay = _small_layout_and_pattern(device)
    keys = [randn((n, 2, 64), dtype, gen) for n in (20, 45)]
    key_cache, value_cache, tables = build_paged_cache(keys, [k.neg() for k in keys], 16, gen, device)
    key_cache, value_cache = key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0)
    q = randn((30, 4, 64), dtype, gen).to(device)
    cu_q, seq_lens = cu_seqlens([20, 10], device), torch.tensor([20, 45], dtype=torch.int32, device=device)
    out, lse = torch.zeros_like(q), torch.zeros(4, 30, device=device)
    torch.library.opcheck(_ops.paged_prefill.default, (out, q, key_cache, value_cache, tables, cu_q, seq_lens, 0.125,
                                                       *lay.op_args(), lse))
    torch.library.opcheck(_ops.paged_prefill.default, (out, q, key_cache, value_cache, tables, cu_q, seq_lens, 0.125,
                                                       *pattern.op_args(), None))


def test_opcheck_paged_decode(device, gen):
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    pattern, lay = _small_layout_and_pattern(device)
    keys = [randn((n, 2, 64), dtype, gen) for n in (20, 45, 0)]
    key_cache, value_cache, tables = build_paged_cache(keys, [k.neg() for k in keys], 16, gen, device)
    key_cache, value_cache = key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0)
    q = randn((3, 4, 64), dtype, gen).to(device)
    seq_lens = torch.tensor([20, 45, 0], dtype=torch.int32, device=device)
    out, lse = torch.zeros_like(q), torch.zeros(4, 3, device=device)
    torch.library.opcheck(_ops.paged_decode.default, (out, q, key_cache, value_cache, tables, seq_lens, 0.125,
                                                      *pattern.op_args(), lse))
    torch.library.opcheck(_ops.paged_decode.default, (out, q, key_cache, value_cache, tables, seq_lens, 0.125,
                                                      *lay.op_args(), None))
