"""Determinism: the same inputs give bitwise-identical outputs on repeated calls, for every op.

The CPU kernels split work over (sequence, head, query block) units or whole decode sequences, and each
unit is computed by one thread in a fixed order (no atomics, no cross-thread reductions), so the result
does not depend on the scheduling; the tests also check that it does not depend on the number of threads.
On CUDA the same tests run where a GPU is visible (the prefill kernel and the planner use no atomics on
the output; a kernel that did would be listed here as the exception).
"""
from __future__ import annotations

import pytest
import torch

from _helpers import build_paged_cache, cu_seqlens, make_pattern, randn
from blocksparse_attn import (BlocksparseFlashAttentionBackend, BlocksparseFlashAttentionImpl,
                              BlocksparseFlashAttentionMetadata, ops)
from blocksparse_attn.layout import BlockLayout

REPEATS = 3
HQ, HKV, D, B, KVBS = 8, 2, 64, 16, 16


def dtype_for(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaN == NaN and -0.0 != 0.0."""
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bitwise_equal(results, what: str) -> None:
    first = [bits(t) for t in results[0]]
    for i, other in enumerate(results[1:], 1):
        for j, (a, b) in enumerate(zip(first, (bits(t) for t in other))):
            assert torch.equal(a, b), f"{what}: call {i} output {j} differs bitwise from call 0 " \
                                      f"({int((a != b).sum())} elements)"


def repeated(fn, what: str, threads=(None,)):
    """Calls fn (which returns fresh output tensors) REPEATS times per thread count; all bitwise equal."""
    results = []
    saved = torch.get_num_threads()
    try:
        for n in threads:
            if n is not None:
                torch.set_num_threads(n)
            results += [fn() for _ in range(REPEATS)]
    finally:
        torch.set_num_threads(saved)
    assert_bitwise_equal(results, what)


def thread_counts(device: str):
    return (None, 1, 2) if device == "cpu" else (None,)


@pytest.fixture(params=("pattern", "layout"))
def pattern(request):
    p = make_pattern("kvslide-tp4r3", B, 2, 3, HQ, HKV)
    return p if request.param == "pattern" else p.to_layout(HQ, 600, HKV)


def _op_pattern(pattern, device):
    return pattern.to(device) if isinstance(pattern, BlockLayout) else pattern


def test_varlen_prefill_deterministic(device, pattern, gen):
    dtype = dtype_for(device)
    q_lens, k_lens = [300, 1, 17, 64], [300, 200, 17, 129]
    q = randn((sum(q_lens), HQ, D), dtype, gen).to(device)
    k, v = (randn((sum(k_lens), HKV, D), dtype, gen).to(device) for _ in range(2))
    cu_q, cu_k = cu_seqlens(q_lens, device), cu_seqlens(k_lens, device)
    p = _op_pattern(pattern, device)
    repeated(lambda: ops.varlen_prefill(q, k, v, cu_q, cu_k, 0.125, p, return_lse=True), "varlen_prefill",
             thread_counts(device))


def test_paged_prefill_deterministic(device, pattern, gen):
    dtype = dtype_for(device)
    seqs = [(0, 250), (100, 33), (511, 1), (16, 16)]  # (context, new)
    seq_lens = [c + n for c, n in seqs]
    keys = [randn((n, HKV, D), dtype, gen) for n in seq_lens]
    values = [randn((n, HKV, D), dtype, gen) for n in seq_lens]
    key_cache, value_cache, tables = build_paged_cache(keys, values, KVBS, gen, device)
    q = randn((sum(n for _, n in seqs), HQ, D), dtype, gen).to(device)
    cu_q, lens = cu_seqlens([n for _, n in seqs], device), torch.tensor(seq_lens, dtype=torch.int32, device=device)
    p = _op_pattern(pattern, device)
    repeated(lambda: ops.paged_prefill(q, key_cache, value_cache, tables, cu_q, lens, 0.125, p, return_lse=True),
             "paged_prefill", thread_counts(device))


def test_paged_decode_deterministic(device, pattern, gen):
    dtype = dtype_for(device)
    seq_lens = [1, 599, 0, 64, 300, 17]
    keys = [randn((n, HKV, D), dtype, gen) for n in seq_lens]
    values = [randn((n, HKV, D), dtype, gen) for n in seq_lens]
    key_cache, value_cache, tables = build_paged_cache(keys, values, KVBS, gen, device)
    q = randn((len(seq_lens), HQ, D), dtype, gen).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    p = _op_pattern(pattern, device)
    repeated(lambda: ops.paged_decode(q, key_cache, value_cache, tables, lens, 0.125, p, return_lse=True),
             "paged_decode", thread_counts(device))


def test_cache_ops_deterministic(device, gen):
    """write_kv_cache, copy_blocks and swap_blocks give the same cache on every call. On the CPU the
    slot mapping also names one slot several times (the last token written wins, every time); on CUDA
    such a mapping is a race that the spec leaves unspecified (engines never produce one)."""
    dtype = dtype_for(device)
    nb = 12
    shape = BlocksparseFlashAttentionBackend.get_kv_cache_shape(nb, KVBS, HKV, D)
    base = randn(shape, dtype, gen).to(device)
    key, value = (randn((40, HKV, D), dtype, gen).to(device) for _ in range(2))
    slots = torch.randint(0, nb * KVBS, (40,), generator=gen)
    if device == "cpu":
        slots[10:20] = slots[0]  # the same slot written by several tokens
    else:
        slots = torch.randperm(nb * KVBS, generator=gen)[:40]
    slots[5] = -1
    slots = slots.to(device)
    mapping = torch.tensor([[0, 5], [1, 6], [0, 7], [11, 2]], dtype=torch.int64)

    def run():
        cache = base.clone()
        key_cache, value_cache = cache[0].view(nb, HKV, KVBS, D), cache[1].view(nb, HKV, KVBS, D)
        ops.write_kv_cache(key, value, key_cache, value_cache, slots)
        ops.copy_blocks([cache], mapping.to(device))
        dst = torch.zeros_like(cache)
        ops.swap_blocks(cache, dst, mapping)
        return cache, dst

    repeated(run, "write_kv_cache + copy_blocks + swap_blocks", thread_counts(device))
    if device == "cpu":
        key_cache, value_cache = (base[i].clone().view(nb, HKV, KVBS, D) for i in range(2))
        ops.write_kv_cache(key, value, key_cache, value_cache, slots)
        slot = int(slots[0])
        last = int((slots == slot).nonzero().max())
        assert torch.equal(key_cache[slot // KVBS, :, slot % KVBS], key[last]), \
            "write_kv_cache: the last token naming a slot must win"


def test_backend_deterministic(device, gen):
    """A mixed batch (chunked prefill, prefill, decodes, padding) through Impl.forward."""
    dtype = dtype_for(device)
    impl = BlocksparseFlashAttentionImpl(HQ, D, 0.125, HKV, blocksparse_params=dict(
        max_seqlen=4096, block_size=B, local_blocks=2, vert_stride=5, homo_head_group=True))
    shape = BlocksparseFlashAttentionBackend.get_kv_cache_shape(64, KVBS, HKV, D)
    base = randn(shape, dtype, gen).to(device)
    tables = [list(range(0, 20)), list(range(20, 30)), list(range(30, 50)), list(range(50, 64))]
    md_args = ([40, 100, 1, 1], [200, 0, 300, 17], tables, KVBS)
    total = 142 + 2
    q = randn((total, HQ * D), dtype, gen).to(device)
    k, v = (randn((total, HKV * D), dtype, gen).to(device) for _ in range(2))

    def run():
        cache = base.clone()
        md = BlocksparseFlashAttentionMetadata.build(*md_args, device=device)
        return impl.forward(q, k, v, cache, md), cache

    repeated(run, "backend forward", thread_counts(device))
