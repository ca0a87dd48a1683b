"""The vLLM-style backend (Params, Metadata, Backend, Impl) driven like a serving engine.

A tiny engine below owns one layer's paged cache, hands out physical blocks in shuffled order, packs
each step's tokens as vLLM does (prefills, then decodes, then padding) through one fused QKV tensor,
and checks every output row against blocksparse_attn.reference.attention_ref over that sequence's full
k/v history. The reference pattern is written here over GLOBAL heads from spec §2 (head_offset 0),
and each tensor-parallel rank's output is compared with its slice of heads, so the Params -> pattern
translation (step sign, kv-head sliding, head offset) is checked rather than reused.
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from _helpers import DTYPE_IDS, NAN, assert_close_to_ref, assert_pattern_is_sparse, poison, skip_unsupported

from blocksparse_attn import (BlocksparseFlashAttentionBackend, BlocksparseFlashAttentionImpl,
                              BlocksparseFlashAttentionMetadata, BlocksparseParams, allocate_kv_cache,
                              split_kv_cache)
from blocksparse_attn import reference
from blocksparse_attn.layout import SparsePattern

# ---- the axes ----------------------------------------------------------------------------------------
HQ, HKV, D = 8, 2, 64  # per rank
BLOCK, LOCAL = 16, 2
SCALE = 1.0 / math.sqrt(D)
MAX_SEQLEN = 512
# (sparse block size B, cache block size kvbs): equal, kvbs a multiple of B, B a multiple of kvbs
BLOCK_SIZES = ((16, 16), (16, 32), (32, 16))
# name -> BlocksparseParams' head options and vert_stride. V = 7 with 2 kv heads makes the kv-head step 3,
# V = 9 with 4 global kv heads makes it 2, so a step taken as 1 (or as the q-head step) fails.
MODES = {
    "qslide": dict(homo_head=False, homo_head_group=False, tp_size=1, tp_rank=0, vert_stride=3),
    "homo": dict(homo_head=True, homo_head_group=False, tp_size=1, tp_rank=0, vert_stride=3),
    "kvslide": dict(homo_head=False, homo_head_group=True, tp_size=1, tp_rank=0, vert_stride=7),
    "qslide-tp2r1": dict(homo_head=False, homo_head_group=False, tp_size=2, tp_rank=1, vert_stride=3),
    "kvslide-tp2r1": dict(homo_head=False, homo_head_group=True, tp_size=2, tp_rank=1, vert_stride=9),
}
ENGINE_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}  # one per device for the long scenarios
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def engine_dtype(device: str) -> torch.dtype:
    return ENGINE_DTYPE[torch.device(device).type]


def global_pattern(mode: str, block_size: int = BLOCK) -> SimpleNamespace:
    """Spec §2 over all tp_size * HQ heads: s = 0 (homo_head), max(1, int(V / total kv heads)) sliding by
    kv head (homo_head_group), else max(1, int(V / total q heads)); head_offset 0 (global indices)."""
    m = MODES[mode]
    v, tp = m["vert_stride"], m["tp_size"]
    step = 0 if m["homo_head"] else max(1, int(v / (tp * (HKV if m["homo_head_group"] else HQ))))
    return SimpleNamespace(block_size=block_size, local_blocks=LOCAL, vert_stride=v, head_sliding_step=step,
                           slide_by_kv_head=m["homo_head_group"], head_offset=0)


def make_impl(mode: str = "qslide", block_size: int = BLOCK, **overrides) -> BlocksparseFlashAttentionImpl:
    m = MODES[mode]
    params = dict(max_seqlen=MAX_SEQLEN, block_size=block_size, local_blocks=LOCAL, vert_stride=m["vert_stride"],
                  homo_head=m["homo_head"], homo_head_group=m["homo_head_group"], tp_size=m["tp_size"],
                  tp_rank=m["tp_rank"])
    return BlocksparseFlashAttentionImpl(HQ, D, SCALE, HKV, blocksparse_params=params, **overrides)


# ---- a minimal engine ---------------------------------------------------------------------------------

class Engine:
    """One attention layer of one tensor-parallel rank, served like vLLM serves it.

    Keeps each sequence's GLOBAL-head k/v history on the CPU (in the test dtype) for the reference; the
    rank only ever sees its own heads. The cache starts as NaN, so a kernel that reads a slot nobody
    wrote (or lets P = 0 meet an unwritten V) produces NaN and fails.
    """

    def __init__(self, device, dtype, gen, mode="qslide", block_size=BLOCK, kv_block_size=16, num_blocks=96):
        self.device, self.dtype, self.gen, self.mode = device, dtype, gen, mode
        self.tp_size, self.rank = MODES[mode]["tp_size"], MODES[mode]["tp_rank"]
        self.hq_all, self.hkv_all = self.tp_size * HQ, self.tp_size * HKV
        self.kvbs = kv_block_size
        self.impl = make_impl(mode, block_size)
        self.pattern = global_pattern(mode, block_size)
        shape = BlocksparseFlashAttentionBackend.get_kv_cache_shape(num_blocks, kv_block_size, HKV, D)
        self.kv_cache = torch.full(shape, NAN, dtype=dtype, device=device)
        self.free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
        self.k, self.v, self.tables = {}, {}, {}

    def length(self, seq) -> int:
        return self.k[seq].shape[0] if seq in self.k else 0

    def step(self, requests, padding: int = 0, expect_decodes: int | None = None, config: str = ""):
        """requests: [(seq id, number of new tokens)], decodes (1 new token, some context) last.
        Runs one forward over the packed batch plus `padding` rows and checks every row."""
        query_lens = [n for _, n in requests]
        context_lens = [self.length(s) for s, _ in requests]
        for (seq, n), ctx in zip(requests, context_lens):
            table = self.tables.setdefault(seq, [])
            while len(table) * self.kvbs < ctx + n:
                table.append(self.free_blocks.pop())
        md = BlocksparseFlashAttentionMetadata.build(query_lens, context_lens, [self.tables[s] for s, _ in requests],
                                                     self.kvbs, device=self.device)
        if expect_decodes is not None:
            assert md.num_decode_tokens == expect_decodes, f"[{config}] decode rule: {md}"

        num_tokens = sum(query_lens)
        total = num_tokens + padding
        q = (torch.randn(total, self.hq_all, D, generator=self.gen)).to(self.dtype)
        k = (torch.randn(total, self.hkv_all, D, generator=self.gen)).to(self.dtype)
        v = (torch.randn(total, self.hkv_all, D, generator=self.gen)).to(self.dtype)
        start = 0
        for (seq, n) in requests:
            new_k, new_v = k[start: start + n], v[start: start + n]
            self.k[seq] = torch.cat([self.k[seq], new_k]) if seq in self.k else new_k
            self.v[seq] = torch.cat([self.v[seq], new_v]) if seq in self.v else new_v
            start += n

        # The rank's heads, packed like a fused QKV projection output [T, (HQ + 2 HKV) * D].
        qh, kh = slice(self.rank * HQ, (self.rank + 1) * HQ), slice(self.rank * HKV, (self.rank + 1) * HKV)
        fused = torch.cat([q[:, qh].flatten(1), k[:, kh].flatten(1), v[:, kh].flatten(1)], 1).to(self.device)
        query, key, value = fused.split([HQ * D, HKV * D, HKV * D], dim=1)
        output = poison(torch.empty(total, HQ * D, dtype=self.dtype, device=self.device))
        out = self.impl.forward(query, key, value, self.kv_cache, md, output=output)
        assert out.data_ptr() == output.data_ptr(), f"[{config}] forward did not write into output="
        out = out.view(total, HQ, D)

        start = 0
        for (seq, n), ctx in zip(requests, context_lens):
            ref, _ = reference.attention_ref(q[start: start + n], self.k[seq], self.v[seq], SCALE, self.pattern)
            assert_close_to_ref(out[start: start + n], ref[:, qh], self.dtype,
                                f"{config} seq {seq} ctx {ctx} new {n}")
            start += n
        pad = out[num_tokens:].float().cpu()
        assert torch.equal(pad, torch.zeros_like(pad)), f"[{config}] padding rows are not zero"
        return md


def _config(device, dtype, mode, block_size=BLOCK, kvbs=16) -> str:
    return f"{device} {DTYPE_IDS[dtype]} {mode} B={block_size} kvbs={kvbs}"


# ---- engine scenarios ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_prefill_batch_then_decode(device, mode, gen):
    """Several prompts at once (context-free prefill), then decode steps that read what prefill cached."""
    dtype = engine_dtype(device)
    config = _config(device, dtype, mode)
    assert_pattern_is_sparse(global_pattern(mode), HQ * MODES[mode]["tp_size"], HKV * MODES[mode]["tp_size"],
                             300, config)
    eng = Engine(device, dtype, gen, mode)
    md = eng.step([(0, 37), (1, 300), (2, 129), (3, 1)], padding=2, expect_decodes=0, config=config)
    assert md.block_tables.numel() == 0  # no context anywhere: vLLM's empty tables, contiguous k/v path
    for _ in range(3):
        eng.step([(0, 1), (1, 1), (2, 1), (3, 1)], expect_decodes=4, config=config)


@pytest.mark.parametrize("block_size,kv_block_size", BLOCK_SIZES)
def test_chunked_prefill(device, block_size, kv_block_size, gen):
    """A long prompt in three chunks (each a prefill with context), beside a short prompt in two."""
    dtype = engine_dtype(device)
    config = _config(device, dtype, "qslide", block_size, kv_block_size)
    eng = Engine(device, dtype, gen, block_size=block_size, kv_block_size=kv_block_size)
    eng.step([(0, 96), (1, 45)], config=config)                     # first chunks, no context
    eng.step([(0, 113), (1, 40)], expect_decodes=0, config=config)  # paged prefill: context + new
    eng.step([(0, 91)], config=config)                               # unaligned tail, 300 in all
    assert eng.length(0) == 300
    eng.step([(1, 1), (0, 1)], expect_decodes=2, config=config)


def test_decode_run(device, gen):
    """Many decode steps crossing cache-block and sparse-block boundaries, with a padded batch."""
    dtype = engine_dtype(device)
    config = _config(device, dtype, "qslide")
    eng = Engine(device, dtype, gen)
    eng.step([(0, 250), (1, 31), (2, 16)], config=config)
    for i in range(20):
        eng.step([(0, 1), (1, 1), (2, 1)], padding=i % 3, expect_decodes=3, config=f"{config} step {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", MODES)
def test_mixed_batch(device, dtype, mode, gen):
    """Chunked prefill, a fresh prompt, a one-token prefill with context and decodes, in one forward."""
    skip_unsupported(device, dtype)
    config = _config(device, dtype, mode)
    eng = Engine(device, dtype, gen, mode)
    eng.step([(0, 120), (2, 200), (3, 33), (4, 70)], config=config)
    # seq 4's single token comes before a prompt: not in the trailing run, so answered as a prefill.
    eng.step([(0, 97), (4, 1), (1, 150), (2, 1), (3, 1)], padding=3, expect_decodes=2, config=config)
    eng.step([(1, 1), (0, 1), (2, 1)], config=config)


def test_profiling_run_with_empty_cache(device, gen):
    """vLLM's memory-profiling pass: kv_cache is empty, prefill attends among the new tokens only."""
    dtype = engine_dtype(device)
    impl = make_impl()
    pattern = global_pattern("qslide")
    lens = [64, 200]
    q = torch.randn(sum(lens) + 2, HQ, D, generator=gen).to(dtype)
    k = torch.randn(sum(lens) + 2, HKV, D, generator=gen).to(dtype)
    v = torch.randn(sum(lens) + 2, HKV, D, generator=gen).to(dtype)
    empty = torch.empty(0, dtype=dtype, device=device)
    tables = [list(range(4)), list(range(4, 17))]
    md_empty = BlocksparseFlashAttentionMetadata.build(lens, [0, 0], tables, 16, device=device)
    # An engine may still send block tables with the profiling batch; nothing is cached to read.
    padded = torch.tensor([t + [0] * (13 - len(t)) for t in tables], dtype=torch.int32, device=device)
    md_tables = dataclasses.replace(md_empty, block_tables=padded)
    for md in (md_empty, md_tables):
        output = None if md is md_empty else poison(torch.empty(sum(lens) + 2, HQ * D, dtype=dtype, device=device))
        out = impl.forward(q.flatten(1).to(device), k.flatten(1).to(device), v.flatten(1).to(device), empty, md,
                           output=output)
        out = out.view(-1, HQ, D)
        start = 0
        for n in lens:
            ref, _ = reference.attention_ref(q[start: start + n], k[start: start + n], v[start: start + n], SCALE,
                                             pattern)
            assert_close_to_ref(out[start: start + n], ref, dtype, f"{device} profiling run, len {n}")
            start += n
        assert not out[start:].float().cpu().any(), "padding rows are not zero"
    decode = BlocksparseFlashAttentionMetadata.build([1], [5], [[0]], 16, device=device)
    with pytest.raises(ValueError, match="KV cache"):
        impl.forward(q[:1].flatten(1).to(device), k[:1].flatten(1).to(device), v[:1].flatten(1).to(device), empty,
                     decode)


def test_seq_len_above_max_seqlen_changes_no_cache(device, gen):
    impl = BlocksparseFlashAttentionImpl(HQ, D, SCALE, HKV, blocksparse_params=dict(
        max_seqlen=40, block_size=16, local_blocks=2, vert_stride=3))
    dtype = engine_dtype(device)
    cache = allocate_kv_cache(4, 16, HKV, D, dtype, device).zero_()
    md = BlocksparseFlashAttentionMetadata.build([1], [40], [[0, 1, 2]], 16, device=device)
    x = torch.ones(1, HQ * D, dtype=dtype, device=device)
    kv = torch.ones(1, HKV * D, dtype=dtype, device=device)
    with pytest.raises(ValueError, match="max_seqlen"):
        impl.forward(x, kv, kv, cache, md)
    assert not cache.any(), "a rejected forward wrote to the cache"


# ---- Backend: cache shape and block copies ---------------------------------------------------------------

def test_kv_cache_layout(device):
    shape = BlocksparseFlashAttentionBackend.get_kv_cache_shape(7, 32, HKV, D)
    assert shape == (2, 7, 32 * HKV * D)
    cache = allocate_kv_cache(7, 32, HKV, D, torch.float32, device)
    assert tuple(cache.shape) == shape and cache.device.type == torch.device(device).type
    key_cache, value_cache = split_kv_cache(cache, HKV, D)
    assert key_cache.shape == (7, HKV, 32, D) and value_cache.shape == (7, HKV, 32, D)
    key_cache[3, 1, 5, 7] = 1.0
    value_cache[6, 0, 31, 63] = 2.0
    # HND inside a block: [Hkv, kvbs, D] flattened into the last dimension
    assert cache[0, 3, (1 * 32 + 5) * D + 7] == 1.0 and cache[1, 6, 31 * D + 63] == 2.0
    with pytest.raises(ValueError, match="multiple"):
        split_kv_cache(cache, 3, D)


@pytest.mark.parametrize("mapping_on_cpu", (True, False), ids=("map-cpu", "map-device"))
def test_copy_blocks(device, mapping_on_cpu, gen):
    caches = [torch.randn(2, 6, 16 * HKV * D, generator=gen).to(device) for _ in range(3)]
    mapping = torch.tensor([[0, 3], [2, 5], [0, 1]], dtype=torch.int64)
    expected = reference.copy_blocks_ref([c.cpu() for c in caches], mapping)
    BlocksparseFlashAttentionBackend.copy_blocks(caches, mapping if mapping_on_cpu else mapping.to(device))
    for layer, (c, e) in enumerate(zip(caches, expected)):
        assert torch.equal(c.cpu(), e), f"[{device}] copy_blocks: layer {layer} differs"


@pytest.mark.parametrize("mapping_on_cpu", (True, False), ids=("map-cpu", "map-device"))
def test_swap_blocks_out_and_in(device, mapping_on_cpu, gen):
    gpu = torch.randn(2, 5, 16 * HKV * D, generator=gen).to(device)
    host = torch.randn(2, 4, 16 * HKV * D, generator=gen)
    out_map = torch.tensor([[4, 0], [1, 2]], dtype=torch.int64)
    in_map = torch.tensor([[0, 3], [2, 0]], dtype=torch.int64)
    expected_host = reference.swap_blocks_ref(gpu.cpu(), host, out_map)
    BlocksparseFlashAttentionBackend.swap_blocks(gpu, host, out_map if mapping_on_cpu else out_map.to(device))
    assert torch.equal(host, expected_host), f"[{device}] swap out differs"
    expected_gpu = reference.swap_blocks_ref(host, gpu.cpu(), in_map)
    BlocksparseFlashAttentionBackend.swap_blocks(host, gpu, in_map if mapping_on_cpu else in_map.to(device))
    assert torch.equal(gpu.cpu(), expected_gpu), f"[{device}] swap in differs"


def test_backend_names():
    assert BlocksparseFlashAttentionBackend.get_name() == "BLOCK_SPARSE_FLASH_ATTN"
    assert BlocksparseFlashAttentionBackend.get_impl_cls() is BlocksparseFlashAttentionImpl
    assert BlocksparseFlashAttentionBackend.get_metadata_cls() is BlocksparseFlashAttentionMetadata
    assert 128 in BlocksparseFlashAttentionBackend.get_supported_head_sizes()


# ---- BlocksparseParams ---------------------------------------------------------------------------------

def _params(**kw) -> BlocksparseParams:
    base = dict(max_seqlen=1024, num_heads=2, num_kv_heads=1, block_size=16, local_blocks=2, vert_stride=9)
    return BlocksparseParams(**{**base, **kw})


@pytest.mark.parametrize("kw,step,pattern_step,by_kv,offset,heads", [
    (dict(), 4, 4, False, 0, (0, 2)),                                  # int(9 / 2)
    (dict(tp_size=2, tp_rank=1), 2, 2, False, 2, (2, 4)),              # int(9 / 4)
    (dict(homo_head=True, tp_size=3, tp_rank=2), 0, 0, False, 4, (4, 6)),
    (dict(homo_head_group=True), -9, 9, True, 0, (0, 2)),              # -int(9 / 1): vLLM's sign
    (dict(homo_head_group=True, tp_size=4, tp_rank=3), -2, 2, True, 6, (6, 8)),
    (dict(vert_stride=1, tp_size=8), 1, 1, False, 0, (0, 2)),          # max(1, ...)
], ids=["q", "q-tp2r1", "homo-tp3r2", "kv", "kv-tp4r3", "floor-1"])
def test_params_derived_fields(kw, step, pattern_step, by_kv, offset, heads):
    p = _params(**kw)
    assert p.head_sliding_step == step
    assert p.active_head_range == heads
    assert p.pattern == SparsePattern(16, 2, p.vert_stride, pattern_step, slide_by_kv_head=by_kv, head_offset=offset)


@pytest.mark.parametrize("kw,match", [
    (dict(block_size=48), "block_size"),
    (dict(local_blocks=0), "local_blocks"),
    (dict(vert_stride=0), "vert_stride"),
    (dict(num_heads=3, num_kv_heads=2), "num_kv_heads"),
    (dict(tp_size=2, tp_rank=2), "tp_rank"),
    (dict(tp_rank=-1), "tp_rank"),
    (dict(homo_head=True, homo_head_group=True), "homo_head"),
    (dict(max_seqlen=0), "max_seqlen"),
])
def test_params_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        _params(**kw)


# ---- Impl construction -----------------------------------------------------------------------------------

_SPARSE = dict(max_seqlen=256, block_size=16, local_blocks=2, vert_stride=3)


@pytest.mark.parametrize("kw,error,match", [
    (dict(alibi_slopes=[0.5] * HQ), NotImplementedError, "alibi"),
    (dict(sliding_window=128), NotImplementedError, "sliding_window"),
    (dict(kv_cache_dtype="int8"), ValueError, "kv_cache_dtype='int8'"),
    (dict(kv_cache_dtype="fp8_e4m3fn"), ValueError, "kv_cache_dtype"),
    (dict(logits_soft_cap=30.0), NotImplementedError, "logits_soft_cap"),
    (dict(attn_type="encoder"), NotImplementedError, "attn_type"),
    (dict(head_size=72), ValueError, "head_size"),
    (dict(blocksparse_params=None), ValueError, "blocksparse_params"),
    (dict(blocksparse_params={**_SPARSE, "num_heads": 4}), ValueError, "num_heads"),
    (dict(blocksparse_params={**_SPARSE, "vertical_stride": 3}), ValueError, "blocksparse_params"),
    (dict(blocksparse_params={**_SPARSE, "local_blocks": 0}), ValueError, "local_blocks"),
    (dict(num_kv_heads=3), ValueError, "num_kv_heads"),
    (dict(kv_sharing_target_layer_name="model.layers.0.attn"), NotImplementedError, "kv_sharing"),
    (dict(use_irope=True), NotImplementedError, "use_irope"),
], ids=["alibi", "sliding-window", "int8-cache", "torch-name-cache", "soft-cap", "encoder", "head-size-72", "no-params",
        "num-heads-mismatch", "unknown-key", "bad-local-blocks", "kv-heads", "kv-sharing",
        "irope"])
def test_impl_rejects(kw, error, match):
    args = dict(num_heads=HQ, head_size=D, scale=SCALE, num_kv_heads=HKV, blocksparse_params=_SPARSE)
    with pytest.raises(error, match=match):
        BlocksparseFlashAttentionImpl(**{**args, **kw})


def test_impl_fills_heads_and_accepts_params_object():
    impl = BlocksparseFlashAttentionImpl(HQ, D, SCALE, HKV, blocksparse_params={**_SPARSE, "tp_size": 2, "tp_rank": 1})
    assert (impl.blocksparse_params.num_heads, impl.blocksparse_params.num_kv_heads) == (HQ, HKV)
    assert impl.pattern.head_offset == HQ
    again = BlocksparseFlashAttentionImpl(HQ, D, SCALE, HKV, blocksparse_params=impl.blocksparse_params)
    assert again.blocksparse_params == impl.blocksparse_params
    mqa = BlocksparseFlashAttentionImpl(4, 128, SCALE, blocksparse_params=_SPARSE)  # num_kv_heads defaults to Hq
    assert mqa.num_kv_heads == 4


# ---- Metadata ------------------------------------------------------------------------------------------

def test_metadata_build_and_views():
    md = BlocksparseFlashAttentionMetadata.build([5, 1, 3, 1, 1], [0, 4, 20, 7, 16], [[2], [0], [3, 1], [4], [6, 5]],
                                                 16, device="cpu")
    # seq 1 (one token, context) precedes a prefill, so only seqs 3 and 4 are decodes
    assert (md.num_prefills, md.num_prefill_tokens, md.num_decode_tokens) == (3, 9, 2)
    assert md.seq_lens == [5, 5, 23, 8, 17]
    assert md.query_start_loc.tolist() == [0, 5, 6, 9, 10, 11]
    assert md.seq_start_loc.tolist() == [0, 5, 10, 33, 41, 58]
    assert md.slot_mapping.tolist() == [32, 33, 34, 35, 36, 4, 20, 21, 22, 71, 80]
    assert md.block_tables.tolist() == [[2, 0], [0, 0], [3, 1], [4, 0], [6, 5]]
    assert (md.max_query_len, md.max_prefill_seq_len, md.max_decode_seq_len) == (5, 23, 17)
    assert md.slot_mapping.dtype == torch.int64
    assert all(t.dtype == torch.int32 for t in (md.seq_lens_tensor, md.query_start_loc, md.block_tables))

    pre, dec = md.prefill_metadata, md.decode_metadata
    assert pre is md.prefill_metadata and dec is md.decode_metadata  # cached
    assert (pre.num_prefills, pre.num_prefill_tokens, pre.num_decode_tokens) == (3, 9, 0)
    assert pre.query_start_loc.tolist() == [0, 5, 6, 9] and pre.seq_lens_tensor.tolist() == [5, 5, 23]
    assert pre.block_tables.shape == (3, 2) and pre.slot_mapping.numel() == 9
    assert pre.context_lens_tensor.tolist() == [0, 4, 20]
    assert (dec.num_prefills, dec.num_prefill_tokens, dec.num_decode_tokens) == (0, 0, 2)
    assert dec.seq_lens_tensor.tolist() == [8, 17] and dec.block_tables.tolist() == [[4, 0], [6, 5]]
    assert dec.slot_mapping.tolist() == [71, 80] and dec.max_decode_seq_len == 17

    only_prefill = BlocksparseFlashAttentionMetadata.build([3, 2], [0, 0], [[1], [0]], 16)
    assert only_prefill.decode_metadata is None and only_prefill.block_tables.shape == (2, 0)
    only_decode = BlocksparseFlashAttentionMetadata.build([1, 1], [3, 9], [[1], [0]], 16)
    assert only_decode.prefill_metadata is None and only_decode.num_decode_tokens == 2
    with pytest.raises(ValueError, match="too few"):
        BlocksparseFlashAttentionMetadata.build([10], [10], [[0]], 16)


def test_padded_decode_batch_by_keyword(device, gen):
    """vLLM's decode-only CUDA-graph batch, built by keyword: padding rows have slot -1 and seq_len 0 and
    no host seq_lens; they come back zero and write nothing."""
    dtype = engine_dtype(device)
    impl = make_impl()
    pattern = global_pattern("qslide")
    cache = torch.randn(BlocksparseFlashAttentionBackend.get_kv_cache_shape(12, 16, HKV, D), generator=gen).to(dtype)
    lens = [70, 33, 0, 0]
    tables = torch.tensor([[3, 7, 1, 10, 9], [11, 2, 5, 0, 0], [0] * 5, [0] * 5], dtype=torch.int32)
    slots = torch.tensor([9 * 16 + 5, 5 * 16 + 0, -1, -1])  # the last position of each real row
    md = BlocksparseFlashAttentionMetadata(
        num_prefills=0, num_prefill_tokens=0, num_decode_tokens=4, slot_mapping=slots.to(device), seq_lens=None,
        seq_lens_tensor=torch.tensor(lens, dtype=torch.int32, device=device), max_query_len=1,
        max_prefill_seq_len=0, max_decode_seq_len=80, query_start_loc=None, seq_start_loc=None,
        context_lens_tensor=None, block_tables=tables.to(device), use_cuda_graph=True)
    assert md.prefill_metadata is None and md.decode_metadata.use_cuda_graph
    q = torch.randn(4, HQ, D, generator=gen).to(dtype)
    k = torch.randn(4, HKV, D, generator=gen).to(dtype)
    v = torch.randn(4, HKV, D, generator=gen).to(dtype)
    expected_cache = cache.clone()
    key_ref, value_ref = split_kv_cache(expected_cache, HKV, D)
    for r in range(2):
        key_ref[slots[r] // 16, :, slots[r] % 16], value_ref[slots[r] // 16, :, slots[r] % 16] = k[r], v[r]
    cache = cache.to(device)
    out = impl.forward(q.flatten(1).to(device), k.flatten(1).to(device), v.flatten(1).to(device), cache, md,
                       output=poison(torch.empty(4, HQ * D, dtype=dtype, device=device))).view(4, HQ, D)
    assert torch.equal(cache.cpu(), expected_cache), f"[{device}] the cache differs after a padded decode batch"
    for r in range(2):
        keys, values = reference.gather_paged_kv(key_ref, value_ref, tables[r], lens[r])
        ref, _ = reference.attention_ref(q[r: r + 1], keys, values, SCALE, pattern)
        assert_close_to_ref(out[r: r + 1], ref, dtype, f"{device} padded decode row {r}")
    assert not out[2:].float().cpu().any(), f"[{device}] padding decode rows (seq_len 0) are not zero"


# ---- CUDA graphs ------------------------------------------------------------------------------------------

def test_decode_captured_in_cuda_graph(device, gen):
    """Decode forward does no host sync: it captures into a CUDA graph and replays on new inputs."""
    if not device.startswith("cuda"):
        pytest.skip("CUDA graphs need a GPU")
    dtype = torch.bfloat16
    impl = make_impl()
    num_seqs, kvbs = 4, 16
    cache = torch.randn(BlocksparseFlashAttentionBackend.get_kv_cache_shape(40, kvbs, HKV, D), generator=gen)
    cache = cache.to(dtype).to(device)
    tables = torch.randperm(40, generator=gen)[: num_seqs * 10].view(num_seqs, 10).to(torch.int32).to(device)
    seq_lens = torch.tensor([100, 33, 0, 0], dtype=torch.int32, device=device)  # two padding rows
    slots = torch.zeros(num_seqs, dtype=torch.int64, device=device)
    md = BlocksparseFlashAttentionMetadata(
        num_prefills=0, num_prefill_tokens=0, num_decode_tokens=num_seqs, slot_mapping=slots, seq_lens=None,
        seq_lens_tensor=seq_lens, max_query_len=1, max_prefill_seq_len=0, max_decode_seq_len=160,
        query_start_loc=None, seq_start_loc=None, context_lens_tensor=None, block_tables=tables,
        use_cuda_graph=True)
    query = torch.zeros(num_seqs, HQ * D, dtype=dtype, device=device)
    key = torch.zeros(num_seqs, HKV * D, dtype=dtype, device=device)
    value = torch.zeros_like(key)
    output = torch.empty_like(query)

    def set_step(lens):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        table = tables.cpu().long()
        slot = [int(table[r, (n - 1) // kvbs]) * kvbs + (n - 1) % kvbs if n else -1 for r, n in enumerate(lens)]
        slots.copy_(torch.tensor(slot))
        for t in (query, key, value):
            t.copy_(torch.randn(t.shape, generator=gen).to(dtype))

    set_step([100, 33, 0, 0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        impl.forward(query, key, value, cache, md, output=output)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.forward(query, key, value, cache, md, output=output)
    for lens in ([101, 34, 7, 0], [102, 35, 8, 160]):
        set_step(lens)
        expected_cache = cache.clone()
        expected = impl.forward(query, key, value, expected_cache, md)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(output, expected), f"graph replay differs from eager forward at seq_lens {lens}"
        assert torch.equal(cache, expected_cache), f"graph replay wrote a different cache at seq_lens {lens}"
