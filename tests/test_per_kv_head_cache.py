"""The per-kv-head paged cache (issue 17): pages of one kv head, block_tables [S, Hkv, max_blocks],
slot_mapping [T, Hkv], and pages released by SparsePattern.pages_read_later.

Every case builds a sequence's keys and values, stores each kv head's tokens in its own shuffled
pages, then releases every page the rule says no later query reads (its table entry -1) and either
poisons the released physical pages with NaN or hands them to another sequence, which writes its own
keys there. Attention over what is left must equal the float32 reference over the full, unreleased
keys: chunked prefill, decode, and batches that mix both, for sliding and homo_head patterns, GQA /
MQA, tensor-parallel head offsets, kv blocks smaller and larger than the sparse block, fp8 pages.
"""
from __future__ import annotations

import pytest
import torch

from blocksparse_attn import ops, reference
from blocksparse_attn.layout import SparsePattern

from _helpers import (DTYPE_IDS, NAN, assert_close_to_ref, cu_seqlens, make_pattern, one_thread, poison, randn,
                      skip_unsupported)

# (head mode, Hq, Hkv, D, sparse block, local blocks, vert stride, kv block); the 64-blocks with D <= 128
# take the Hopper prefill kernel on an H100 / H200 (kv block 16 and 64 through its TMA page loads), the
# others the portable one.
CASES = [
    ("qslide", 8, 2, 64, 16, 2, 8, 16),
    ("homo", 8, 2, 64, 16, 2, 4, 8),
    ("kvslide", 8, 4, 128, 64, 2, 4, 16),
    ("qslide-tp2r1", 4, 1, 64, 16, 1, 8, 32),
    ("kvslide-tp4r3", 8, 2, 128, 64, 3, 8, 64),
]
CASE_IDS = [f"{c[0]}-h{c[1]}kv{c[2]}-d{c[3]}-b{c[4]}l{c[5]}v{c[6]}-kvbs{c[7]}" for c in CASES]
DTYPES = [torch.float32, torch.bfloat16]


class PerHeadCache:
    """Sequences' keys/values (CPU [len, Hkv, D]) in per-kv-head pages: caches [NB, 1, kvbs, D] on `device`
    (every slot no sequence owns is NaN), tables [S, Hkv, max_blocks] int32 with one padding column of
    NaN-only spare pages; page ids shuffled over all (sequence, kv head, page)."""

    def __init__(self, keys, values, kvbs: int, gen: torch.Generator, device, cache_dtype=None, spare: int = 3):
        hkv, d = keys[0].shape[1], keys[0].shape[2]
        self.kvbs, self.hkv = kvbs, hkv
        self.used = [-(-k.shape[0] // kvbs) for k in keys]
        num_blocks = sum(self.used) * hkv + spare
        perm = torch.randperm(num_blocks, generator=gen)
        spare_ids = perm[sum(self.used) * hkv:]
        dtype = cache_dtype or keys[0].dtype
        key_cache = torch.full((num_blocks, 1, kvbs, d), NAN, dtype=torch.float32)
        value_cache = torch.full_like(key_cache, NAN)
        max_blocks = max(max(self.used), 1) + 1
        tables = spare_ids[torch.randint(len(spare_ids), (len(keys), hkv, max_blocks), generator=gen)]
        start = 0
        for r, (k, v) in enumerate(zip(keys, values)):
            t = torch.arange(k.shape[0])
            for g in range(hkv):
                pages = perm[start: start + self.used[r]]
                start += self.used[r]
                tables[r, g, : self.used[r]] = pages
                key_cache[pages[t // kvbs], 0, t % kvbs] = k[:, g].float()
                value_cache[pages[t // kvbs], 0, t % kvbs] = v[:, g].float()
        self.key_cache, self.value_cache = key_cache.to(dtype).to(device), value_cache.to(dtype).to(device)
        self.tables = tables.to(torch.int32)
        self.device = device

    def release(self, pattern: SparsePattern, num_heads: int, read_from: list[int], how: str,
                gen: torch.Generator) -> int:
        """Releases every page of sequence r that no query at a position >= read_from[r] reads (its entries
        become -1); how = "poison" fills the released pages with NaN, "reuse" writes other finite values
        into them (another sequence's keys). Returns the number of released pages."""
        released = []
        for r, first_query in enumerate(read_from):
            keep = pattern.pages_read_later(num_heads, self.hkv, first_query, self.kvbs, num_pages=self.used[r])
            row = self.tables[r, :, : self.used[r]]
            released += row[~keep].tolist()
            row[~keep] = -1
        if released:
            ids = torch.tensor(released, device=self.device)
            for cache in (self.key_cache, self.value_cache):
                if how == "poison":
                    cache[ids] = torch.full_like(cache[ids], NAN)
                else:
                    cache[ids] = randn(cache[ids].shape, torch.float32, gen).to(cache.dtype).to(self.device)
        return len(released)

    def block_tables(self) -> torch.Tensor:
        return self.tables.to(self.device)


def _inputs(case, dtype, lengths, gen):
    mode, hq, hkv, d, b, local, vert, kvbs = case
    pattern = make_pattern(mode, b, local, vert, hq, hkv)
    keys = [randn((n, hkv, d), dtype, gen) for n in lengths]
    values = [randn((n, hkv, d), dtype, gen) for n in lengths]
    return pattern, keys, values


@pytest.mark.parametrize("paged_path", ["direct", "gather"])
@pytest.mark.parametrize("how", ["poison", "reuse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[t] for t in DTYPES])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunked_prefill_and_decodes_after_release(device, case, dtype, how, paged_path, gen, monkeypatch):
    """One paged_prefill over a batch of whole prompts, chunks with context and single-token rows (decodes
    batched into the prefill), every page the rule releases at each sequence's first new position gone;
    on CUDA also with the K/V gathered into contiguous tensors first (BSA_PAGED_PREFILL=gather: released
    pages' ids are -1 and read as zeros there, never used)."""
    skip_unsupported(device, dtype)
    if paged_path == "gather" and device != "cuda":
        pytest.skip("BSA_PAGED_PREFILL is a CUDA setting (the CPU kernel gathers every sequence anyway)")
    monkeypatch.setenv("BSA_PAGED_PREFILL", paged_path)
    mode, hq, hkv, d, b, local, vert, kvbs = case
    u = b // 16  # lengths in units of 16-token sparse blocks, so 64-blocks reach past the band too
    contexts_and_new = [(0, 37 * u), (257 * u, 100 * u), (511 * u, 1), (40 * u + 3, 67 * u), (700 * u, 1)]
    lengths = [c + n for c, n in contexts_and_new]
    pattern, keys, values = _inputs(case, dtype, lengths, gen)
    cache = PerHeadCache(keys, values, kvbs, gen, device)
    released = cache.release(pattern, hq, [c for c, _ in contexts_and_new], how, gen)
    assert released > 0, "test setup: the rule released nothing; the case would pass without it"
    q_lens = [n for _, n in contexts_and_new]
    q = randn((sum(q_lens), hq, d), dtype, gen)
    scale = d ** -0.5
    out = poison(torch.empty_like(q, device=device))
    ops.paged_prefill(q.to(device), cache.key_cache, cache.value_cache, cache.block_tables(),
                      cu_seqlens(q_lens, device), torch.tensor(lengths, dtype=torch.int32, device=device), scale,
                      pattern, out=out)
    with one_thread():
        start = 0
        for r, n in enumerate(q_lens):
            ref, _ = reference.attention_ref(q[start: start + n], keys[r], values[r], scale, pattern)
            assert_close_to_ref(out[start: start + n], ref, dtype, f"{case} seq {r} ({how})")
            start += n


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn], ids=["model", "e4m3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[t] for t in DTYPES])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_after_release(device, case, dtype, cache_dtype, gen):
    """paged_decode with the pages released for the decoded position (a padding row included); an fp8
    cache against the reference over its dequantized keys."""
    skip_unsupported(device, dtype)
    mode, hq, hkv, d, b, local, vert, kvbs = case
    u = b // 16
    lengths = [1, 17 * u, 300 * u + 5, 513 * u, 0]
    pattern, keys, values = _inputs(case, dtype, lengths, gen)
    scale_k, scale_v = torch.tensor([0.5]), torch.tensor([2.0])
    if cache_dtype is not None:  # what the cache stores, and what the reference reads back
        stored = [(reference.quantize_fp8(k, cache_dtype, scale_k), reference.quantize_fp8(v, cache_dtype, scale_v))
                  for k, v in zip(keys, values)]
        cache = PerHeadCache([k for k, _ in stored], [v for _, v in stored], kvbs, gen, device)
        keys = [reference.dequantize(k, scale_k) for k, _ in stored]
        values = [reference.dequantize(v, scale_v) for _, v in stored]
        k_scale, v_scale = scale_k.to(device), scale_v.to(device)
    else:
        cache = PerHeadCache(keys, values, kvbs, gen, device)
        k_scale = v_scale = None
    assert cache.release(pattern, hq, [max(n - 1, 0) for n in lengths], "poison", gen) > 0
    q = randn((len(lengths), hq, d), dtype, gen)
    scale = d ** -0.5
    out = poison(torch.empty_like(q, device=device))
    ops.paged_decode(q.to(device), cache.key_cache, cache.value_cache, cache.block_tables(),
                     torch.tensor(lengths, dtype=torch.int32, device=device), scale, pattern, out=out,
                     k_scale=k_scale, v_scale=v_scale)
    with one_thread():
        for r, n in enumerate(lengths):
            if n == 0:
                assert (out[r] == 0).all(), "a padding row must come back zero"
                continue
            ref, _ = reference.attention_ref(q[r: r + 1], keys[r], values[r], scale, pattern)
            assert_close_to_ref(out[r: r + 1], ref, dtype, f"{case} seq {r} ({cache_dtype})")


def test_layouts_agree_on_the_same_keys(device, gen):
    """Nothing released: the per-kv-head cache and the shared-page cache give the same outputs (the two
    table layouts address the same keys)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    hq, hkv, d, kvbs, lengths = 8, 2, 64, 16, [70, 129, 300]
    pattern = SparsePattern(16, 2, 4, 1, False, 0)
    keys = [randn((n, hkv, d), dtype, gen) for n in lengths]
    values = [randn((n, hkv, d), dtype, gen) for n in lengths]
    per_head = PerHeadCache(keys, values, kvbs, gen, device)
    shared_k = torch.cat(keys).to(device)
    shared_v = torch.cat(values).to(device)
    q = randn((sum(lengths), hq, d), dtype, gen).to(device)
    cu = cu_seqlens(lengths, device)
    want = ops.varlen_prefill(q, shared_k, shared_v, cu, cu, d ** -0.5, pattern)
    got = ops.paged_prefill(q, per_head.key_cache, per_head.value_cache, per_head.block_tables(), cu,
                            torch.tensor(lengths, dtype=torch.int32, device=device), d ** -0.5, pattern)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2 if dtype != torch.float32 else 1e-5,
                               rtol=2e-2 if dtype != torch.float32 else 1e-5)


def test_write_kv_cache_per_kv_head(device, gen):
    """write_kv_cache with slot_mapping [T, Hkv]: kv head h of token t lands at slot [t, h] of a one-head-
    per-page cache; negative slots are skipped."""
    dtype = torch.float16
    t, hkv, d, nb, kvbs = 9, 3, 64, 12, 4
    key, value = randn((t, hkv, d), dtype, gen), randn((t, hkv, d), dtype, gen)
    slots = torch.randperm(nb * kvbs, generator=gen)[: t * hkv].view(t, hkv)
    slots[2, 1] = -1
    slots[5] = -1
    key_cache = randn((nb, 1, kvbs, d), dtype, gen)
    value_cache = randn((nb, 1, kvbs, d), dtype, gen)
    want_k, want_v = reference.write_kv_cache_ref(key, value, key_cache, value_cache, slots)
    kc, vc = key_cache.to(device), value_cache.to(device)
    ops.write_kv_cache(key.to(device), value.to(device), kc, vc, slots.to(device))
    assert torch.equal(kc.cpu(), want_k) and torch.equal(vc.cpu(), want_v)


def _small_call(gen, device="cpu", dtype=torch.float32):
    pattern = SparsePattern(16, 1, 8, 1, False, 0)  # 4 q heads per kv head: 4 of 8 residues kept
    keys = [randn((200, 2, 64), dtype, gen)]
    cache = PerHeadCache(keys, keys, 16, gen, device)
    return pattern, cache


def test_reading_a_released_page_is_an_error(device, gen, monkeypatch):
    """A released entry (-1) that a query of the call sees is refused, naming the entry and the head
    (on CUDA under BSA_CHECK_INPUTS=1, which runs the CPU's value checks on host copies)."""
    monkeypatch.setenv("BSA_CHECK_INPUTS", "1")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    pattern, cache = _small_call(gen, device, dtype)
    assert cache.release(pattern, 8, [199], "poison", gen) > 0
    q = randn((1, 8, 64), dtype, gen).to(device)
    lens = torch.tensor([200], dtype=torch.int32, device=device)
    tables = cache.block_tables()
    ops.paged_decode(q, cache.key_cache, cache.value_cache, tables, lens, 1.0, pattern)  # releases fit
    # a chunk starting before the released position reads pages released for later queries only
    with pytest.raises(RuntimeError, match=r"block_tables\[0, \d+, \d+\] = -1 \(a released page\), but q head"):
        ops.paged_prefill(randn((150, 8, 64), dtype, gen).to(device), cache.key_cache, cache.value_cache, tables,
                          torch.tensor([0, 150], dtype=torch.int32, device=device), lens, 1.0, pattern)


def test_per_kv_head_bad_inputs(gen):
    pattern, cache = _small_call(gen)
    q = randn((1, 8, 64), torch.float32, gen)
    lens = torch.tensor([200], dtype=torch.int32)
    shared = cache.key_cache.expand(-1, 2, -1, -1).contiguous()
    with pytest.raises(RuntimeError, match=r"key_cache must be \[num_blocks, 1, kv_block_size, head_size\]"):
        ops.paged_decode(q, shared, shared, cache.tables, lens, 1.0, pattern)
    tables = cache.tables.clone()
    tables[0, 1, 0] = -2
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 1, 0\] = -2 is not a cache block.*or -1"):
        ops.paged_decode(q, cache.key_cache, cache.value_cache, tables, lens, 1.0, pattern)
    with pytest.raises(RuntimeError, match="block_tables has 3 kv heads"):
        ops.paged_decode(q, cache.key_cache, cache.value_cache, torch.cat([cache.tables, cache.tables[:, :1]], 1),
                         lens, 1.0, pattern)
    shared_tables = cache.tables[:, 0].clone()
    shared_tables[0, 0] = -1  # -1 means "released" only in per-kv-head tables
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 0\] = -1 is not a cache block: expected \[0, \d+\)$"):
        ops.paged_decode(q, shared, shared, shared_tables, lens, 1.0, pattern)
    key = randn((3, 2, 64), torch.float32, gen)
    before = shared.clone()
    with pytest.raises(RuntimeError, match=r"slot_mapping \[num_tokens, num_kv_heads\].*key_cache must be "
                                           r"\[num_blocks, 1, kv_block_size, head_size\]"):
        ops.write_kv_cache(key, key, shared, shared, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"slot_mapping.size\(1\) must be 2 \(one slot per kv head of key\)"):
        ops.write_kv_cache(key, key, cache.key_cache, cache.value_cache, torch.zeros(3, 3, dtype=torch.int64))
    torch.testing.assert_close(shared, before, atol=0, rtol=0, equal_nan=True)  # the rejected calls wrote nothing


@pytest.mark.parametrize("homo_head", [False, True], ids=["sliding", "homo"])
def test_backend_serves_per_kv_head_pages_like_shared_ones(device, homo_head, gen):
    """BlocksparseFlashAttentionImpl over both layouts, step by step: two prompts in chunks, one arriving
    while the other decodes (mixed batches), then decodes. The per-kv-head run releases after every step
    the pages the rule gives up, poisons them, and hands them to the next pages it allocates (the other
    sequence's); every step's output equals the shared-page run's."""
    from blocksparse_attn import BlocksparseFlashAttentionImpl, BlocksparseFlashAttentionMetadata, BlocksparseParams
    from blocksparse_attn.kv_cache import allocate_kv_cache

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    hq, hkv, d, kvbs = 8, 2, 64, 16
    params = BlocksparseParams(max_seqlen=2048, num_heads=hq, num_kv_heads=hkv, block_size=16, local_blocks=2,
                               vert_stride=8, homo_head=homo_head)
    impl = BlocksparseFlashAttentionImpl(hq, d, d ** -0.5, hkv, blocksparse_params=params)
    pattern = impl.pattern
    nb = 200
    shared_cache = allocate_kv_cache(nb, kvbs, hkv, d, dtype, device).fill_(NAN)
    head_cache = allocate_kv_cache(nb * hkv, kvbs, 1, d, dtype, device).fill_(NAN)
    free_shared = torch.randperm(nb, generator=gen).tolist()
    free_pages = torch.randperm(nb * hkv, generator=gen).tolist()
    prompts = {0: 300, 1: 230}
    arrive = {0: 0, 1: 3}
    computed = {0: 0, 1: 0}
    shared_rows, head_rows = {0: [], 1: []}, {0: [[] for _ in range(hkv)], 1: [[] for _ in range(hkv)]}
    released = 0
    for step in range(12):
        batch = []  # (sequence, new tokens): prefills first, then decodes
        for r in (0, 1):
            if step >= arrive[r] and computed[r] < prompts[r]:
                batch.append((r, min(96, prompts[r] - computed[r])))
        batch += [(r, 1) for r in (0, 1) if step >= arrive[r] and computed[r] >= prompts[r]]
        for r, n in batch:
            need = -(-(computed[r] + n) // kvbs)
            while len(shared_rows[r]) < need:
                shared_rows[r].append(free_shared.pop())
                for g in range(hkv):
                    head_rows[r][g].append(free_pages.pop())
        total = sum(n for _, n in batch)
        q = randn((total, hq, d), dtype, gen).to(device)
        k = randn((total, hkv, d), dtype, gen).to(device)
        v = randn((total, hkv, d), dtype, gen).to(device)
        args = ([n for _, n in batch], [computed[r] for r, _ in batch])
        md_shared = BlocksparseFlashAttentionMetadata.build(*args, [shared_rows[r] for r, _ in batch], kvbs,
                                                            device=device)
        md_head = BlocksparseFlashAttentionMetadata.build(*args, [head_rows[r] for r, _ in batch], kvbs,
                                                          device=device)
        assert md_head.slot_mapping.shape == (total, hkv)
        want = impl.forward(q, k, v, shared_cache, md_shared)
        got = impl.forward(q, k, v, head_cache, md_head)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"step {step}: {m}")
        for r, n in batch:
            computed[r] += n
            keep = pattern.pages_read_later(hq, hkv, computed[r], kvbs, num_pages=len(head_rows[r][0]))
            for g in range(hkv):
                for p, page in enumerate(head_rows[r][g]):
                    if page >= 0 and not keep[g, p]:
                        head_cache[:, page].fill_(NAN)
                        free_pages.append(page)  # the next allocation, of either sequence, reuses it
                        head_rows[r][g][p] = -1
                        released += 1
    assert released > 0
