"""The paged KV cache as the backend sees it: shape, allocation, key/value views, block copies.

One layer's cache is a single tensor of vLLM's shape `(2, num_blocks, kvbs * Hkv * D)` (index 0 keys,
1 values), so engines that allocate from `get_kv_cache_shape` keep working. Inside a block the last
dimension is laid out HND: `[Hkv, kvbs, D]`, i.e. all tokens of one kv head are contiguous. A kernel
walking one kv head's keys then reads `kvbs * D` contiguous elements per block (16 tokens x 128 dims
x 2 bytes = 4 KiB for bf16), instead of `D`-element pieces strided by `Hkv * D` as in an NHD layout.
Slot `block * kvbs + offset` names token `offset` of physical block `block`.

Any contiguous `[2, num_blocks, ...]` tensor with kvbs * Hkv * D elements per block is accepted too (vLLM's
v0 runner allocates FlashAttention's `(2, num_blocks, kvbs, Hkv, D)` for every layer); the layout inside
a block stays ours, so such a cache must not be shared with another backend.

A cache may hold fp8 (`kv_cache_dtype` "fp8" / "fp8_e4m3" -> torch.float8_e4m3fn, "fp8_e5m2" ->
torch.float8_e5m2) or bytes (torch.uint8, read as the configured fp8 format).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import ops


# vLLM's kv_cache_dtype names of the quantized formats ("fp8" is e4m3, as on vLLM's CUDA platforms).
FP8_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def fp8_dtype_of(kv_cache_dtype: str) -> torch.dtype | None:
    """The fp8 format of a kv_cache_dtype name: None for "auto" (the cache holds the model's dtype)."""
    if kv_cache_dtype == "auto":
        return None
    if kv_cache_dtype not in FP8_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; expected 'auto' or one of "
                         f"{sorted(FP8_CACHE_DTYPES)}")
    return FP8_CACHE_DTYPES[kv_cache_dtype]


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, int, int]:
    """(2, num_blocks, block_size * num_kv_heads * head_size); block_size is the cache's kvbs."""
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    for name, value in (("block_size", block_size), ("num_kv_heads", num_kv_heads), ("head_size", head_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return (2, num_blocks, block_size * num_kv_heads * head_size)


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                      dtype: torch.dtype | str = torch.float16, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised cache [2, num_blocks, block_size * num_kv_heads * head_size] of `dtype`: a torch
    dtype (the model's, an fp8 format or torch.uint8) or a quantized kv_cache_dtype name ("fp8", ...)."""
    if isinstance(dtype, str):
        dtype = fp8_dtype_of(dtype)
        if dtype is None:
            raise ValueError("allocate_kv_cache: dtype='auto' names no dtype; pass the model's torch dtype")
    return torch.empty(kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size), dtype=dtype, device=device)


def split_kv_cache(kv_cache: torch.Tensor, num_kv_heads: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (key_cache, value_cache), each [num_blocks, Hkv, kvbs, D] (HND inside a block), of a cache
    [2, num_blocks, kvbs * Hkv * D] (or any contiguous [2, num_blocks, ...] with that many elements per
    block); kvbs is inferred. No copy: writes through the views land in kv_cache."""
    if kv_cache.dim() < 3 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, kv_block_size * num_kv_heads * head_size] (or a "
                         f"contiguous [2, num_blocks, ...]), got shape {tuple(kv_cache.shape)}")
    if kv_cache.dim() > 3:
        if not kv_cache.is_contiguous():
            raise ValueError(f"a kv_cache of shape {tuple(kv_cache.shape)} must be contiguous to be read as "
                             f"[2, num_blocks, kv_block_size * num_kv_heads * head_size]")
        kv_cache = kv_cache.view(2, kv_cache.shape[1], math.prod(kv_cache.shape[2:]))
    per_token = num_kv_heads * head_size
    if per_token <= 0 or kv_cache.shape[2] % per_token:
        raise ValueError(f"kv_cache's last dimension {kv_cache.shape[2]} is not a multiple of num_kv_heads * "
                         f"head_size = {num_kv_heads} * {head_size}")
    num_blocks, kvbs = kv_cache.shape[1], kv_cache.shape[2] // per_token
    shape = (num_blocks, num_kv_heads, kvbs, head_size)
    return kv_cache[0].view(shape), kv_cache[1].view(shape)


def _block_mapping(mapping, device: torch.device) -> torch.Tensor:
    """mapping [N, 2] (src, dst) as a tensor on `device`. Tensors keep their dtype (the op checks it is
    int64); sequences of pairs become int64."""
    if not isinstance(mapping, torch.Tensor):
        mapping = torch.tensor(list(mapping), dtype=torch.int64).reshape(-1, 2)
    return mapping.to(device)  # blocking: a non-blocking device->host copy could be read before it lands


def copy_blocks(kv_caches: Sequence[torch.Tensor], block_mapping) -> None:
    """In every cache [2, NB, ...] of kv_caches, copy block src to dst (keys and values) for each row of
    block_mapping [N, 2] int64, given on the CPU or on the caches' device (moved to the caches' device)."""
    kv_caches = list(kv_caches)
    if not kv_caches:
        return
    ops.copy_blocks(kv_caches, _block_mapping(block_mapping, kv_caches[0].device))


def swap_blocks(src_kv_cache: torch.Tensor, dst_kv_cache: torch.Tensor, block_mapping) -> None:
    """Copy block src of src_kv_cache to block dst of dst_kv_cache (caches [2, NB, ...], possibly on
    different devices) for each row of block_mapping [N, 2] int64 (moved to the CPU, where the op reads it)."""
    ops.swap_blocks(src_kv_cache, dst_kv_cache, _block_mapping(block_mapping, torch.device("cpu")))
