"""Every op under torch.inference_mode() with two intra-op threads, against blocksparse_attn.reference.

Serving engines run the model under inference_mode, so every tensor they hand to the ops (and every
output the wrappers allocate) is an inference tensor. The CPU kernels run their work units on
at::parallel_for worker threads, which do not inherit the caller's thread-local state: before
csrc/cpu/parallel.h, a worker writing into a view of an inference tensor failed with "Inplace update
to inference tensor outside InferenceMode" as soon as more than one thread took part. Each test makes
its inputs either inside inference mode (as an engine does) or outside it (a cache allocated before the
engine entered inference mode), runs the op inside, and checks the result against the reference.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from _helpers import (assert_close_to_ref, assert_lse_close, build_paged_cache, cu_seqlens, make_pattern, one_thread,
                      poison, randn)
from blocksparse_attn import ops, reference
from blocksparse_attn.layout import BlockLayout

# ---- the axes ----------------------------------------------------------------------------------------
THREADS = 2  # the bug needs a worker thread besides the caller; two is what CI's 2-core machine has
HQ, HKV, D, B, KVBS = 8, 2, 64, 16, 16
SCALE = D ** -0.5
INPUTS_MADE = ("inside", "outside")  # where the inputs are created relative to inference_mode
PATTERNS = ("pattern", "layout")


def dtype_for(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.fixture(autouse=True)
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    assert torch.get_num_threads() == THREADS, "the test needs at::parallel_for to use a worker thread"
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def making(where: str):
    """The context the inputs are created in."""
    return torch.inference_mode() if where == "inside" else contextlib.nullcontext()


@pytest.fixture(params=PATTERNS)
def pattern(request):
    p = make_pattern("kvslide-tp4r3", B, 2, 3, HQ, HKV)
    return p if request.param == "pattern" else p.to_layout(HQ, 640, HKV)


def op_pattern(pattern, device):
    return pattern.to(device) if isinstance(pattern, BlockLayout) else pattern


def assert_inference_tensor(t: torch.Tensor, config: str) -> None:
    assert t.is_inference(), f"[{config}] test setup: the output should be an inference tensor"


def assert_matches_ref(out, lse, ref_out, ref_lse, dtype, config: str) -> None:
    assert_close_to_ref(out, ref_out, dtype, config)
    assert_lse_close(lse, ref_lse, dtype, config)


def paged_inputs(seq_lens, dtype, gen, device):
    """Per-sequence keys and values (CPU) and a shuffled paged cache holding them."""
    keys = [randn((n, HKV, D), dtype, gen) for n in seq_lens]
    values = [randn((n, HKV, D), dtype, gen) for n in seq_lens]
    key_cache, value_cache, tables = build_paged_cache(keys, values, KVBS, gen, device)
    return keys, values, key_cache, value_cache, tables


# ---- attention -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", INPUTS_MADE)
def test_varlen_prefill(device, pattern, where, gen):
    dtype = dtype_for(device)
    q_lens, k_lens = [300, 1, 17, 64], [300, 200, 17, 129]
    config = f"varlen_prefill {device} inputs made {where} inference_mode, {THREADS} threads, {pattern!r}"
    with making(where):
        q = randn((sum(q_lens), HQ, D), dtype, gen)
        k, v = (randn((sum(k_lens), HKV, D), dtype, gen) for _ in range(2))
        cu_q, cu_k = cu_seqlens(q_lens, "cpu"), cu_seqlens(k_lens, "cpu")
    with one_thread():
        ref_out, ref_lse = reference.varlen_prefill_ref(q, k, v, cu_q, cu_k, SCALE, pattern)
    with making(where):
        q, k, v, cu_q, cu_k = (t.to(device) for t in (q, k, v, cu_q, cu_k))
    with torch.inference_mode():
        out, lse = ops.varlen_prefill(q, k, v, cu_q, cu_k, SCALE, op_pattern(pattern, device), return_lse=True)
    assert_inference_tensor(out, config)
    assert_matches_ref(out, lse, ref_out, ref_lse, dtype, config)


@pytest.mark.parametrize("where", INPUTS_MADE)
def test_paged_prefill(device, pattern, where, gen):
    dtype = dtype_for(device)
    seqs = [(0, 250), (100, 33), (511, 1), (16, 16)]  # (context, new)
    seq_lens, q_lens = [c + n for c, n in seqs], [n for _, n in seqs]
    config = f"paged_prefill {device} inputs made {where} inference_mode, {THREADS} threads, {pattern!r}"
    with making(where):
        keys, values, key_cache, value_cache, tables = paged_inputs(seq_lens, dtype, gen, device)
        q = randn((sum(q_lens), HQ, D), dtype, gen)
        cu_q, lens = cu_seqlens(q_lens, device), torch.tensor(seq_lens, dtype=torch.int32, device=device)
    with one_thread():
        ref_out, ref_lse = reference.varlen_prefill_ref(q, torch.cat(keys), torch.cat(values),
                                                        cu_seqlens(q_lens, "cpu"), cu_seqlens(seq_lens, "cpu"),
                                                        SCALE, pattern)
    with making(where):
        q = q.to(device)
    with torch.inference_mode():
        out, lse = ops.paged_prefill(q, key_cache, value_cache, tables, cu_q, lens, SCALE,
                                     op_pattern(pattern, device), return_lse=True)
    assert_inference_tensor(out, config)
    assert_matches_ref(out, lse, ref_out, ref_lse, dtype, config)


@pytest.mark.parametrize("where", INPUTS_MADE)
def test_paged_decode(device, pattern, where, gen):
    dtype = dtype_for(device)
    seq_lens = [1, 599, 0, 64, 300, 17]  # 0: a padding row
    config = f"paged_decode {device} inputs made {where} inference_mode, {THREADS} threads, {pattern!r}"
    with making(where):
        keys, values, key_cache, value_cache, tables = paged_inputs(seq_lens, dtype, gen, device)
        q = randn((len(seq_lens), HQ, D), dtype, gen)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    with one_thread():
        ref_out, ref_lse = reference.paged_decode_ref(q, key_cache, value_cache, tables, lens, SCALE, pattern)
    # poisoned outputs passed in: a row the kernel skipped stays NaN and fails the comparison
    with torch.inference_mode():
        out = poison(torch.empty(q.shape, dtype=dtype, device=device))
        lse = poison(torch.empty(HQ, len(seq_lens), dtype=torch.float32, device=device))
    with making(where):
        q = q.to(device)
    with torch.inference_mode():
        torch.ops.blocksparse_attn.paged_decode(out, q, key_cache, value_cache, tables, lens, SCALE,
                                                *op_pattern(pattern, device).op_args(), lse)
    assert_matches_ref(out, lse, ref_out, ref_lse, dtype, config)


# ---- KV cache ------------------------------------------------------------------------------------------

def assert_same(got: torch.Tensor, want: torch.Tensor, config: str) -> None:
    got = got.cpu()
    diff = (got != want) & ~(got.isnan() & want.isnan())
    assert not diff.any(), f"[{config}] {int(diff.sum())} elements differ, first at {diff.nonzero()[0].tolist()}"


@pytest.mark.parametrize("where", INPUTS_MADE)
def test_write_kv_cache(device, where, gen):
    dtype, nb, tokens = dtype_for(device), 24, 300
    config = f"write_kv_cache {device} inputs made {where} inference_mode, {THREADS} threads"
    with making(where):
        key_cache, value_cache = (randn((nb, HKV, KVBS, D), dtype, gen).to(device) for _ in range(2))
        key, value = (randn((tokens, HKV, D), dtype, gen).to(device) for _ in range(2))
        slots = torch.randperm(nb * KVBS, generator=gen)[:tokens]
        slots[::7] = -1  # skipped tokens
        slots = slots.to(device)
    want_key, want_value = reference.write_kv_cache_ref(key.cpu(), value.cpu(), key_cache.cpu(), value_cache.cpu(),
                                                        slots.cpu())
    with torch.inference_mode():
        ops.write_kv_cache(key, value, key_cache, value_cache, slots)
    assert_same(key_cache, want_key, config + " key_cache")
    assert_same(value_cache, want_value, config + " value_cache")


@pytest.mark.parametrize("where", INPUTS_MADE)
def test_copy_blocks(device, where, gen):
    dtype, nb = dtype_for(device), 16
    config = f"copy_blocks {device} inputs made {where} inference_mode, {THREADS} threads"
    with making(where):
        caches = [randn((2, nb, KVBS * HKV * D), dtype, gen).to(device) for _ in range(3)]
        # no block is both a destination and another pair's source: CUDA copies the pairs concurrently
        mapping = torch.tensor([[0, 5], [1, 9], [3, 3], [15, 2], [7, 12]], dtype=torch.int64, device=device)
    want = reference.copy_blocks_ref([c.cpu() for c in caches], mapping.cpu())
    with torch.inference_mode():
        ops.copy_blocks(caches, mapping)
    for layer, (got, expected) in enumerate(zip(caches, want)):
        assert_same(got, expected, f"{config} layer {layer}")


@pytest.mark.parametrize("where", INPUTS_MADE)
def test_swap_blocks(device, where, gen):
    dtype = dtype_for(device)
    config = f"swap_blocks {device} -> cpu inputs made {where} inference_mode, {THREADS} threads"
    with making(where):
        src = randn((2, 10, KVBS * HKV * D), dtype, gen).to(device)
        dst = randn((2, 6, KVBS * HKV * D), dtype, gen)
        mapping = torch.tensor([[9, 0], [2, 5], [4, 1]], dtype=torch.int64)
    want = reference.swap_blocks_ref(src.cpu(), dst, mapping)
    with torch.inference_mode():
        ops.swap_blocks(src, dst, mapping)
    assert_same(dst, want, config)
