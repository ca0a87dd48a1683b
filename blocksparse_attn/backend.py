"""vLLM-style attention backend: Backend (static helpers), Impl (one attention layer's forward).

Engines written against vLLM's block-sparse backend (Phi-3-small) find the same class, method and
argument names here. The layer is thin: it checks configuration values on the host, slices the batch
into its prefill and decode parts and calls the ops, which check the tensors.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields

import torch

from . import kv_cache as kv
from . import ops
from .metadata import BlocksparseFlashAttentionMetadata, BlocksparseParams, prefill_block_tables

from .supported import HEAD_SIZES as SUPPORTED_HEAD_SIZES


class BlocksparseFlashAttentionBackend:
    # vLLM's Attention layer then allocates the output and passes it (as [T, Hq, D]) to forward.
    accept_output_buffer: bool = True

    @staticmethod
    def get_name() -> str:
        return "BLOCK_SPARSE_FLASH_ATTN"

    @staticmethod
    def get_impl_cls() -> type[BlocksparseFlashAttentionImpl]:
        return BlocksparseFlashAttentionImpl

    @staticmethod
    def get_metadata_cls() -> type[BlocksparseFlashAttentionMetadata]:
        return BlocksparseFlashAttentionMetadata

    @staticmethod
    def get_builder_cls():
        """vLLM's common metadata builder producing our metadata (needs vLLM 0.7-0.9 installed)."""
        return _vllm_classes()[0]

    @staticmethod
    def get_state_cls():
        """vLLM's common attention state (CUDA-graph buffers; needs vLLM 0.7-0.9 installed)."""
        return _vllm_classes()[1]

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


_VLLM_CLASSES: tuple | None = None


def _vllm_classes() -> tuple[type, type]:
    """(metadata builder, attention state) classes from vLLM's common backend utilities, built once."""
    global _VLLM_CLASSES
    if _VLLM_CLASSES is None:
        try:
            from vllm.attention.backends.utils import CommonAttentionState, CommonMetadataBuilder
        except ImportError as e:
            raise NotImplementedError("the metadata builder and attention state are vLLM's own classes "
                                      f"(vLLM 0.7-0.9), and vLLM's common backend utilities do not import: {e}") from e
        builder = type("BlocksparseFlashAttentionMetadataBuilder", (CommonMetadataBuilder,),
                       {"_metadata_cls": BlocksparseFlashAttentionMetadata})
        _VLLM_CLASSES = (builder, CommonAttentionState)
    return _VLLM_CLASSES


def _is_decoder(attn_type) -> bool:
    # vLLM's AttentionType was an Enum in some versions and a class of string constants in others.
    name = getattr(attn_type, "name", attn_type)
    return attn_type is None or str(name).lower() == "decoder"


def _layer_scale(layer, name: str):
    """A layer's per-tensor K or V scale as vLLM keeps it: the float32 tensor `_k_scale` (read on the
    device, so captured graphs see updates), else the float `_k_scale_float`, else 1."""
    scale = getattr(layer, f"_{name}", None)
    if isinstance(scale, torch.Tensor):
        return scale
    return float(getattr(layer, f"_{name}_float", 1.0))


class BlocksparseFlashAttentionImpl:
    """One decoder self-attention layer over a paged KV cache with Phi-3-small block sparsity.

    The constructor takes vLLM's arguments, positionally or by keyword (vLLM 0.7-0.9 pass eleven, then
    keyword extras). blocksparse_params: a dict of BlocksparseParams' fields (or a BlocksparseParams);
    num_heads and num_kv_heads may be left out and are taken from this layer (per tensor-parallel rank),
    tp_size / tp_rank too (see BlocksparseParams). kv_cache_dtype: "auto" (the cache holds the model's
    dtype), "fp8" / "fp8_e4m3" or "fp8_e5m2" (the cache holds that fp8 format, or bytes read as it).
    Not supported (rejected at construction): ALiBi, sliding window, logit soft-capping, attention
    types other than decoder, KV sharing between layers, and any keyword extra that turns a feature on.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", blocksparse_params: dict | BlocksparseParams | None = None,
                 logits_soft_cap: float | None = None, attn_type=None,
                 kv_sharing_target_layer_name: str | None = None, **extra_impl_args):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if alibi_slopes is not None:
            raise NotImplementedError("alibi_slopes: ALiBi is not supported by the block-sparse backend")
        if sliding_window is not None:
            raise NotImplementedError(f"sliding_window={sliding_window!r}: sliding-window attention is not "
                                      "supported by the block-sparse backend (its pattern has a local band)")
        if logits_soft_cap:
            raise NotImplementedError(f"logits_soft_cap={logits_soft_cap!r}: soft-capping is not supported")
        if not _is_decoder(attn_type):
            raise NotImplementedError(f"attn_type={attn_type!r}: only decoder self-attention is supported")
        if kv_sharing_target_layer_name is not None:
            raise NotImplementedError(f"kv_sharing_target_layer_name={kv_sharing_target_layer_name!r}: sharing "
                                      "another layer's KV cache is not supported; each layer owns its cache")
        enabled = {name: value for name, value in extra_impl_args.items() if value not in (None, False, 0)}
        if enabled:  # vLLM passes extras such as use_irope=False; one that turns a feature on is refused
            raise NotImplementedError(f"{enabled}: these options are not supported by the block-sparse backend")
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
        self.fp8_dtype = kv.fp8_dtype_of(kv_cache_dtype)  # None: the cache holds the model's dtype
        self.blocksparse_params = self._make_params(blocksparse_params)
        self.pattern = self.blocksparse_params.pattern  # built once, used by every forward
        self._scale_tensors: dict[tuple[float, torch.device], torch.Tensor] = {}

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

    def _check_seq_lens(self, m) -> None:
        # Host-side integers only: reading seq_lens_tensor would sync with the device.
        seq_lens = getattr(m, "seq_lens", None)
        longest = max(m.max_prefill_seq_len or 0, m.max_decode_seq_len or 0,
                      max(seq_lens, default=0) if seq_lens is not None else 0)
        if longest > self.blocksparse_params.max_seqlen:
            raise ValueError(f"a sequence of {longest} tokens exceeds blocksparse_params.max_seqlen = "
                             f"{self.blocksparse_params.max_seqlen}")
        if (getattr(m, "max_decode_query_len", None) or 0) > 1:
            raise NotImplementedError(f"max_decode_query_len={m.max_decode_query_len}: decode queries of more "
                                      "than one token (speculative decoding) are not supported")

    def _cache_views(self, kv_cache: torch.Tensor, per_kv_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_cache, value_cache) [NB, Hkv, kvbs, D] of a non-empty cache ([NB, 1, kvbs, D] with per-kv-head
        pages), bytes read as the fp8 format."""
        if self.fp8_dtype is None:
            if kv_cache.dtype == torch.uint8 or kv_cache.dtype in kv.FP8_CACHE_DTYPES.values():
                raise ValueError(f"kv_cache has dtype {kv_cache.dtype} but kv_cache_dtype is 'auto' (the "
                                 "model's dtype); construct the layer with kv_cache_dtype='fp8', 'fp8_e4m3' or "
                                 "'fp8_e5m2' for a quantized cache")
        elif kv_cache.dtype == torch.uint8:
            kv_cache = kv_cache.view(self.fp8_dtype)
        elif kv_cache.dtype != self.fp8_dtype:
            raise ValueError(f"kv_cache has dtype {kv_cache.dtype}, but kv_cache_dtype={self.kv_cache_dtype!r} "
                             f"expects {self.fp8_dtype} (or torch.uint8 bytes read as it)")
        return kv.split_kv_cache(kv_cache, 1 if per_kv_head else self.num_kv_heads, self.head_size)

    def _scale_tensor(self, scale, name: str, device: torch.device) -> torch.Tensor | None:
        """A K/V scale as the ops take it (a float32 one-element tensor on the cache's device), or None for
        a cache of the model's dtype (scales have no effect there). Tensors are passed as they are (the ops
        check dtype, size and device; their values on the CPU and under BSA_CHECK_INPUTS=1)."""
        if self.fp8_dtype is None:
            return None
        if isinstance(scale, torch.Tensor):
            return scale
        value = float(scale)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name}={scale!r} must be a positive finite number")
        key = (value, device)
        if key not in self._scale_tensors:  # one small tensor per value: no allocation or copy per step
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # a fill recorded in a graph would not run before eager calls read the tensor
                raise ValueError(f"{name}={value}: a float scale first seen inside a CUDA graph capture; run "
                                 "one eager step with it before capturing, or pass a float32 tensor")
            self._scale_tensors[key] = torch.full((1,), value, dtype=torch.float32, device=device)
        return self._scale_tensors[key]

    def _prefill_tables(self, prefill, num_prefills: int, kv_block_size: int):
        """(block_tables, seq_lens) a prefill with a non-empty cache reads through. The new tokens' blocks
        come from the slots they were just written to: a prompt then reads its own pages even where the
        engine padded its table row (a batch mixing cached prefixes with new prompts), and an fp8 prompt
        without context reads its K/V back as stored, as a later chunk or decode will. Built once per
        batch (every layer shares the metadata) and kept on the prefill metadata."""
        key = (kv_block_size, self.fp8_dtype is not None)
        cached = getattr(prefill, "_blocksparse_tables", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        tables, seq_lens = prefill.block_tables, prefill.seq_lens_tensor
        given = tables is not None and tables.numel() > 0
        context = getattr(prefill, "context_lens_tensor", None)
        max_len = prefill.max_prefill_seq_len or prefill.max_query_len
        qsl = prefill.query_start_loc
        if given and context is not None:
            tables = prefill_block_tables(prefill.slot_mapping, qsl, context, tables, num_prefills, max_len,
                                          kv_block_size)
        elif not given and self.fp8_dtype is not None:
            tables = prefill_block_tables(prefill.slot_mapping, qsl, None, None, num_prefills, max_len, kv_block_size)
            seq_lens = qsl[1:num_prefills + 1] - qsl[:num_prefills]
        try:
            prefill._blocksparse_tables = (key, (tables, seq_lens))
        except AttributeError:  # metadata that takes no new attributes: rebuilt per layer
            pass
        return tables, seq_lens

    def forward(self, query, key, value, kv_cache, attn_metadata, k_scale=1.0, v_scale=1.0, attn_type=None,
                output: torch.Tensor | None = None, output_scale=None) -> torch.Tensor:
        """Two call styles, told apart by the first argument:

        direct:       forward(query, key, value, kv_cache, attn_metadata, k_scale=1.0, v_scale=1.0,
                              attn_type=None, output=None);
        vLLM 0.7-0.9: forward(layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None),
                      the K/V scales read from layer._k_scale / _v_scale (tensors) or _k_scale_float /
                      _v_scale_float. output_scale (a quantized output) must be None.

        query [T, Hq*D] or [T, Hq, D], key/value [T, Hkv*D] or [T, Hkv, D] (unit last stride, e.g. slices of
        a fused QKV); kv_cache [2, NB, kvbs*Hkv*D] (or any contiguous [2, NB, ...] of that size) or empty
        (memory profiling) -> out shaped like query (into `output` if given, which is returned). Per-kv-head
        pages (docs/semantics.md): metadata with slot_mapping [N, Hkv] and block_tables [S, Hkv, max_blocks]
        over a cache of kvbs*D elements per block (kv_cache_shape with num_kv_heads=1).

        Writes the batch's new k/v to the cache (slot_mapping), then answers the prefill rows (the first
        num_prefill_tokens) and the decode rows (the next num_decode_tokens); rows after those are
        padding and come back zero. Prefill reads keys from the cache when its block_tables are non-empty
        and the cache is non-empty (chunked prefill / cached prefix); otherwise it attends among the new
        tokens only. With an empty cache that is also what happens to a prefill with context (nothing is
        cached to read), as in vLLM. With an fp8 cache every attention reads K/V as stored (the tokens
        written in this step too, through block tables built from their slots), so an output does not
        depend on how a prompt was chunked; k_scale / v_scale (floats or one-element float32 tensors on
        the cache's device) quantize and dequantize: stored = fp8(x / scale), read = float(stored) * scale.
        With kv_cache_dtype "auto" the scales have no effect. No host synchronisation: decode-only
        batches can be captured in a CUDA graph (tensor scales are then read at replay).
        """
        if not isinstance(query, torch.Tensor):  # vLLM's style: the layer comes first, everything shifts by one
            if not (isinstance(v_scale, float) and v_scale == 1.0) or attn_type is not None:
                raise TypeError("forward(layer, query, key, value, kv_cache, attn_metadata) takes no further "
                                "positional arguments; pass output= and output_scale= by keyword")
            layer, query, key, value, kv_cache, attn_metadata = query, key, value, kv_cache, attn_metadata, k_scale
            k_scale, v_scale = _layer_scale(layer, "k_scale"), _layer_scale(layer, "v_scale")
        if output_scale is not None:
            raise NotImplementedError("output_scale: a quantized attention output is not supported; the "
                                      "output stays in the model's dtype")
        return self._forward(query, key, value, kv_cache, attn_metadata, k_scale, v_scale, attn_type, output)

    def _forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 attn_metadata, k_scale, v_scale, attn_type, output: torch.Tensor | None) -> torch.Tensor:
        if not _is_decoder(attn_type):
            raise NotImplementedError(f"attn_type={attn_type!r}: only decoder self-attention is supported")
        m = attn_metadata
        if not hasattr(m, "num_prefill_tokens"):  # e.g. vLLM's V1 engine: None while profiling, else its own
            raise NotImplementedError(f"attn_metadata of type {type(m).__name__} is not V0-style metadata "
                                      "(num_prefills / num_prefill_tokens / num_decode_tokens ...); under vLLM "
                                      "0.8-0.9 run the V0 engine (VLLM_USE_V1=0)")
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_size
        if key is None or value is None:
            raise ValueError("key and value are required (decoder self-attention writes them to the cache)")
        for name, t, heads in (("query", query, hq), ("key", key, hkv), ("value", value, hkv)):
            if t.dim() not in (2, 3) or t.shape[1:].numel() != heads * d or (t.dim() == 3 and t.shape[1] != heads):
                raise ValueError(f"{name} must be [T, {heads}*{d}] or [T, {heads}, {d}], got {tuple(t.shape)}")
        num_prefill, num_real = m.num_prefill_tokens, m.num_prefill_tokens + m.num_decode_tokens
        if num_real > query.shape[0] or num_real > key.shape[0] or num_real > value.shape[0]:
            raise ValueError(f"attn_metadata has {num_real} tokens but query/key/value have {query.shape[0]}/"
                             f"{key.shape[0]}/{value.shape[0]} rows")
        self._check_seq_lens(m)
        if output is not None and (output.shape[0] != query.shape[0] or output.shape[1:].numel() != hq * d):
            raise ValueError(f"output must hold [{query.shape[0]}, {hq}*{d}] elements like query, got shape "
                             f"{tuple(output.shape)}")

        q, k, v = query.view(-1, hq, d), key.view(-1, hkv, d), value.view(-1, hkv, d)
        out = torch.empty_like(query) if output is None else output
        out3 = out.view(-1, hq, d)
        has_cache = kv_cache.numel() > 0
        scales = {}
        if has_cache:
            key_cache, value_cache = self._cache_views(kv_cache, per_kv_head=m.slot_mapping.dim() == 2)
            scales = dict(k_scale=self._scale_tensor(k_scale, "k_scale", kv_cache.device),
                          v_scale=self._scale_tensor(v_scale, "v_scale", kv_cache.device))
            ops.write_kv_cache(k[:num_real], v[:num_real], key_cache, value_cache, m.slot_mapping[:num_real],
                               **scales)

        prefill = m.prefill_metadata
        if prefill is not None:
            if prefill.query_start_loc is None:
                raise ValueError("attn_metadata.query_start_loc is required for prefill tokens")
            q_pre, out_pre = q[:num_prefill], out3[:num_prefill]
            tables, seq_lens = prefill.block_tables, prefill.seq_lens_tensor
            if has_cache:
                tables, seq_lens = self._prefill_tables(prefill, m.num_prefills, key_cache.shape[2])
            if has_cache and tables is not None and tables.numel() > 0:
                ops.paged_prefill(q_pre, key_cache, value_cache, tables, prefill.query_start_loc, seq_lens,
                                  self.scale, self.pattern, out=out_pre, **scales)
            else:
                ops.varlen_prefill(q_pre, k[:num_prefill], v[:num_prefill], prefill.query_start_loc,
                                   prefill.query_start_loc, self.scale, self.pattern, out=out_pre)

        decode = m.decode_metadata
        if decode is not None:
            if not has_cache:
                raise ValueError("decode tokens need a KV cache, got an empty kv_cache")
            ops.paged_decode(q[num_prefill:num_real], key_cache, value_cache, decode.block_tables,
                             decode.seq_lens_tensor, self.scale, self.pattern, out=out3[num_prefill:num_real],
                             **scales)

        if num_real < out.shape[0]:
            out[num_real:].zero_()
        return out
