"""Edge cases that must work: empty batches, zero prefill / decode tokens, length 1 and block-boundary
lengths, a decode at position 131071 (max_seqlen 131072), a KV cache of more than 2^31 elements per half,
and inputs holding +-inf / NaN (propagated like dense attention, never into rows that do not attend them).
"""
from __future__ import annotations

import math

import pytest
import torch

from _helpers import (
    NAN, assert_close_to_ref, assert_lse_close, build_paged_cache, cu_seqlens, make_pattern, one_thread, poison, randn,
)
from blocksparse_attn import (BlocksparseFlashAttentionBackend, BlocksparseFlashAttentionImpl,
                              BlocksparseFlashAttentionMetadata, ops, reference, split_kv_cache)
from blocksparse_attn.layout import SparsePattern

HQ, HKV, D, B, KVBS = 4, 2, 64, 16, 16
PATTERN = make_pattern("qslide", B, 2, 3, HQ, HKV)


def dtype_for(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def empty_cache(device, dtype, num_blocks=4):
    return (torch.zeros(num_blocks, HKV, KVBS, D, dtype=dtype, device=device),
            torch.zeros(num_blocks, HKV, KVBS, D, dtype=dtype, device=device))


# ---- empty batches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_seqs", (0, 3), ids=("no-seqs", "empty-seqs"))
def test_varlen_prefill_empty(device, num_seqs):
    """No sequences (cu_seqlens [0]) or only empty ones ([0, 0, 0, 0]): nothing to do, no error."""
    dtype = dtype_for(device)
    q = torch.empty(0, HQ, D, dtype=dtype, device=device)
    k = v = torch.empty(0, HKV, D, dtype=dtype, device=device)
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32, device=device)
    out, lse = ops.varlen_prefill(q, k, v, cu, cu, 0.125, PATTERN, return_lse=True)
    assert out.shape == (0, HQ, D) and lse.shape == (HQ, 0)


def test_varlen_prefill_empty_queries_with_keys(device, gen):
    """Sequences with keys but no queries next to a real one: only the real rows are written."""
    dtype = dtype_for(device)
    q_lens, k_lens = [0, 5, 0], [40, 5, 17]
    q = randn((5, HQ, D), dtype, gen)
    k, v = randn((62, HKV, D), dtype, gen), randn((62, HKV, D), dtype, gen)
    cu_q, cu_k = cu_seqlens(q_lens, "cpu"), cu_seqlens(k_lens, "cpu")
    ref, ref_lse = reference.varlen_prefill_ref(q, k, v, cu_q, cu_k, 0.125, PATTERN)
    out, lse = ops.varlen_prefill(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device), 0.125,
                                  PATTERN, return_lse=True)
    assert_close_to_ref(out, ref, dtype, "empty queries")
    assert_lse_close(lse, ref_lse, dtype, "empty queries")


@pytest.mark.parametrize("num_seqs", (0, 2), ids=("no-seqs", "empty-seqs"))
def test_paged_prefill_empty(device, num_seqs):
    dtype = dtype_for(device)
    key_cache, value_cache = empty_cache(device, dtype)
    q = torch.empty(0, HQ, D, dtype=dtype, device=device)
    tables = torch.zeros(num_seqs, 1, dtype=torch.int32, device=device)
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32, device=device)
    lens = torch.zeros(num_seqs, dtype=torch.int32, device=device)
    out, lse = ops.paged_prefill(q, key_cache, value_cache, tables, cu, lens, 0.125, PATTERN, return_lse=True)
    assert out.shape == (0, HQ, D) and lse.shape == (HQ, 0)


def test_paged_decode_empty(device):
    dtype = dtype_for(device)
    key_cache, value_cache = empty_cache(device, dtype)
    q = torch.empty(0, HQ, D, dtype=dtype, device=device)
    tables = torch.zeros(0, 3, dtype=torch.int32, device=device)
    lens = torch.zeros(0, dtype=torch.int32, device=device)
    out, lse = ops.paged_decode(q, key_cache, value_cache, tables, lens, 0.125, PATTERN, return_lse=True)
    assert out.shape == (0, HQ, D) and lse.shape == (HQ, 0)


def test_cache_ops_empty(device):
    """Zero tokens to write, zero blocks to copy or swap: the caches stay as they were."""
    dtype = dtype_for(device)
    key_cache, value_cache = empty_cache(device, dtype)
    key_cache.normal_()
    before = key_cache.clone()
    nothing = torch.empty(0, HKV, D, dtype=dtype, device=device)
    ops.write_kv_cache(nothing, nothing, key_cache, value_cache, torch.empty(0, dtype=torch.int64, device=device))
    cache = torch.randn(2, 4, KVBS * HKV * D, device=device).to(dtype)
    snapshot = cache.clone()
    ops.copy_blocks([cache], torch.empty(0, 2, dtype=torch.int64, device=device))
    ops.swap_blocks(cache, cache.clone(), torch.empty(0, 2, dtype=torch.int64))
    assert torch.equal(key_cache, before) and torch.equal(cache, snapshot)


# ---- the backend with empty parts ------------------------------------------------------------------------

def make_impl(max_seqlen=4096, **params):
    p = dict(max_seqlen=max_seqlen, block_size=B, local_blocks=2, vert_stride=3) | params
    return BlocksparseFlashAttentionImpl(HQ, D, D ** -0.5, HKV, blocksparse_params=p)


def qkv(n, dtype, gen, device):
    return [randn((n, h * D), dtype, gen).to(device) for h in (HQ, HKV, HKV)]


def test_backend_empty_batch(device, gen):
    """0 sequences, 0 tokens (with and without padding rows): the output is all zero, the cache unchanged."""
    dtype = dtype_for(device)
    impl = make_impl()
    kv_cache = torch.randn(BlocksparseFlashAttentionBackend.get_kv_cache_shape(8, KVBS, HKV, D)).to(dtype).to(device)
    before = kv_cache.clone()
    for padding in (0, 3):
        md = BlocksparseFlashAttentionMetadata.build([], [], [], KVBS, device=device)
        assert md.num_prefill_tokens == md.num_decode_tokens == 0
        output = poison(torch.empty(padding, HQ * D, dtype=dtype, device=device))
        out = impl.forward(*qkv(padding, dtype, gen, device), kv_cache, md, output=output)
        assert out.shape == (padding, HQ * D) and (out == 0).all()
    assert torch.equal(kv_cache, before)


def _history_ref(q, keys, values, pattern):
    with one_thread():
        return reference.attention_ref(q, keys, values, D ** -0.5, pattern)[0]


@pytest.mark.parametrize("part", ("prefill-only", "decode-only"))
def test_backend_zero_prefill_or_decode_tokens(device, part, gen):
    """A batch with no decode tokens (prefills only) or no prefill tokens (decodes only)."""
    dtype = dtype_for(device)
    impl = make_impl()
    nb = 40
    kv_cache = torch.full(BlocksparseFlashAttentionBackend.get_kv_cache_shape(nb, KVBS, HKV, D), NAN,
                          dtype=dtype, device=device)
    tables = [list(range(0, 20)), list(range(20, 40))]
    lens = [100, 1]  # a prompt, and a one-token prompt
    q, k, v = qkv(sum(lens), dtype, gen, device)
    md = BlocksparseFlashAttentionMetadata.build(lens, [0, 0], tables, KVBS, device=device)
    assert md.num_decode_tokens == 0 and md.decode_metadata is None
    out = impl.forward(q, k, v, kv_cache, md).view(-1, HQ, D)
    hist_k = [k[:100].view(-1, HKV, D).cpu(), k[100:].view(-1, HKV, D).cpu()]
    hist_v = [v[:100].view(-1, HKV, D).cpu(), v[100:].view(-1, HKV, D).cpu()]
    qc = q.view(-1, HQ, D).cpu()
    if part == "prefill-only":
        assert_close_to_ref(out[:100], _history_ref(qc[:100], hist_k[0], hist_v[0], impl.pattern), dtype, "prefill")
        assert_close_to_ref(out[100:], _history_ref(qc[100:], hist_k[1], hist_v[1], impl.pattern), dtype, "len 1")
        return
    q, k, v = qkv(2, dtype, gen, device)
    md = BlocksparseFlashAttentionMetadata.build([1, 1], lens, tables, KVBS, device=device)
    assert md.num_prefill_tokens == 0 and md.prefill_metadata is None and md.num_decode_tokens == 2
    out = impl.forward(q, k, v, kv_cache, md).view(-1, HQ, D)
    for r in range(2):
        keys = torch.cat([hist_k[r], k[r: r + 1].view(1, HKV, D).cpu()])
        values = torch.cat([hist_v[r], v[r: r + 1].view(1, HKV, D).cpu()])
        ref = _history_ref(q[r: r + 1].view(1, HQ, D).cpu(), keys, values, impl.pattern)
        assert_close_to_ref(out[r: r + 1], ref, dtype, f"decode-only seq {r}")


# ---- lengths 1 and block boundaries, each op ------------------------------------------------------------

BOUNDARY_LENGTHS = (1, B - 1, B, B + 1, 2 * B, 3 * B, 3 * B + 1, 8 * B)  # (L + 1) * B = 48: sparse beyond


def test_boundary_lengths_all_ops(device, gen):
    """Every length of BOUNDARY_LENGTHS as its own prefill and decode, with kvbs = B / 2, B, 2 B."""
    dtype = dtype_for(device)
    n = list(BOUNDARY_LENGTHS)
    q = randn((sum(n), HQ, D), dtype, gen)
    keys = [randn((m, HKV, D), dtype, gen) for m in n]
    values = [randn((m, HKV, D), dtype, gen) for m in n]
    cu = cu_seqlens(n, "cpu")
    with one_thread():
        ref, ref_lse = reference.varlen_prefill_ref(q, torch.cat(keys), torch.cat(values), cu, cu, 0.125, PATTERN)
    out, lse = ops.varlen_prefill(q.to(device), torch.cat(keys).to(device), torch.cat(values).to(device),
                                  cu.to(device), cu.to(device), 0.125, PATTERN, return_lse=True)
    assert_close_to_ref(out, ref, dtype, f"varlen boundary lengths {n}")
    assert_lse_close(lse, ref_lse, dtype, f"varlen boundary lengths {n}")
    last = torch.tensor(n).cumsum(0) - 1  # each sequence's last query row = its decode at position len - 1
    for kvbs in (B // 2, B, 2 * B):
        key_cache, value_cache, tables = build_paged_cache(keys, values, kvbs, gen, device)
        lens = torch.tensor(n, dtype=torch.int32, device=device)
        pre = ops.paged_prefill(q.to(device), key_cache, value_cache, tables, cu.to(device), lens, 0.125, PATTERN)
        assert_close_to_ref(pre, ref, dtype, f"paged_prefill kvbs={kvbs} lengths {n}")
        dec, dec_lse = ops.paged_decode(q[last].to(device), key_cache, value_cache, tables, lens, 0.125, PATTERN,
                                        return_lse=True)
        assert_close_to_ref(dec, ref[last], dtype, f"paged_decode kvbs={kvbs} lengths {n}")
        assert_lse_close(dec_lse, ref_lse[:, last], dtype, f"paged_decode kvbs={kvbs} lengths {n}")


# ---- long positions: max_seqlen 131072 ------------------------------------------------------------------

def test_decode_at_position_131071(device, gen):
    """BlocksparseParams(max_seqlen=131072) and a decode at the last position (Phi-3-small's pattern:
    B 64, L 16, V 8): one sequence, 2 q heads, 1 kv head, D 64; the reference sees all 131072 keys."""
    dtype = dtype_for(device)
    hq, hkv, d, kvbs, n = 2, 1, 64, 256, 131072
    impl = BlocksparseFlashAttentionImpl(hq, d, 1 / d, hkv, blocksparse_params=dict(
        max_seqlen=n, block_size=64, local_blocks=16, vert_stride=8, tp_size=16, tp_rank=3))
    assert impl.pattern == SparsePattern.phi3_small(num_heads=hq, tp_size=16, tp_rank=3)
    num_blocks = n // kvbs + 1
    keys, values = randn((n, hkv, d), dtype, gen), randn((n, hkv, d), dtype, gen)
    table = torch.randperm(num_blocks, generator=gen)[: n // kvbs]
    kv_cache = torch.full(BlocksparseFlashAttentionBackend.get_kv_cache_shape(num_blocks, kvbs, hkv, d), NAN,
                          dtype=dtype)
    key_cache, value_cache = split_kv_cache(kv_cache, hkv, d)
    key_cache[table] = keys.view(-1, kvbs, hkv, d).transpose(1, 2)  # the first n - 1 tokens ...
    value_cache[table] = values.view(-1, kvbs, hkv, d).transpose(1, 2)
    last = table[-1], kvbs - 1
    key_cache[last[0], :, last[1]] = NAN  # ... and the last one comes with the decode step
    value_cache[last[0], :, last[1]] = NAN
    kv_cache = kv_cache.to(device)
    q = randn((1, hq, d), dtype, gen)
    md = BlocksparseFlashAttentionMetadata.build([1], [n - 1], [table.tolist()], kvbs, device=device)
    assert md.num_decode_tokens == 1 and md.max_decode_seq_len == n
    out = impl.forward(q.view(1, -1).to(device), keys[-1:].reshape(1, -1).to(device),
                       values[-1:].reshape(1, -1).to(device), kv_cache, md)
    with one_thread():
        ref, _ = reference.attention_ref(q, keys, values, 1 / d, impl.pattern)
    assert_close_to_ref(out.view(1, hq, d), ref, dtype, "decode at position 131071")
    # a sequence of 131073 tokens is over max_seqlen
    md = BlocksparseFlashAttentionMetadata.build([1], [n], [table.tolist() + [num_blocks - 1]], kvbs, device=device)
    with pytest.raises(ValueError, match="max_seqlen"):
        impl.forward(q.view(1, -1).to(device), keys[-1:].reshape(1, -1).to(device),
                     values[-1:].reshape(1, -1).to(device), kv_cache, md)


# ---- a KV cache over 2^31 elements -------------------------------------------------------------------

def test_kv_cache_over_2_pow_31_elements(device, gen):
    """Each half of the cache holds 2^31 + 8192 bfloat16 elements (8.6 GB in all, allocated but never
    touched except the blocks used): write to, read from and copy the highest blocks, whose element
    offsets are past 2^31 (int32 offset arithmetic would wrap)."""
    hkv, d, kvbs = 1, 64, 16
    per_block = hkv * kvbs * d
    num_blocks = 2 ** 31 // per_block + 8
    dtype = torch.bfloat16
    try:
        kv_cache = torch.empty(BlocksparseFlashAttentionBackend.get_kv_cache_shape(num_blocks, kvbs, hkv, d),
                               dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot allocate a cache of 2 x {num_blocks * per_block} elements here: {e}")
    assert kv_cache[1].numel() > 2 ** 31
    key_cache, value_cache = split_kv_cache(kv_cache, hkv, d)
    top = [num_blocks - 1, num_blocks - 3, num_blocks - 2, 5]  # the highest blocks, and a low one
    key_cache[top] = NAN  # the used blocks start as NaN: everything read must have been written
    value_cache[top] = NAN
    hq, n = 2, 3 * kvbs + 5
    keys, values = randn((n, hkv, d), dtype, gen), randn((n, hkv, d), dtype, gen)
    slots = torch.tensor([top[t // kvbs] * kvbs + t % kvbs for t in range(n)], dtype=torch.int64)
    assert int(slots.max()) * d > 2 ** 31
    ops.write_kv_cache(keys.to(device), values.to(device), key_cache, value_cache, slots.to(device))
    assert torch.equal(key_cache[slots // kvbs, :, slots % kvbs].cpu(), keys)
    assert torch.equal(value_cache[slots // kvbs, :, slots % kvbs].cpu(), values)

    pattern = SparsePattern(16, 1, 2, 1)
    q = randn((n, hq, d), dtype, gen)
    tables = torch.tensor([top], dtype=torch.int32, device=device)
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    with one_thread():
        ref, _ = reference.attention_ref(q, keys, values, d ** -0.5, pattern)
    out = ops.paged_prefill(q.to(device), key_cache, value_cache, tables, cu_seqlens([n], device), lens, d ** -0.5,
                            pattern)
    assert_close_to_ref(out, ref, dtype, "paged_prefill from blocks past 2^31 elements")
    out = ops.paged_decode(q[-1:].to(device), key_cache, value_cache, tables, lens, d ** -0.5, pattern)
    assert_close_to_ref(out, ref[-1:], dtype, "paged_decode from blocks past 2^31 elements")

    # copy_blocks: the highest block to a low one, a low one to another high one; swap_blocks both ways
    def same(a, b):  # bitwise (the unwritten tails are NaN)
        return torch.equal(a.view(torch.int16), b.view(torch.int16))

    ops.copy_blocks([kv_cache], torch.tensor([[num_blocks - 1, 7], [5, num_blocks - 4]], device=device))
    assert same(kv_cache[:, 7], kv_cache[:, num_blocks - 1]) and same(kv_cache[:, num_blocks - 4], kv_cache[:, 5])
    small = torch.zeros(2, 3, kvbs * hkv * d, dtype=dtype, device=device)
    ops.swap_blocks(kv_cache, small, torch.tensor([[num_blocks - 2, 0], [num_blocks - 3, 2]]))
    assert same(small[:, 0], kv_cache[:, num_blocks - 2]) and same(small[:, 2], kv_cache[:, num_blocks - 3])
    ops.swap_blocks(small, kv_cache, torch.tensor([[2, num_blocks - 5]]))
    assert same(kv_cache[:, num_blocks - 5], small[:, 2])


# ---- +-inf and NaN in the inputs ------------------------------------------------------------------------

N_TOK = 100  # one sequence, B 16: the pattern is sparse from 48 tokens on
P = 50       # the poisoned key/value position (block 3)


def _nan_case(device, gen):
    dtype = dtype_for(device)
    q = randn((N_TOK, HQ, D), dtype, gen)
    k, v = randn((N_TOK, HKV, D), dtype, gen), randn((N_TOK, HKV, D), dtype, gen)
    return dtype, q, k, v


def _run_all(device, q, k, v, gen):
    """varlen_prefill, paged_prefill and paged_decode (every row as a decode of its own prefix)."""
    cu = cu_seqlens([N_TOK], device)
    out, lse = ops.varlen_prefill(q.to(device), k.to(device), v.to(device), cu, cu, 0.125, PATTERN, return_lse=True)
    key_cache, value_cache, tables = build_paged_cache([k], [v], KVBS, gen, device)
    lens = torch.tensor([N_TOK], dtype=torch.int32, device=device)
    pre, pre_lse = ops.paged_prefill(q.to(device), key_cache, value_cache, tables, cu, lens, 0.125, PATTERN,
                                     return_lse=True)
    rows = torch.arange(N_TOK)
    dec, dec_lse = ops.paged_decode(q.to(device), key_cache, value_cache, tables.expand(N_TOK, -1).contiguous(),
                                    (rows + 1).to(torch.int32).to(device), 0.125, PATTERN, return_lse=True)
    return {"varlen_prefill": (out, lse), "paged_prefill": (pre, pre_lse), "paged_decode": (dec, dec_lse)}


def _ref(q, k, v):
    cu = cu_seqlens([N_TOK], "cpu")
    with one_thread():
        return reference.varlen_prefill_ref(q, k, v, cu, cu, 0.125, PATTERN)


def _check_rows(results, ref, ref_lse, bad, dtype, what):
    """Rows `bad` [T, Hq] must be non-finite (NaN, or inf where dense attention gives inf); every other
    row must match the reference; lse is NaN or +inf exactly on the bad rows."""
    for op, (out, lse) in results.items():
        out, lse = out.float().cpu(), lse.cpu()
        nonfinite = ~out.isfinite().all(-1)
        assert torch.equal(nonfinite, bad), (f"[{op} {what}] non-finite rows [token, head] "
                                             f"{nonfinite.nonzero().tolist()[:8]} expected {bad.nonzero().tolist()[:8]}")
        assert_close_to_ref(out[~bad], ref[~bad], dtype, f"{op} {what}: finite rows")
        lse_bad = ~lse.isfinite() & ~(lse == -math.inf)
        assert torch.equal(lse_bad, bad.T), f"[{op} {what}] lse NaN/+inf at {lse_bad.nonzero().tolist()[:8]}"
        assert_lse_close(lse.masked_fill(bad.T, 0), ref_lse.masked_fill(bad.T, 0), dtype, f"{op} {what}: lse")


def _sees(pos):
    """[T, Hq]: does query row t of head h attend key position pos (the reference's token mask)."""
    return reference.token_mask(PATTERN, HQ, HKV, torch.arange(N_TOK), N_TOK)[:, :, pos].T


@pytest.mark.parametrize("value", (NAN, math.inf, -math.inf), ids=("nan", "inf", "-inf"))
def test_nonfinite_query(device, value, gen):
    """A non-finite element in q[t, h]: that output row only is NaN, as in dense attention (SDPA, same mask)."""
    dtype, q, k, v = _nan_case(device, gen)
    q[60, 1, 7] = value
    ref, ref_lse = _ref(q, k, v)
    bad = torch.zeros(N_TOK, HQ, dtype=torch.bool)
    bad[60, 1] = True
    _check_rows(_run_all(device, q, k, v, gen), ref, ref_lse, bad, dtype, f"q[60, 1, 7] = {value}")
    mask = reference.token_mask(PATTERN, HQ, HKV, torch.arange(N_TOK), N_TOK)
    kk, vv = (x.float().repeat_interleave(HQ // HKV, 1).transpose(0, 1) for x in (k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float().transpose(0, 1), kk, vv, attn_mask=mask,
                                                            scale=0.125).transpose(0, 1)
    assert torch.equal(~sdpa.isfinite().all(-1), bad)


@pytest.mark.parametrize("value", (NAN, math.inf, -math.inf), ids=("nan", "inf", "-inf"))
def test_nonfinite_key(device, value, gen):
    """A non-finite element in k[P]: exactly the rows that attend position P are non-finite (a +-inf
    component gives a +-inf score: +inf makes the row NaN, -inf just drops the key). Rows that do not
    attend P (earlier rows, and rows whose pattern skips P's block) are untouched, as the reference's
    masked softmax gives; torch SDPA with a boolean mask would turn every row NaN, which is not the
    semantics of a key that is not attended."""
    dtype, q, k, v = _nan_case(device, gen)
    k[P, 0, 3] = value
    ref, ref_lse = _ref(q, k, v)
    bad = ~ref.isfinite().all(-1)
    assert (bad <= _sees(P)).all() and bad.any() and (~bad & (torch.arange(N_TOK) >= P).view(-1, 1)).any()
    _check_rows(_run_all(device, q, k, v, gen), ref, ref_lse, bad, dtype, f"k[{P}, 0, 3] = {value}")


@pytest.mark.parametrize("value", (NAN, math.inf), ids=("nan", "inf"))
def test_nonfinite_value(device, value, gen):
    """A non-finite element in v[P]: every row that attends P is non-finite; rows whose pattern skips
    P's key block entirely are exact (a sparse kernel never reads that block). Rows of the block pair
    that holds P but do not attend P token-wise (earlier rows of P's diagonal block) are not specified:
    dense attention computes 0 * NaN there (the reference and SDPA give NaN for every row of the head).

    On CUDA the tensor cores multiply whole tiles: a masked weight 0 times the NaN value is NaN, so the
    value also reaches the rows that share its 64-key tile (prefill, B < 64) or its kv group's slice
    (decode, the group's heads are one tile). What holds there: the other kv head's rows, and rows
    before P's 64-token tile (causality keeps the tile out of their walk), are exact."""
    dtype, q, k, v = _nan_case(device, gen)
    v[P, 0, 3] = value
    v_zero = v.clone()
    v_zero[P, 0] = 0  # kv head 1 keeps its (finite) value
    ref, ref_lse = _ref(q, k, v_zero)
    sees = _sees(P) & (torch.arange(HQ) // (HQ // HKV) == 0)  # kv head 0 only
    block_sees = reference.block_visible(PATTERN, HQ, HKV, torch.arange(N_TOK) // B,
                                         torch.tensor([P // B]))[:, :, 0].T & (torch.arange(HQ) < HQ // HKV)
    assert (block_sees & ~sees).any() and (~block_sees & (torch.arange(N_TOK) >= P).view(-1, 1)).any()
    for op, (out, lse) in _run_all(device, q, k, v, gen).items():
        out = out.float().cpu()
        nonfinite = ~out.isfinite().all(-1)
        assert nonfinite[sees].all(), f"[{op}] rows that attend v[{P}] = {value} must not be finite"
        exact = ~block_sees
        if device != "cpu":
            exact = (torch.arange(HQ) >= HQ // HKV) | (torch.arange(N_TOK) < P // 64 * 64).view(-1, 1)
        assert_close_to_ref(out[exact], ref[exact], dtype, f"{op} v[{P}] = {value}: rows skipping it")
        assert_lse_close(lse.cpu(), ref_lse, dtype, f"{op} v[{P}] = {value}: lse (scores only)")
