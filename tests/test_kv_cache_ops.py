"""The KV-cache ops (write_kv_cache, copy_blocks, swap_blocks) against blocksparse_attn.reference.

These ops only move data, so results must match the reference bit for bit. Caches are allocated in
the backend shape [2, NB, kvbs * Hkv * D] and the attention ops' 4-D views are taken from it
(key_cache = kv_cache[0].view(NB, Hkv, kvbs, D)), as the backend does.
"""
from __future__ import annotations

import pytest
import torch

from _helpers import DTYPE_IDS, randn
from blocksparse_attn import ops, reference
from conftest import DEVICES, HAS_CUDA

_ops = torch.ops.blocksparse_attn

# ---- the axes (STYLE rule 12) ----------------------------------------------------------------------
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KV_BLOCK_SIZES = (16, 32, 64)
HEAD_DIMS = (64, 128, 80)
KV_HEADS = ((1, 4), (2, 1), (4, 2))  # (Hkv, q heads per kv head): the fused QKV has q_per_kv + 2 slices
# (src, dst) of swap_blocks; under DEVICE=cuda only the pairs that involve the GPU
SWAP_DEVICES = tuple(p for p in (("cpu", "cpu"), ("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda"))
                     if "cuda" in p or "cpu" in DEVICES)

dtype_ids = DTYPE_IDS.get


def new_cache(num_blocks, kvbs, hkv, d, dtype, gen, device) -> torch.Tensor:
    """A backend-shaped cache [2, NB, kvbs * Hkv * D] of random values (so every slot is recognisable)."""
    return randn((2, num_blocks, kvbs * hkv * d), dtype, gen).to(device)


def halves(kv_cache, hkv, d):
    nb, kvbs = kv_cache.shape[1], kv_cache.shape[2] // (hkv * d)
    return kv_cache[0].view(nb, hkv, kvbs, d), kv_cache[1].view(nb, hkv, kvbs, d)


def assert_same(got, want, config):
    got = got.cpu()
    assert got.shape == want.shape, f"[{config}] shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got != want) & ~(got.isnan() & want.isnan())
    assert not diff.any(), f"[{config}] {int(diff.sum())} elements differ, first at {diff.nonzero()[0].tolist()}"


def skip_without(device):
    if device.startswith("cuda") and not HAS_CUDA:
        pytest.skip("CUDA is not available")


# ---- write_kv_cache --------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", KV_HEADS, ids=lambda h: f"Hkv{h[0]}-qpk{h[1]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("kv_block_size", KV_BLOCK_SIZES, ids=lambda x: f"kvbs{x}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_write_kv_cache(device, dtype, kv_block_size, head_dim, heads, gen):
    """key/value are strided views of a fused QKV [T, Hkv, q_per_kv + 2, D]; slots < 0 are skipped."""
    hkv, q_per_kv = heads
    num_blocks, num_tokens = 7, 50
    qkv = randn((num_tokens, hkv, q_per_kv + 2, head_dim), dtype, gen).to(device)
    key, value = qkv[:, :, q_per_kv], qkv[:, :, q_per_kv + 1]
    assert not key.is_contiguous() and key.stride(-1) == 1
    # distinct slots (two tokens writing one slot have no defined winner), the first and last included
    inner = torch.randperm(num_blocks * kv_block_size - 2, generator=gen)[:num_tokens - 2] + 1
    slots = torch.cat([torch.tensor([0, num_blocks * kv_block_size - 1]), inner])
    slots[torch.rand(num_tokens, generator=gen) < 0.25] = -1  # padding tokens
    kv_cache = new_cache(num_blocks, kv_block_size, hkv, head_dim, dtype, gen, device)
    key_cache, value_cache = halves(kv_cache, hkv, head_dim)
    want_k, want_v = reference.write_kv_cache_ref(key.cpu(), value.cpu(), key_cache.cpu(), value_cache.cpu(), slots)
    _ops.write_kv_cache(key, value, key_cache, value_cache, slots.to(device))
    config = f"write_kv_cache {device} {dtype_ids(dtype)} kvbs={kv_block_size} D={head_dim} Hkv={hkv}"
    assert_same(key_cache, want_k, config + " keys")
    assert_same(value_cache, want_v, config + " values")


def test_write_kv_cache_empty_and_all_padding(device, gen):
    kv_cache = new_cache(3, 16, 2, 64, torch.float16, gen, device)
    before = kv_cache.clone()
    key_cache, value_cache = halves(kv_cache, 2, 64)
    empty = torch.empty(0, 2, 64, dtype=torch.float16, device=device)
    ops.write_kv_cache(empty, empty, key_cache, value_cache, torch.empty(0, dtype=torch.int64, device=device))
    k = randn((4, 2, 64), torch.float16, gen).to(device)
    ops.write_kv_cache(k, k, key_cache, value_cache, torch.full((4,), -1, dtype=torch.int64, device=device))
    assert_same(kv_cache, before.cpu(), f"no-op writes {device}")


# ---- copy_blocks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_block_size", KV_BLOCK_SIZES, ids=lambda x: f"kvbs{x}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_copy_blocks(device, dtype, kv_block_size, gen):
    """Three layers; one source forked to two destinations (copy-on-write of a shared prefix)."""
    num_blocks, hkv, d = 12, 2, 64
    caches = [new_cache(num_blocks, kv_block_size, hkv, d, dtype, gen, device) for _ in range(3)]
    perm = torch.randperm(num_blocks, generator=gen)
    src, dst = perm[:4], perm[4:9]
    mapping = torch.stack([torch.cat([src, src[:1]]), dst], dim=1).to(torch.int64)  # src[0] -> two blocks
    want = reference.copy_blocks_ref([c.cpu() for c in caches], mapping)
    _ops.copy_blocks(caches, mapping.to(device))
    for layer, (got, exp) in enumerate(zip(caches, want)):
        assert_same(got, exp, f"copy_blocks {device} {dtype_ids(dtype)} kvbs={kv_block_size} layer {layer}")


def test_copy_blocks_empty_mapping(device, gen):
    caches = [new_cache(4, 16, 1, 64, torch.bfloat16, gen, device) for _ in range(2)]
    before = [c.clone() for c in caches]
    ops.copy_blocks(caches, torch.empty(0, 2, dtype=torch.int64, device=device))
    for got, exp in zip(caches, before):
        assert_same(got, exp.cpu(), f"copy_blocks empty mapping {device}")


# ---- swap_blocks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("src_device,dst_device", SWAP_DEVICES, ids=[f"{s}-to-{d}" for s, d in SWAP_DEVICES])
def test_swap_blocks(src_device, dst_device, dtype, gen):
    skip_without(src_device)
    skip_without(dst_device)
    hkv, d, kvbs = 2, 64, 16
    src = new_cache(9, kvbs, hkv, d, dtype, gen, src_device)
    dst = new_cache(6, kvbs, hkv, d, dtype, gen, dst_device)
    mapping = torch.tensor([[8, 0], [0, 5], [3, 2], [4, 3]], dtype=torch.int64)  # mapping is always on the CPU
    want = reference.swap_blocks_ref(src.cpu(), dst.cpu(), mapping)
    src_before = src.clone()
    _ops.swap_blocks(src, dst, mapping)
    config = f"swap_blocks {src_device}->{dst_device} {dtype_ids(dtype)}"
    assert_same(dst, want, config)
    assert_same(src, src_before.cpu(), config + " (source changed)")


# ---- torch.library.opcheck -----------------------------------------------------------------------

def test_opcheck_write_kv_cache(device, gen):
    qkv = randn((10, 2, 3, 64), torch.float16, gen).to(device)
    kv_cache = new_cache(4, 16, 2, 64, torch.float16, gen, device)
    key_cache, value_cache = halves(kv_cache, 2, 64)
    slots = torch.tensor([3, -1, 17, 63, 0, 5, -1, 40, 41, 2], dtype=torch.int64, device=device)
    torch.library.opcheck(_ops.write_kv_cache.default, (qkv[:, :, 1], qkv[:, :, 2], key_cache, value_cache, slots))


def test_opcheck_copy_blocks(device, gen):
    caches = [new_cache(5, 16, 1, 64, torch.float32, gen, device) for _ in range(2)]
    mapping = torch.tensor([[0, 3], [1, 4]], dtype=torch.int64, device=device)
    torch.library.opcheck(_ops.copy_blocks.default, (caches, mapping))


def test_opcheck_swap_blocks(device, gen):
    src = new_cache(5, 16, 1, 64, torch.float16, gen, "cpu")
    dst = new_cache(3, 16, 1, 64, torch.float16, gen, device)
    mapping = torch.tensor([[4, 0], [1, 2]], dtype=torch.int64)
    torch.library.opcheck(_ops.swap_blocks.default, (src, dst, mapping))
