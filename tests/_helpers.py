"""Shared pieces of the op tests: seeded inputs, poisoned outputs, the tolerance table, paged caches.

Every attention test follows the same recipe: build random inputs in the tested dtype, compute the
float32 reference (blocksparse_attn.reference) from those same rounded inputs, fill the op's outputs
with NaN, run the op, and compare with `assert_close_to_ref` / `assert_lse_close`. NaN never passes,
so an output element the kernel forgot to write fails the test.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import pathlib

import pytest
import torch

from blocksparse_attn import reference
from blocksparse_attn.layout import SparsePattern

NAN = float("nan")

# Error allowed against the float32 reference computed from the same low-precision inputs. `rel`
# bounds ||out - ref|| / ||ref|| over the whole output; each element must also satisfy
# |out - ref| <= atol + rtol * |ref|. The half-precision numbers are a few times the rounding of the
# output alone (eps/2 = 4.9e-4 for fp16, 3.9e-3 for bf16), which leaves room for P rounded to the
# input dtype before the PV product, as flash kernels do. The LSE is float32 in every case, but it
# may be computed from scores of a query pre-scaled in the input dtype, hence the same rtol.
TOLERANCES = {
    torch.float32: dict(rel=1e-5, atol=1e-5, rtol=1e-5, lse_atol=1e-5, lse_rtol=1e-5),
    torch.float16: dict(rel=2e-3, atol=1e-3, rtol=2e-3, lse_atol=1e-3, lse_rtol=2e-3),
    torch.bfloat16: dict(rel=1.6e-2, atol=8e-3, rtol=1.6e-2, lse_atol=8e-3, lse_rtol=1.6e-2),
}

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@contextlib.contextmanager
def one_thread():
    """Runs the reference single-threaded: its many small matmuls gain nothing from threads and, on a
    busy 2-core machine, lose several times over to thread contention. The ops keep every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def skip_unsupported(device: str, dtype: torch.dtype) -> None:
    """The attention kernels support fp32 on the CPU only (spec: fp16/bf16 on CUDA)."""
    if device.startswith("cuda") and dtype == torch.float32:
        pytest.skip("float32 attention is CPU-only")


def randn(shape, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """CPU tensor of N(0, scale^2) values rounded to dtype."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def poison(*tensors: torch.Tensor):
    """Fills floating tensors with NaN in place (an unwritten element then fails the comparison)."""
    for t in tensors:
        if t is not None:
            t.fill_(NAN)
    return tensors[0] if len(tensors) == 1 else tensors


def _where(index: int, shape) -> str:
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index //= size
    return str(tuple(reversed(coords)))


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, config: str,
                        what: str = "out") -> None:
    """out (any device, dtype) against the float32 reference ref; shape [T, Hq, D] (or anything)."""
    tol = TOLERANCES[dtype]
    out = out.detach().float().cpu()
    assert out.shape == ref.shape, f"[{config}] {what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    bad = ~torch.isfinite(out)
    if bad.any():
        first = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"[{config}] {what}: {int(bad.sum())} of {out.numel()} elements are not finite "
                             f"(unwritten or NaN-contaminated), first at {_where(first, out.shape)} = "
                             f"{out.flatten()[first].item()}")
    if out.numel() == 0:
        return
    err = (out - ref).abs()
    ref_norm = float(ref.norm())
    rel = float((out - ref).norm()) / max(ref_norm, 1e-30)
    worst = int(err.flatten().argmax())
    assert rel <= tol["rel"] or ref_norm == 0.0 and float(err.max()) <= tol["atol"], (
        f"[{config}] {what}: relative error {rel:.3g} > {tol['rel']:.3g} (||ref|| = {ref_norm:.4g}); worst "
        f"element {_where(worst, out.shape)}: {out.flatten()[worst].item():.6g} vs {ref.flatten()[worst].item():.6g}")
    excess = err - (tol["atol"] + tol["rtol"] * ref.abs())
    if (excess > 0).any():
        k = int(excess.flatten().argmax())
        raise AssertionError(
            f"[{config}] {what}: {int((excess > 0).sum())} elements beyond atol {tol['atol']:.3g} + rtol "
            f"{tol['rtol']:.3g} * |ref|; worst at {_where(k, out.shape)}: {out.flatten()[k].item():.6g} vs "
            f"{ref.flatten()[k].item():.6g} (max abs error {float(err.max()):.3g}, relative norm error {rel:.3g})")


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, config: str) -> None:
    """lse [Hq, T] float32: -inf exactly where the reference row sees no key, close elsewhere."""
    tol = TOLERANCES[dtype]
    assert lse.dtype == torch.float32, f"[{config}] lse dtype {lse.dtype}, expected float32"
    lse = lse.detach().cpu()
    assert lse.shape == ref.shape, f"[{config}] lse: shape {tuple(lse.shape)} != reference {tuple(ref.shape)}"
    assert not lse.isnan().any(), (f"[{config}] lse: {int(lse.isnan().sum())} NaN (unwritten?), first at "
                                   f"[head, token] {lse.isnan().nonzero()[0].tolist()}")
    empty = ref == -math.inf
    mismatch = (lse == -math.inf) != empty
    assert not mismatch.any(), (f"[{config}] lse: -inf where the reference is finite or vice versa at "
                                f"[head, token] {mismatch.nonzero()[:5].tolist()}")
    seen = ~empty
    err = (lse[seen] - ref[seen]).abs()
    bound = tol["lse_atol"] + tol["lse_rtol"] * ref[seen].abs()
    if (err > bound).any():
        k = int((err - bound).argmax())
        where = seen.nonzero()[k].tolist()
        raise AssertionError(f"[{config}] lse: {int((err > bound).sum())} entries off; worst at [head, token] "
                             f"{where}: {lse[seen][k].item():.7g} vs {ref[seen][k].item():.7g}")


def assert_unseen_rows_zero(out: torch.Tensor, ref_lse: torch.Tensor, config: str) -> None:
    """Rows that see no key (padding decode rows, layout rows without blocks) are exactly zero."""
    unseen = (ref_lse == -math.inf).T  # [T, Hq]
    rows = out.detach().cpu()[unseen]
    assert not rows.isnan().any() and (rows == 0).all(), (
        f"[{config}] rows that see no key must be exactly 0; [token, head] {unseen.nonzero()[:5].tolist()} ...")


def assert_pattern_is_sparse(pattern, num_heads: int, num_kv_heads: int, seq_len: int, config: str,
                             num_queries: int | None = None) -> None:
    """The reference mask of a sequence of seq_len tokens (its last num_queries rows) skips some causal
    (query, key) pair in every head: a dense causal kernel cannot pass a test built on it."""
    n = seq_len if num_queries is None else num_queries
    q_pos = torch.arange(seq_len - n, seq_len)
    mask = reference.token_mask(pattern, num_heads, num_kv_heads, q_pos, seq_len)
    causal = torch.arange(seq_len).view(1, -1) <= q_pos.view(-1, 1)
    skipped = (causal & ~mask).flatten(1).any(-1)
    assert skipped.all(), (f"[{config}] test setup: heads {(~skipped).nonzero().flatten().tolist()} see every "
                           f"causal key at seq_len {seq_len}; the case would pass on a dense kernel")


# ---- patterns ---------------------------------------------------------------------------------------

# How the vertical columns move across heads (spec §2), with the tensor-parallel rank they model:
# name -> (slide_by_kv_head, homo_head, tp_size, tp_rank). head_offset = tp_rank * Hq.
HEAD_MODES = {
    "homo": (False, True, 1, 0),
    "qslide": (False, False, 1, 0),
    "kvslide": (True, False, 1, 0),
    "qslide-tp2r1": (False, False, 2, 1),
    "kvslide-tp4r3": (True, False, 4, 3),
}


def make_pattern(mode: str, block_size: int, local_blocks: int, vert_stride: int, num_heads: int,
                 num_kv_heads: int) -> SparsePattern:
    """The SparsePattern vLLM's BlocksparseParams would give this rank (step rule of spec §2)."""
    by_kv, homo, tp_size, tp_rank = HEAD_MODES[mode]
    if homo:
        step = 0
    elif by_kv:
        step = max(1, int(vert_stride / (tp_size * num_kv_heads)))
    else:
        step = max(1, int(vert_stride / (tp_size * num_heads)))
    return SparsePattern(block_size, local_blocks, vert_stride, step, by_kv, tp_rank * num_heads)


def random_block_mask(num_heads: int, num_blocks: int, gen: torch.Generator, diagonal: bool,
                      density: float = 0.5) -> torch.Tensor:
    """Random causal block mask [H, n, n]; with diagonal=False the diagonal is random too, so some rows
    see no key at all (out 0, lse -inf)."""
    mask = torch.rand(num_heads, num_blocks, num_blocks, generator=gen) < density
    mask &= torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()
    if diagonal:
        mask |= torch.eye(num_blocks, dtype=torch.bool)
    else:
        mask[:, 0, 0] = False  # at least one row that sees nothing
    return mask


# ---- batches ----------------------------------------------------------------------------------------

def cu_seqlens(lengths, device) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
    return out.to(device)


def build_paged_cache(keys, values, kv_block_size: int, gen: torch.Generator, device,
                      spare_blocks: int = 3):
    """Paged cache holding sequence r's keys/values (CPU [len_r, Hkv, D]) in shuffled physical blocks.

    Returns key_cache, value_cache [NB, Hkv, kvbs, D] on device and block_tables [S, max_blocks] int32.
    Every slot that no sequence owns, the tail of each sequence's last block included, is NaN; block
    table entries past a sequence's blocks point at NaN-only spare blocks.
    """
    hkv, d = keys[0].shape[1], keys[0].shape[2]
    dtype = keys[0].dtype
    used = [-(-k.shape[0] // kv_block_size) for k in keys]
    num_blocks = sum(used) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    spare = perm[sum(used):]
    key_cache = torch.full((num_blocks, hkv, kv_block_size, d), NAN, dtype=dtype)
    value_cache = torch.full_like(key_cache, NAN)
    max_blocks = max(max(used), 1) + 1  # one padding column even for the longest sequence
    block_tables = spare[torch.randint(len(spare), (len(keys), max_blocks), generator=gen)].to(torch.int32)
    start = 0
    for r, (k, v) in enumerate(zip(keys, values)):
        blocks = perm[start: start + used[r]]
        start += used[r]
        block_tables[r, : used[r]] = blocks.to(torch.int32)
        t = torch.arange(k.shape[0])
        key_cache[blocks[t // kv_block_size], :, t % kv_block_size] = k
        value_cache[blocks[t // kv_block_size], :, t % kv_block_size] = v
    return key_cache.to(device), value_cache.to(device), block_tables.to(device)


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module (the benchmarks are scripts, not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
