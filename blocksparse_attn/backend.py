"""vLLM-style attention backend: Backend (static helpers), Impl (one attention layer's forward).

Engines written against vLLM's block-sparse backend (Phi-3-small) find the same class, method and
argument names here. The layer is thin: it checks configuration values on the host, slices the batch
into its prefill and decode parts and calls the ops, which check the tensors.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import torch

from . import kv_cache as kv
from . import ops
from .metadata import BlocksparseFlashAttentionMetadata, BlocksparseParams

SUPPORTED_HEAD_SIZES = (64, 80, 96, 112, 128, 256)  # as csrc/common/checks.h


class BlocksparseFlashAttentionBackend:
    @staticmethod
    def get_name() -> str:
        return "BLOCK_SPARSE_FLASH_ATTN"

    @staticmethod
    def get_impl_cls() -> type[BlocksparseFlashAttentionImpl]:
        return BlocksparseFlashAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[BlocksparseFlashAttentionMetadata]:
        return BlocksparseFlashAttentionMetadata

    @classmethod
    def make_metadata(cls, *args, **kwargs) -> BlocksparseFlashAttentionMetadata:
        return cls.get_metadata_cls()(*args, **kwargs)

    @staticmethod
    def get_supported_head_sizes() -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """(2, num_blocks, block_size * num_kv_heads * head_size); see kv_cache.py for the layout inside."""
        return kv.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    @staticmethod
    def swap_blocks(src_kv_cache: torch.Tensor, dst_kv_cache: torch.Tensor, src_to_dst: torch.Tensor) -> None:
        """src_to_dst [N, 2] int64 (CPU or device): block src of src_kv_cache -> block dst of dst_kv_cache."""
        kv.swap_blocks(src_kv_cache, dst_kv_cache, src_to_dst)

    @staticmethod
    def copy_blocks(kv_caches: Sequence[torch.Tensor], src_to_dists: torch.Tensor) -> None:
        """src_to_dists [N, 2] int64 (CPU or device): in every layer's cache, block src -> block dst."""
        kv.copy_blocks(kv_caches, src_to_dists)


def _is_decoder(attn_type) -> bool:
    # vLLM's AttentionType was an Enum in some versions and a class of string constants in others.
    name = getattr(attn_type, "name", attn_type)
    return attn_type is None or str(name).lower() == "decoder"


class BlocksparseFlashAttentionImpl:
    """One decoder self-attention layer over a paged KV cache with Phi-3-small block sparsity.

    blocksparse_params: a dict of BlocksparseParams' fields (or a BlocksparseParams); num_heads and
    num_kv_heads may be left out and are taken from this layer (per tensor-parallel rank).
    Not supported (rejected at construction): ALiBi, sliding window, logit soft-capping, a
    quantized KV cache (kv_cache_dtype other than "auto"), attention types other than decoder.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", blocksparse_params: dict | BlocksparseParams | None = None,
                 logits_soft_cap: float | None = None, attn_type=None):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if alibi_slopes is not None:
            raise NotImplementedError("alibi_slopes: ALiBi is not supported by the block-sparse backend")
        if sliding_window is not None:
            raise NotImplementedError(f"sliding_window={sliding_window!r}: sliding-window attention is not "
                                      "supported by the block-sparse backend (its pattern has a local band)")
        if logits_soft_cap:
            raise NotImplementedError(f"logits_soft_cap={logits_soft_cap!r}: soft-capping is not supported")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(f"kv_cache_dtype={kv_cache_dtype!r}: only 'auto' (the cache holds the "
                                      "model's dtype) is supported; quantized (fp8) caches are not")
        if not _is_decoder(attn_type):
            raise NotImplementedError(f"attn_type={attn_type!r}: only decoder self-attention is supported")
        if head_size not in SUPPORTED_HEAD_SIZES:
            raise ValueError(f"head_size={head_size} is not supported; supported head sizes are "
                             f"{list(SUPPORTED_HEAD_SIZES)}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must be >= 1 and divide num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.blocksparse_params = self._make_params(blocksparse_params)
        self.pattern = self.blocksparse_params.pattern  # built once, used by every forward

    def _make_params(self, blocksparse_params) -> BlocksparseParams:
        if blocksparse_params is None:
            raise ValueError("blocksparse_params is required: the block-sparse backend needs the sparsity "
                             "pattern (max_seqlen, block_size, local_blocks, vert_stride, ...)")
        if isinstance(blocksparse_params, BlocksparseParams):
            blocksparse_params = {f.name: getattr(blocksparse_params, f.name)
                                  for f in fields(BlocksparseParams) if f.init}
        params = dict(blocksparse_params)
        for name, ours in (("num_heads", self.num_heads), ("num_kv_heads", self.num_kv_heads)):
            if params.setdefault(name, ours) != ours:
                raise ValueError(f"blocksparse_params[{name!r}] = {params[name]} differs from the layer's "
                                 f"{name} = {ours} (both count heads on this tensor-parallel rank)")
        try:
            return BlocksparseParams(**params)
        except TypeError as e:  # an unknown or missing key
            raise ValueError(f"blocksparse_params: {e}") from None

    def _check_seq_lens(self, m: BlocksparseFlashAttentionMetadata) -> None:
        # Host-side integers only: reading seq_lens_tensor would sync with the device.
        longest = max(m.max_prefill_seq_len or 0, m.max_decode_seq_len or 0,
                      max(m.seq_lens, default=0) if m.seq_lens is not None else 0)
        if longest > self.blocksparse_params.max_seqlen:
            raise ValueError(f"a sequence of {longest} tokens exceeds blocksparse_params.max_seqlen = "
                             f"{self.blocksparse_params.max_seqlen}")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: BlocksparseFlashAttentionMetadata, k_scale: float = 1.0, v_scale: float = 1.0,
                attn_type=None, output: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, Hq*D], key/value [T, Hkv*D] (unit last stride, e.g. slices of a fused QKV),
        kv_cache [2, NB, kvbs*Hkv*D] or empty (memory profiling) -> out [T, Hq*D] (into `output` if given).

        Writes the batch's new k/v to the cache (slot_mapping), then answers the prefill rows (the first
        num_prefill_tokens) and the decode rows (the next num_decode_tokens); rows after those are
        padding and come back zero. Prefill reads keys from the cache when its block_tables are non-empty
        and the cache is non-empty (chunked prefill / cached prefix); otherwise it attends among the new
        tokens only. With an empty cache that is also what happens to a prefill with context (nothing is
        cached to read), as in vLLM. k_scale / v_scale have no effect: with kv_cache_dtype "auto" the cache
        is not quantized (vLLM behaves the same). No host synchronisation: decode-only batches can be
        captured in a CUDA graph.
        """
        if not _is_decoder(attn_type):
            raise NotImplementedError(f"attn_type={attn_type!r}: only decoder self-attention is supported")
        m = attn_metadata
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_size
        if query.shape[-1] != hq * d or key.shape[-1] != hkv * d or value.shape[-1] != hkv * d:
            raise ValueError(f"query/key/value must be [T, {hq}*{d}] / [T, {hkv}*{d}] / [T, {hkv}*{d}], got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        num_prefill, num_real = m.num_prefill_tokens, m.num_prefill_tokens + m.num_decode_tokens
        if num_real > query.shape[0] or num_real > key.shape[0] or num_real > value.shape[0]:
            raise ValueError(f"attn_metadata has {num_real} tokens but query/key/value have {query.shape[0]}/"
                             f"{key.shape[0]}/{value.shape[0]} rows")
        self._check_seq_lens(m)

        q, k, v = query.view(-1, hq, d), key.view(-1, hkv, d), value.view(-1, hkv, d)
        out = torch.empty_like(query) if output is None else output
        out3 = out.view(-1, hq, d)
        has_cache = kv_cache.numel() > 0
        if has_cache:
            key_cache, value_cache = kv.split_kv_cache(kv_cache, hkv, d)
            ops.write_kv_cache(k[:num_real], v[:num_real], key_cache, value_cache, m.slot_mapping[:num_real])

        prefill = m.prefill_metadata
        if prefill is not None:
            if prefill.query_start_loc is None:
                raise ValueError("attn_metadata.query_start_loc is required for prefill tokens")
            q_pre, out_pre = q[:num_prefill], out3[:num_prefill]
            if has_cache and prefill.block_tables is not None and prefill.block_tables.numel() > 0:
                ops.paged_prefill(q_pre, key_cache, value_cache, prefill.block_tables, prefill.query_start_loc,
                                  prefill.seq_lens_tensor, self.scale, self.pattern, out=out_pre)
            else:
                ops.varlen_prefill(q_pre, k[:num_prefill], v[:num_prefill], prefill.query_start_loc,
                                   prefill.query_start_loc, self.scale, self.pattern, out=out_pre)

        decode = m.decode_metadata
        if decode is not None:
            if not has_cache:
                raise ValueError("decode tokens need a KV cache, got an empty kv_cache")
            ops.paged_decode(q[num_prefill:num_real], key_cache, value_cache, decode.block_tables,
                             decode.seq_lens_tensor, self.scale, self.pattern, out=out3[num_prefill:num_real])

        if num_real < out.shape[0]:
            out[num_real:].zero_()
        return out
