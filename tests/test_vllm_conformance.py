"""The backend called the way vLLM 0.7-0.9 call a block-sparse backend (their last commit with one: 881e3cbe).

vLLM's `Attention` layer builds the Impl with eleven positional arguments plus keyword extras, reads
`accept_output_buffer`, and calls `forward(layer, query, key, value, kv_cache, attn_metadata, output=...)`
with [T, H, D] views and the K/V scales on the layer (`_k_scale` tensors, `_k_scale_float` floats). Its v0
runner allocates every layer's cache in FlashAttention's shape (2, num_blocks, kvbs, Hkv, D), builds
metadata by keyword (with `max_decode_query_len`, `enable_kv_scales_calculation`, ...) and broadcasts it
through `asdict_zerocopy()`, rebuilding it with `make_metadata(**fields)` on the other workers. Block tables
are empty for plain prompt batches and real for every row with chunked prefill; CUDA-graph decode batches are
padded with slot -1. `VllmStyleLayer` below is a stand-in for that layer, written from those facts.

Every output row is compared with the float32 reference over the sequence's whole K/V history (with an
fp8 cache: the history as stored, i.e. quantized and dequantized with the layer's scales). Also here:
tensor parallelism (a stand-in vLLM TP group, and two gloo ranks without / with tp params).
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import NAN, assert_close_to_ref, assert_pattern_is_sparse, poison

from blocksparse_attn import (BlocksparseFlashAttentionBackend, BlocksparseFlashAttentionMetadata, BlocksparseParams,
                              reference)
from blocksparse_attn.parallel import VLLM_PARALLEL_STATE

HQ, HKV, D = 8, 2, 64
SCALE = 1.0 / math.sqrt(D)
KVBS = 16
NUM_BLOCKS = 64
# What Phi-3-small's layer passes (heads per partition; no tp size or rank: vLLM read those from its group).
PHI3_PARAMS = dict(max_seqlen=1024, num_heads=HQ, num_kv_heads=HKV, block_size=16, local_blocks=2, vert_stride=3)
CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
K_SCALE, V_SCALE = 0.02, 0.03  # values of N(0, 1) divided by these stay well inside both fp8 ranges


def model_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


class VllmStyleLayer:
    """Stand-in for vLLM 0.7-0.9's Attention layer (decoder self-attention, direct call)."""

    def __init__(self, kv_cache_dtype: str, device: str, params: dict | None = None, k_scale: float = 1.0,
                 v_scale: float = 1.0):
        backend = BlocksparseFlashAttentionBackend
        impl_cls = backend.get_impl_cls()
        # num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
        # blocksparse_params, logits_soft_cap, attn_type, kv_sharing_target_layer_name, **extra_impl_args
        self.impl = impl_cls(HQ, D, SCALE, HKV, None, None, kv_cache_dtype, dict(params or PHI3_PARAMS), None,
                             "decoder", None, use_irope=False)
        self.use_output = backend.accept_output_buffer
        self._k_scale = torch.tensor(k_scale, dtype=torch.float32, device=device)  # 0-dim, as vLLM keeps them
        self._v_scale = torch.tensor(v_scale, dtype=torch.float32, device=device)
        self._k_scale_float, self._v_scale_float = k_scale, v_scale

    def forward(self, query, key, value, kv_cache, attn_metadata):
        if not self.use_output:
            return self.impl.forward(self, query, key, value, kv_cache, attn_metadata)
        output = poison(torch.empty_like(query))
        hidden = query.shape[-1]
        self.impl.forward(self, query.view(-1, HQ, D), key.view(-1, HKV, D), value.view(-1, HKV, D), kv_cache,
                          attn_metadata, output=output.view(-1, HQ, D))
        return output.view(-1, hidden)


def broadcast_round_trip(md):
    """What vLLM's runner does to reach the other workers: asdict_zerocopy, then make_metadata over the
    metadata class's fields found in the dict."""
    tensor_dict = md.asdict_zerocopy()
    cls = BlocksparseFlashAttentionBackend.get_metadata_cls()
    return BlocksparseFlashAttentionBackend.make_metadata(
        **{f.name: tensor_dict.pop(f.name) for f in dataclasses.fields(cls) if f.name in tensor_dict})


class Server:
    """One layer served vLLM-style: FlashAttention-shaped cache (NaN-poisoned), shuffled blocks, each
    sequence's K/V history kept on the CPU for the reference (as stored, for fp8 caches)."""

    def __init__(self, device: str, kv_cache_dtype: str, gen: torch.Generator, uint8_cache: bool = False):
        self.device, self.gen, self.dtype = device, gen, model_dtype(device)
        self.fp8 = CACHE_DTYPES[kv_cache_dtype]
        self.layer = VllmStyleLayer(kv_cache_dtype, device, k_scale=K_SCALE, v_scale=V_SCALE)
        shape = (2, NUM_BLOCKS, KVBS, HKV, D)  # FlashAttention's, as vLLM's v0 runner allocates
        cache = torch.full(shape, NAN, dtype=self.dtype)
        if self.fp8 is not None:
            cache = cache.to(self.fp8)
            if uint8_cache:
                cache = cache.view(torch.uint8)
        self.kv_cache = cache.to(device)
        self.free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.k, self.v, self.tables = {}, {}, {}

    def stored(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self.fp8 is None:
            return x.float()
        return reference.dequantize(reference.quantize_fp8(x, self.fp8, scale), scale)

    def step(self, requests, chunked: bool, graph_pad: int = 0, prefix_caching: bool = False, config: str = ""):
        """requests [(seq, new tokens)], decodes last. chunked: every row gets its block table (vLLM with
        chunked prefill); else prefill rows get none, or with prefix_caching only the rows with a cached
        prefix do (the others are padded with zeros, as vLLM's builder pads them). graph_pad: decode-only
        batch padded like a CUDA graph's."""
        query_lens = [n for _, n in requests]
        context_lens = [self.k[s].shape[0] if s in self.k else 0 for s, _ in requests]
        for (seq, n), c in zip(requests, context_lens):
            table = self.tables.setdefault(seq, [])
            while len(table) * KVBS < c + n:
                table.append(self.free.pop())
        md = BlocksparseFlashAttentionMetadata.build(query_lens, context_lens, [self.tables[s] for s, _ in requests],
                                                     KVBS, device=self.device)
        fields = md.asdict_zerocopy()
        width = max(len(self.tables[s]) for s, _ in requests)
        rows = [self.tables[s] + [0] * (width - len(self.tables[s])) for s, _ in requests]
        if prefix_caching:
            rows = [row if c > 0 else [0] * width for row, c in zip(rows, context_lens)]
        if chunked or prefix_caching or md.num_prefills == 0:
            fields["block_tables"] = torch.tensor(rows, dtype=torch.int32, device=self.device)
        else:
            fields["block_tables"] = torch.empty(len(requests), 0, dtype=torch.int32, device=self.device)
        if graph_pad:
            assert md.num_prefills == 0
            pad = lambda t, value: torch.cat([t, torch.full((graph_pad, *t.shape[1:]), value, dtype=t.dtype,  # noqa: E731
                                                            device=t.device)])
            fields.update(slot_mapping=pad(md.slot_mapping, -1), seq_lens=None,
                          seq_lens_tensor=pad(md.seq_lens_tensor, 1),  # vLLM pads with length 1, table 0
                          block_tables=pad(fields["block_tables"], 0), use_cuda_graph=True,
                          num_decode_tokens=md.num_decode_tokens + graph_pad)
        fields.update(multi_modal_placeholder_index_maps=None, enable_kv_scales_calculation=True,
                      max_decode_query_len=1 if md.num_decode_tokens else 0)
        md = broadcast_round_trip(BlocksparseFlashAttentionBackend.make_metadata(**fields))

        total = sum(query_lens) + graph_pad
        q = torch.randn(total, HQ, D, generator=self.gen).to(self.dtype)
        k = torch.randn(total, HKV, D, generator=self.gen).to(self.dtype)
        v = torch.randn(total, HKV, D, generator=self.gen).to(self.dtype)
        start = 0
        for seq, n in requests:
            new_k, new_v = self.stored(k[start:start + n], K_SCALE), self.stored(v[start:start + n], V_SCALE)
            self.k[seq] = torch.cat([self.k[seq], new_k]) if seq in self.k else new_k
            self.v[seq] = torch.cat([self.v[seq], new_v]) if seq in self.v else new_v
            start += n
        fused = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], 1).to(self.device)
        query, key, value = fused.split([HQ * D, HKV * D, HKV * D], dim=1)
        out = self.layer.forward(query, key, value, self.kv_cache, md).view(total, HQ, D)

        start = 0
        for (seq, n), c in zip(requests, context_lens):
            ref, _ = reference.attention_ref(q[start:start + n].float(), self.k[seq], self.v[seq], SCALE,
                                             self.layer.impl.pattern)
            assert_close_to_ref(out[start:start + n], ref, self.dtype, f"{config} seq {seq} ctx {c} new {n}")
            start += n
        return md


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8", "fp8_e5m2", "fp8-bytes"])
def test_vllm_call_sequence(device, kv_cache_dtype, gen):
    """Prompts (no block tables), graph-padded decodes, then chunked prefill mixed with decodes."""
    name, as_bytes = kv_cache_dtype.removesuffix("-bytes"), kv_cache_dtype.endswith("-bytes")
    server = Server(device, "fp8" if as_bytes else name, gen, uint8_cache=as_bytes)
    config = f"{device} {kv_cache_dtype}"
    assert_pattern_is_sparse(server.layer.impl.pattern, HQ, HKV, 200, config)
    server.step([(0, 150), (1, 77)], chunked=False, config=config + " prompts")
    server.step([(0, 1), (1, 1)], chunked=False, graph_pad=3, config=config + " graph-padded decode")
    server.step([(2, 64), (0, 1), (1, 1)], chunked=True, config=config + " chunk 1 + decodes")
    server.step([(2, 100), (0, 1), (1, 1)], chunked=True, config=config + " chunk 2 + decodes")
    server.step([(0, 1), (1, 1), (2, 1)], chunked=True, config=config + " decodes")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_prefix_cache_hits_mixed_with_new_prompts(device, kv_cache_dtype, gen):
    """A prompt batch where one row continues a cached prefix (its table given) and the others are new
    prompts whose table rows vLLM's builder leaves empty, i.e. zeros once padded: each new prompt must
    still read its own pages, not block 0."""
    server = Server(device, kv_cache_dtype, gen)
    server.step([(0, 64)], chunked=False, config=f"{device} {kv_cache_dtype} prefix")
    server.step([(0, 90), (1, 70), (2, 33)], chunked=False, prefix_caching=True,
                config=f"{device} {kv_cache_dtype} prefix hit + new prompts")


def test_profile_run_with_empty_cache(device, gen):
    """vLLM's memory profiling passes an empty cache and a prompt batch without block tables."""
    layer = VllmStyleLayer("fp8", device)
    dtype = model_dtype(device)
    md = BlocksparseFlashAttentionMetadata.build([40, 9], [0, 0], [[0, 1, 2], [3]], KVBS, device=device)
    q = torch.randn(49, HQ * D, generator=gen).to(dtype).to(device)
    k = torch.randn(49, HKV * D, generator=gen).to(dtype).to(device)
    v = torch.randn(49, HKV * D, generator=gen).to(dtype).to(device)
    out = layer.forward(q, k, v, torch.empty(0, device=device), md).view(49, HQ, D)
    ref, _ = reference.varlen_prefill_ref(q.view(49, HQ, D).cpu().float(), k.view(49, HKV, D).cpu().float(),
                                       v.view(49, HKV, D).cpu().float(), md.query_start_loc.cpu(),
                                       md.query_start_loc.cpu(), SCALE, layer.impl.pattern)
    assert_close_to_ref(out, ref, dtype, f"{device} profile run")


def test_fp8_prompt_reads_the_cache(gen):
    """With an fp8 cache a whole prompt sees its keys as stored, so it equals the same prompt in chunks
    (and differs from attention over the unquantized keys by more than the tolerance)."""
    whole, chunks = Server("cpu", "fp8", gen), Server("cpu", "fp8", gen)
    q = torch.randn(96, HQ, D, generator=gen)
    k = torch.randn(96, HKV, D, generator=gen)
    v = torch.randn(96, HKV, D, generator=gen)

    def run(server, spans, chunked):
        outs = []
        for a, b in spans:
            for seq, n in [(0, b - a)]:
                table = server.tables.setdefault(seq, [])
                while len(table) * KVBS < b:
                    table.append(server.free.pop())
            md = BlocksparseFlashAttentionMetadata.build([b - a], [a], [server.tables[0]], KVBS)
            if not chunked:
                md = dataclasses.replace(md, block_tables=torch.empty(1, 0, dtype=torch.int32))
            qkv = [t[a:b].flatten(1) for t in (q, k, v)]
            outs.append(server.layer.forward(*qkv, server.kv_cache, md))
        return torch.cat(outs)

    out_whole = run(whole, [(0, 96)], chunked=False)
    out_chunks = run(chunks, [(0, 32), (32, 80), (80, 96)], chunked=True)
    torch.testing.assert_close(out_whole, out_chunks, rtol=1e-5, atol=1e-5)
    unquantized, _ = reference.varlen_prefill_ref(q, k, v, torch.tensor([0, 96], dtype=torch.int32),
                                               torch.tensor([0, 96], dtype=torch.int32), SCALE,
                                               whole.layer.impl.pattern)
    assert (out_whole.view(96, HQ, D) - unquantized).abs().max() > 1e-3


@pytest.mark.parametrize("case,error,match", [
    ("auto-impl-fp8-cache", ValueError, "kv_cache_dtype is 'auto'"),
    ("e5m2-impl-e4m3-cache", ValueError, "expects torch.float8_e5m2"),
    ("zero-float-scale", ValueError, "k_scale=0.0"),
    ("nan-float-scale", ValueError, "v_scale=nan"),
    ("output-scale", NotImplementedError, "output_scale"),
    ("spec-decode", NotImplementedError, "max_decode_query_len"),
    ("kv-sharing", NotImplementedError, "kv_sharing_target_layer_name"),
    ("v1-metadata", NotImplementedError, "VLLM_USE_V1=0"),
])
def test_vllm_style_bad_input_changes_no_cache(case, error, match, gen):
    impl_dtype = {"auto-impl-fp8-cache": "auto", "e5m2-impl-e4m3-cache": "fp8_e5m2"}.get(case, "fp8")
    if case == "kv-sharing":
        with pytest.raises(error, match=match):
            BlocksparseFlashAttentionBackend.get_impl_cls()(HQ, D, SCALE, HKV, None, None, "auto", PHI3_PARAMS,
                                                            None, "decoder", "model.layers.0.self_attn.attn")
        return
    layer = VllmStyleLayer(impl_dtype, "cpu", k_scale=0.0 if case == "zero-float-scale" else 1.0)
    if case == "zero-float-scale":
        del layer._k_scale  # the float form is what the layer has
    if case == "nan-float-scale":
        layer._v_scale, layer._v_scale_float = None, float("nan")
    cache = torch.zeros(2, 4, KVBS * HKV * D).to(torch.float8_e4m3fn)
    before = cache.view(torch.uint8).clone()
    md = BlocksparseFlashAttentionMetadata.build([1], [5], [[2]], KVBS)
    if case == "spec-decode":
        md = dataclasses.replace(md, max_decode_query_len=2)
    if case == "v1-metadata":  # vLLM's V1 runner passes None while profiling, its own metadata after
        md = None
    q, k, v = torch.randn(1, HQ, D), torch.randn(1, HKV, D), torch.randn(1, HKV, D)
    kwargs = dict(output_scale=torch.ones(1)) if case == "output-scale" else {}
    with pytest.raises(error, match=match):
        layer.impl.forward(layer, q, k, v, cache, md, output=torch.empty(1, HQ, D), **kwargs)
    assert torch.equal(cache.view(torch.uint8), before), f"[{case}] a rejected call wrote the cache"


def test_metadata_dict_round_trip():
    md = BlocksparseFlashAttentionMetadata.build([5, 1], [0, 4], [[2], [0]], KVBS)
    again = broadcast_round_trip(md)
    for f in dataclasses.fields(md):
        if f.init:
            a, b = getattr(md, f.name), getattr(again, f.name)
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f.name
    assert again.max_decode_query_len == 1 and again.decode_metadata.max_decode_query_len == 1
    assert not any(name.startswith("_") for name in md.asdict_zerocopy())
    assert "block_tables" not in md.asdict_zerocopy(skip_fields={"block_tables"})


def test_builder_and_state_need_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm.* raises ImportError
    monkeypatch.setattr("blocksparse_attn.backend._VLLM_CLASSES", None)
    for getter in (BlocksparseFlashAttentionBackend.get_builder_cls, BlocksparseFlashAttentionBackend.get_state_cls):
        with pytest.raises(NotImplementedError, match="vLLM"):
            getter()


def test_builder_and_state_from_a_vllm_tree(monkeypatch):
    class CommonMetadataBuilder:
        _metadata_cls = None

    class CommonAttentionState:
        pass

    utils = types.ModuleType("vllm.attention.backends.utils")
    utils.CommonMetadataBuilder, utils.CommonAttentionState = CommonMetadataBuilder, CommonAttentionState
    for name in ("vllm", "vllm.attention", "vllm.attention.backends"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.attention.backends.utils", utils)
    monkeypatch.setattr("blocksparse_attn.backend._VLLM_CLASSES", None)
    builder = BlocksparseFlashAttentionBackend.get_builder_cls()
    assert issubclass(builder, CommonMetadataBuilder) and builder._metadata_cls is BlocksparseFlashAttentionMetadata
    assert BlocksparseFlashAttentionBackend.get_state_cls() is CommonAttentionState


# ---- CUDA graphs ------------------------------------------------------------------------------------------

def test_graph_decode_reads_layer_scales(gen):
    """A decode step captured through the layer-style call replays with the scales the layer holds at
    replay time (vLLM updates _k_scale / _v_scale in place), bit for bit as an eager call with them."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    server = Server("cuda", "fp8", gen)
    server.step([(0, 300), (1, 200)], chunked=False)
    md = BlocksparseFlashAttentionMetadata.build([1, 1], [300, 200], [server.tables[0], server.tables[1]], KVBS,
                                                 device="cuda")
    md = dataclasses.replace(md, seq_lens=None, use_cuda_graph=True, max_decode_query_len=1)
    query = torch.randn(2, HQ * D, generator=gen).to(torch.bfloat16).cuda()
    key = torch.randn(2, HKV * D, generator=gen).to(torch.bfloat16).cuda()
    value = torch.randn(2, HKV * D, generator=gen).to(torch.bfloat16).cuda()
    saved = server.kv_cache.clone()
    out = torch.empty_like(query)

    def decode():
        server.layer.impl.forward(server.layer, query.view(-1, HQ, D), key.view(-1, HKV, D), value.view(-1, HKV, D),
                                  server.kv_cache, md, output=out.view(-1, HQ, D))

    decode()  # warm-up outside the capture
    server.kv_cache.copy_(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode()
    for k_scale, v_scale in ((K_SCALE, V_SCALE), (2 * K_SCALE, 0.5 * V_SCALE)):
        server.layer._k_scale.fill_(k_scale)
        server.layer._v_scale.fill_(v_scale)
        server.kv_cache.copy_(saved)
        poison(out)
        graph.replay()
        torch.cuda.synchronize()
        replayed, cache_after = out.clone(), server.kv_cache.clone()
        server.kv_cache.copy_(saved)
        poison(out)
        decode()
        assert not out.isnan().any()
        assert torch.equal(replayed, out), f"k_scale {k_scale}: the replay differs from the eager call"
        assert torch.equal(cache_after.view(torch.uint8), server.kv_cache.view(torch.uint8))


# ---- tensor parallelism -----------------------------------------------------------------------------------

def _parallel_state(world: int, rank: int, initialized: bool = True) -> types.ModuleType:
    """A stand-in for vllm.distributed.parallel_state with the functions the backend calls."""
    state = types.ModuleType(VLLM_PARALLEL_STATE)
    state.model_parallel_is_initialized = lambda: initialized
    state.get_tensor_model_parallel_world_size = lambda: world
    state.get_tensor_model_parallel_rank = lambda: rank
    return state


def test_tp_from_vllm_group(monkeypatch):
    monkeypatch.setitem(sys.modules, VLLM_PARALLEL_STATE, _parallel_state(4, 3))
    layer = VllmStyleLayer("auto", "cpu", params=dict(PHI3_PARAMS, vert_stride=9))
    params = layer.impl.blocksparse_params
    assert (params.tp_size, params.tp_rank) == (4, 3)
    assert layer.impl.pattern.head_offset == 3 * HQ
    assert params.head_sliding_step == max(1, int(9 / (4 * HQ)))
    with pytest.raises(ValueError, match="tp_rank=1 differs from vLLM"):
        BlocksparseParams(**PHI3_PARAMS, tp_rank=1)
    assert BlocksparseParams(**PHI3_PARAMS, tp_size=4, tp_rank=1).tp_rank == 1  # both given: taken as given
    monkeypatch.setitem(sys.modules, VLLM_PARALLEL_STATE, _parallel_state(4, 3, initialized=False))
    assert (BlocksparseParams(**PHI3_PARAMS).tp_size, BlocksparseParams(**PHI3_PARAMS).tp_rank) == (1, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with pytest.raises(ValueError, match="need tp_size and tp_rank"):
            VllmStyleLayer("auto", "cpu")
        gen = torch.Generator().manual_seed(7)  # the same global inputs on every rank
        n = 200
        q, k, v = (torch.randn(n, world * h, D, generator=gen) for h in (HQ, HKV, HKV))
        global_pattern = BlocksparseParams(**dict(PHI3_PARAMS, num_heads=world * HQ, num_kv_heads=world * HKV),
                                           tp_size=1, tp_rank=0).pattern
        ref, _ = reference.attention_ref(q, k, v, SCALE, global_pattern)
        md = BlocksparseFlashAttentionMetadata.build([n], [0], [list(range(13))], KVBS)
        qh, kh = slice(rank * HQ, (rank + 1) * HQ), slice(rank * HKV, (rank + 1) * HKV)

        def served(tp_rank):
            layer = VllmStyleLayer("auto", "cpu", params=dict(PHI3_PARAMS, tp_size=world, tp_rank=tp_rank))
            return layer.forward(q[:, qh].flatten(1), k[:, kh].flatten(1), v[:, kh].flatten(1),
                                 torch.empty(0), md).view(n, HQ, D)

        assert_close_to_ref(served(rank), ref[:, qh], torch.float32, f"rank {rank} of {world}")
        if rank > 0:  # the pattern of rank 0's heads is not this rank's: the check above can fail
            assert not torch.allclose(served(0), ref[:, qh], atol=1e-3), "heads of rank 0 and 1 see the same keys"
    finally:
        dist.destroy_process_group()


def test_tp_two_gloo_ranks():
    """Without tp params the constructor refuses under a 2-process group; with them each rank matches
    the reference at its global heads."""
    assert_pattern_is_sparse(BlocksparseParams(**dict(PHI3_PARAMS, num_heads=2 * HQ, num_kv_heads=2 * HKV), tp_size=1,
                                               tp_rank=0).pattern, 2 * HQ, 2 * HKV, 200, "tp2")
    mp.spawn(_tp_worker, args=(2, _free_port()), nprocs=2, join=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "fp8-bytes"])
def test_block_moves_on_flash_attention_shaped_caches(device, dtype, gen):
    """vLLM's swap_blocks / copy_blocks on caches of FlashAttention's shape (2, NB, kvbs, Hkv, D)."""
    cache = torch.randn(2, 6, KVBS, HKV, D, generator=gen).to(torch.float8_e4m3fn if dtype == torch.uint8 else dtype)
    cache = (cache.view(torch.uint8) if dtype == torch.uint8 else cache).to(device)
    other = torch.zeros_like(cache, device="cpu")
    BlocksparseFlashAttentionBackend.swap_blocks(cache, other, torch.tensor([[1, 2], [4, 0]]))
    assert torch.equal(other[:, 2], cache[:, 1].cpu()) and torch.equal(other[:, 0], cache[:, 4].cpu())
    BlocksparseFlashAttentionBackend.copy_blocks([cache], torch.tensor([[0, 5]]))
    assert torch.equal(cache[:, 5], cache[:, 0])
