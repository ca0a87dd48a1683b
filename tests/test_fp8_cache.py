"""fp8 KV caches (issue 18): write_kv_cache quantizes, paged_prefill / paged_decode dequantize.

The contract (csrc/ops.cpp, blocksparse_attn/ops.py): a cache of dtype float8_e4m3fn or float8_e5m2
stores fp8(x / scale), rounded to nearest even and saturated to the format's largest finite value
(NaN stays NaN, ±inf saturates); the attention ops read it as float(stored) * scale in float32. The
scales are optional float32 tensors of one element on the cache's device (absent = 1); a cache in the
model's dtype ignores them. copy_blocks / swap_blocks move fp8 bytes.

Writes are compared byte for byte with reference.quantize_fp8 (written from the spec as arithmetic,
not through an fp8 cast) and with hand-computed values of the format's edge cases. Attention over an
fp8 cache is compared with the float32 reference over the dequantized keys/values at the model
dtype's usual tolerance; its error against the unquantized reference is printed and loosely bounded.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from _helpers import (
    DTYPE_IDS, assert_close_to_ref, assert_pattern_is_sparse, build_paged_cache, cu_seqlens, make_pattern, one_thread,
    poison, random_block_mask, randn, skip_unsupported,
)
from blocksparse_attn import ops, reference
from blocksparse_attn.layout import BlockLayout
from conftest import DEVICES, HAS_CUDA

_ops = torch.ops.blocksparse_attn

# ---- the axes (STYLE rule 12) ----------------------------------------------------------------------
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float32 attention is CPU-only
HEAD_DIMS = (64, 128)
KV_BLOCK_SIZES = (16, 64)
GQA = ((8, 2), (2, 2))  # (Hq, Hkv): 4 and 1 q heads per kv head
PATTERNS = ("phi3", "layout")  # Phi-3-small's parameters (make_pattern) and an explicit random layout
SCALE_KINDS = ("none", "amax", "saturating")  # no scale tensors; amax / max; a scale 8x too small
# fp8 error against the unquantized reference allowed in ||out - ref|| / ||ref||: a few times the
# format's relative rounding (2^-4 for e4m3's 3 mantissa bits, 2^-3 for e5m2's 2)
QUANT_REL_BOUND = {torch.float8_e4m3fn: 0.08, torch.float8_e5m2: 0.16}
NAN_BYTE = 0x7F  # a NaN in both formats: a cache slot nobody wrote reads as NaN
# (src, dst) of swap_blocks; under DEVICE=cuda only the pairs that involve the GPU
SWAP_DEVICES = tuple(p for p in (("cpu", "cpu"), ("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda"))
                     if "cuda" in p or "cpu" in DEVICES)

FP8_IDS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
fp8_ids = FP8_IDS.get
dtype_ids = DTYPE_IDS.get
gqa_ids = [f"Hq{hq}-Hkv{hkv}" for hq, hkv in GQA]


def skip_without(device: str) -> None:
    if device.startswith("cuda") and not HAS_CUDA:
        pytest.skip("CUDA is not available")


def scale_tensor(value: float, device) -> torch.Tensor:
    """A per-tensor scale as the ops take it: float32 [1] on the cache's device."""
    return torch.tensor([value], dtype=torch.float32, device=device)


def fp8_cache(shape, fp8: torch.dtype, gen: torch.Generator | None, device) -> torch.Tensor:
    """An fp8 tensor of random bytes (gen given; every slot recognisable) or of NaN bytes (gen None)."""
    if gen is None:
        raw = torch.full(shape, NAN_BYTE, dtype=torch.uint8)
    else:
        raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    return raw.view(fp8).to(device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def assert_fp8_equal(got: torch.Tensor, want: torch.Tensor, config: str) -> None:
    """Byte for byte, except that where want holds a NaN got may hold any NaN (the spec says 'NaN
    stays NaN', not which of the format's NaN encodings)."""
    assert got.dtype == want.dtype, f"[{config}] dtype {got.dtype} != {want.dtype}"
    got_b, want_b = as_bytes(got), as_bytes(want)
    assert got_b.shape == want_b.shape, f"[{config}] shape {tuple(got_b.shape)} != {tuple(want_b.shape)}"
    want_nan = want.cpu().float().isnan()
    got_nan = got.cpu().float().isnan()
    lost = want_nan & ~got_nan
    assert not lost.any(), f"[{config}] {int(lost.sum())} NaN not kept, first at {lost.nonzero()[0].tolist()}"
    diff = (got_b != want_b) & ~want_nan
    if diff.any():
        first = tuple(diff.nonzero()[0].tolist())
        raise AssertionError(
            f"[{config}] {int(diff.sum())} of {diff.numel()} bytes differ, first at {list(first)}: got "
            f"0x{int(got_b[first]):02x} ({float(got.cpu()[first].float()):.6g}), expected 0x{int(want_b[first]):02x} "
            f"({float(want.cpu()[first].float()):.6g})")


def halves(kv_cache: torch.Tensor, hkv: int, d: int):
    """The attention ops' [NB, Hkv, kvbs, D] views of a backend-shaped cache [2, NB, kvbs * Hkv * D]."""
    nb, kvbs = kv_cache.shape[1], kv_cache.shape[2] // (hkv * d)
    return kv_cache[0].view(nb, hkv, kvbs, d), kv_cache[1].view(nb, hkv, kvbs, d)


# ---- the reference itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_reference_quantize_matches_torch_cast(fp8, gen):
    """reference.quantize_fp8 rounds by arithmetic; torch's cast of the clamped values rounds in c10.
    Two independent roundings agree on every code of the format and on values across all binades."""
    largest = reference.fp8_max(fp8)
    codes = torch.arange(256, dtype=torch.uint8).view(fp8)
    finite = codes.float().isfinite()
    finite_codes = codes.view(torch.uint8)[finite].view(fp8)  # (torch 2.7 cannot index fp8 tensors)
    assert_fp8_equal(reference.quantize_fp8(codes.float()[finite], fp8), finite_codes, f"{fp8_ids(fp8)} codes")
    x = torch.randn(20000, generator=gen) * torch.exp2(torch.randint(-24, 20, (20000,), generator=gen).float())
    assert_fp8_equal(reference.quantize_fp8(x, fp8), x.clamp(-largest, largest).to(fp8), f"{fp8_ids(fp8)} random")
    assert reference.quantize_fp8(torch.tensor([3.0]), fp8, torch.tensor([2.0])).float().item() == 1.5
    assert reference.dequantize(torch.tensor([1.5]).to(fp8), torch.tensor([2.0])).item() == 3.0


# ---- write_kv_cache: random values ---------------------------------------------------------------------

def make_scale(kind: str, x: torch.Tensor, fp8: torch.dtype, device):
    """None, amax / format max (the calibrated per-tensor scale), or a scale 8x too small (saturates)."""
    if kind == "none":
        return None
    amax = float(x.float().abs().max())
    return scale_tensor(amax / reference.fp8_max(fp8) / (8.0 if kind == "saturating" else 1.0), device)


@pytest.mark.parametrize("kv_block_size", KV_BLOCK_SIZES, ids=lambda x: f"kvbs{x}")
@pytest.mark.parametrize("scale_kind", SCALE_KINDS)
@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_write_kv_cache_fp8(device, fp8, dtype, scale_kind, kv_block_size, gen):
    """key/value (views of a fused QKV) over many binades, subnormals of the format included, into a
    cache of random bytes: the written slots hold quantize_fp8 exactly, every other byte is untouched,
    negative slots are skipped."""
    skip_unsupported(device, dtype)
    hkv, d, q_per_kv, num_blocks, num_tokens = 2, 64, 2, 5, 40
    magnitudes = torch.exp2(torch.randint(-14, 7, (num_tokens, hkv, q_per_kv + 2, d), generator=gen).float())
    qkv = (torch.randn(magnitudes.shape, generator=gen) * magnitudes).to(dtype)
    key, value = qkv[:, :, q_per_kv], qkv[:, :, q_per_kv + 1]
    k_scale, v_scale = make_scale(scale_kind, key, fp8, device), make_scale(scale_kind, value, fp8, device)
    inner = torch.randperm(num_blocks * kv_block_size - 2, generator=gen)[:num_tokens - 2] + 1
    slots = torch.cat([torch.tensor([0, num_blocks * kv_block_size - 1]), inner])
    slots[torch.rand(num_tokens, generator=gen) < 0.25] = -1  # padding tokens
    kv_cache = fp8_cache((2, num_blocks, kv_block_size * hkv * d), fp8, gen, device)
    key_cache, value_cache = halves(kv_cache, hkv, d)
    want_k, want_v = reference.write_kv_cache_fp8_ref(key, value, key_cache, value_cache, slots, k_scale, v_scale)
    qkv_dev = qkv.to(device)
    ops.write_kv_cache(qkv_dev[:, :, q_per_kv], qkv_dev[:, :, q_per_kv + 1], key_cache, value_cache,
                       slots.to(device), k_scale, v_scale)
    config = (f"write_kv_cache {device} {dtype_ids(dtype)} -> {fp8_ids(fp8)} scales={scale_kind} "
              f"kvbs={kv_block_size}")
    assert_fp8_equal(key_cache, want_k, config + " keys")
    assert_fp8_equal(value_cache, want_v, config + " values")
    if scale_kind == "saturating":
        largest = reference.fp8_max(fp8)
        assert (want_k.float().abs() == largest).any(), f"[{config}] test setup: nothing saturated"


# ---- write_kv_cache: the format's edge cases, by hand ---------------------------------------------------

E4 = 2.0 ** -9   # e4m3fn's subnormal spacing (smallest normal 2^-6)
E5 = 2.0 ** -16  # e5m2's subnormal spacing (smallest normal 2^-14)
INF, NAN = math.inf, math.nan
# (x / scale, what the cache must hold), computed by hand from the formats' grids. `exact` rows need
# x / scale to be exactly that value in the model dtype (ties, subnormals); saturating rows do not.
EDGE_CASES = {
    torch.float8_e4m3fn: dict(exact=[
        (1.0, 1.0), (1.0625, 1.0), (1.1875, 1.25), (-1.0625, -1.0), (-1.1875, -1.25),  # ties -> even mantissa
        (1.09375, 1.125), (1.03125, 1.0), (248.0, 256.0), (232.0, 224.0), (240.0, 240.0),
        (464.0, 448.0), (448.0, 448.0), (-464.0, -448.0),                 # the tie next to max rounds down to max
        (E4, E4), (0.5 * E4, 0.0), (0.75 * E4, E4), (1.5 * E4, 2 * E4),   # subnormals and their ties
        (2.5 * E4, 2 * E4), (7.5 * E4, 2.0 ** -6), (-0.5 * E4, -0.0), (0.25 * E4, 0.0),
        (2.0 ** -6, 2.0 ** -6), (0.0, 0.0), (-0.0, -0.0),
    ], saturating=[(480.0, 448.0), (1000.0, 448.0), (-5000.0, -448.0), (INF, 448.0), (-INF, -448.0)]),
    torch.float8_e5m2: dict(exact=[
        (1.0, 1.0), (1.125, 1.0), (1.375, 1.5), (-1.125, -1.0), (-1.375, -1.5), (1.1875, 1.25), (1.0625, 1.0),
        (3.5, 3.5), (3.75, 4.0), (57344.0, 57344.0), (-57344.0, -57344.0), (53248.0, 49152.0),
        (E5, E5), (0.5 * E5, 0.0), (1.5 * E5, 2 * E5), (2.5 * E5, 2 * E5), (3.5 * E5, 2.0 ** -14),
        (-0.5 * E5, -0.0), (0.75 * E5, E5), (0.0, 0.0), (-0.0, -0.0),
    ], saturating=[(61440.0, 57344.0), (1.0e5, 57344.0), (-2.0e5, -57344.0), (INF, 57344.0), (-INF, -57344.0)]),
}
EDGE_SCALES = (None, 0.0625, 4.0)  # powers of two: x = y * scale is exact, so the table is exact


@pytest.mark.parametrize("scale", EDGE_SCALES, ids=lambda s: f"scale{s}")
@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_write_kv_cache_fp8_edge_values(device, fp8, dtype, scale, gen):
    """Round-to-nearest-even ties, subnormals, signed zeros, saturation of finite values far beyond
    max * scale and of ±inf, and NaN kept, in keys (k_scale = scale) and values (-x, v_scale = 2 * scale);
    scale None: no scale tensors at all."""
    skip_unsupported(device, dtype)
    table = EDGE_CASES[fp8]
    s = 1.0 if scale is None else scale
    s_v = 1.0 if scale is None else 2 * scale
    # e5m2 reaches fp16's largest values: an exact row whose x = y * scale overflows the model dtype is left out
    exact = [r for r in table["exact"] if abs(r[0]) * max(s, s_v) <= torch.finfo(dtype).max]
    rows = exact + table["saturating"] + [(NAN, NAN)]
    y = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    expected = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    key = (y * s).to(dtype)
    value = (-y * s_v).to(dtype)
    n_exact = len(exact)
    assert torch.equal(key[:n_exact].float() / s, y[:n_exact]), f"test setup: {dtype_ids(dtype)} rounds the table"
    hkv, d, kvbs = 1, 64, 16
    n = len(rows)
    # token t holds row t in every element of its head: the table, broadcast over D
    key3, value3 = key.view(n, 1, 1).expand(n, hkv, d).contiguous(), value.view(n, 1, 1).expand(n, hkv, d).contiguous()
    num_blocks = -(-n // kvbs) + 1
    key_cache = fp8_cache((num_blocks, hkv, kvbs, d), fp8, gen, device)
    value_cache = fp8_cache((num_blocks, hkv, kvbs, d), fp8, gen, device)
    slots = torch.randperm(num_blocks * kvbs, generator=gen)[:n]
    k_scale = None if scale is None else scale_tensor(s, device)
    v_scale = None if scale is None else scale_tensor(s_v, device)
    want_k, want_v = reference.write_kv_cache_fp8_ref(key3, value3, key_cache, value_cache, slots, k_scale, v_scale)
    ops.write_kv_cache(key3.to(device), value3.to(device), key_cache, value_cache, slots.to(device), k_scale,
                       v_scale)
    config = f"edge values {device} {dtype_ids(dtype)} -> {fp8_ids(fp8)} scale={scale}"
    kvbs_idx = (slots // kvbs, slots % kvbs)
    for what, cache, sign, want in (("keys", key_cache, 1.0, want_k), ("values", value_cache, -1.0, want_v)):
        got = cache.cpu().view(torch.uint8)[kvbs_idx[0], :, kvbs_idx[1]].view(fp8).float()  # [n, Hkv, D]
        exp = (sign * expected).view(n, 1, 1).expand_as(got)
        for t in range(n):
            g, e = got[t], exp[t]
            ok = (g.isnan() & e.isnan()) | ((g == e) & (g.signbit() == e.signbit()))
            assert ok.all(), (f"[{config} {what}] x / scale = {sign * float(y[t])!r} (model {dtype_ids(dtype)}): "
                              f"stored {g.flatten()[0].item()!r}, expected {e.flatten()[0].item()!r}")
        # the reference agrees with the hand-made table (and so with the op) on every byte
        assert_fp8_equal(cache, want, config + f" {what} vs reference.quantize_fp8")


# ---- attention over fp8 caches ------------------------------------------------------------------------------

def build_pattern(name: str, hq: int, hkv: int, max_len: int, gen):
    if name == "phi3":  # Phi-3-small's B 64, L 16, V 8, q-head sliding
        return make_pattern("qslide", 64, 16, 8, hq, hkv)
    if name == "dense":  # every causal block visible (a vertical column at every block)
        return make_pattern("qslide", 64, 1, 1, hq, hkv)
    b = 16
    return BlockLayout.from_block_mask(random_block_mask(hq, -(-max_len // b), gen, diagonal=True), b)


def lengths_for(pattern_name: str) -> int:
    """A length where the pattern skips causal keys (Phi-3-small is dense up to 17 blocks of 64)."""
    return 1100 if pattern_name == "phi3" else 150


def sequence_slots(block_tables: torch.Tensor, r: int, positions: torch.Tensor, kvbs: int) -> torch.Tensor:
    return block_tables[r].cpu().long()[positions // kvbs] * kvbs + positions % kvbs


class Fp8Batch:
    """Sequences' keys/values (CPU, model dtype) in an fp8 paged cache filled through write_kv_cache:
    first the context (all but the last query_len tokens of each sequence) in one call, then the new
    tokens with two padding slots in a second call, as the serving flow does. Unowned slots are NaN."""

    def __init__(self, seq_lens, query_lens, hkv, d, kvbs, dtype, fp8, gen, device, with_scales=True):
        self.keys = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
        self.values = [randn((n, hkv, d), dtype, gen, scale=3.0) for n in seq_lens]
        all_k, all_v = torch.cat(self.keys), torch.cat(self.values)
        largest = reference.fp8_max(fp8)
        self.k_scale = scale_tensor(float(all_k.float().abs().max()) / largest, device) if with_scales else None
        self.v_scale = scale_tensor(float(all_v.float().abs().max()) / largest, device) if with_scales else None
        shape_cache, _, self.block_tables = build_paged_cache(self.keys, self.values, kvbs, gen, "cpu")
        self.block_tables = self.block_tables.to(device)
        self.key_cache = fp8_cache(tuple(shape_cache.shape), fp8, None, device)
        self.value_cache = fp8_cache(tuple(shape_cache.shape), fp8, None, device)
        for part in ("context", "new"):
            ks, vs, slots = [], [], []
            for r, (n, m) in enumerate(zip(seq_lens, query_lens)):
                pos = torch.arange(0, n - m) if part == "context" else torch.arange(n - m, n)
                ks.append(self.keys[r][pos])
                vs.append(self.values[r][pos])
                slots.append(sequence_slots(self.block_tables, r, pos, kvbs))
            if part == "new":
                ks.append(torch.zeros(2, hkv, d, dtype=dtype))
                vs.append(torch.zeros(2, hkv, d, dtype=dtype))
                slots.append(torch.tensor([-1, -1]))
            ops.write_kv_cache(torch.cat(ks).to(device), torch.cat(vs).to(device), self.key_cache, self.value_cache,
                               torch.cat(slots).to(device), self.k_scale, self.v_scale)
        # what the ops must read: the reference's quantization of the same inputs, dequantized
        self.keys_read = [reference.dequantize(reference.quantize_fp8(k, fp8, self.k_scale), self.k_scale)
                          for k in self.keys]
        self.values_read = [reference.dequantize(reference.quantize_fp8(v, fp8, self.v_scale), self.v_scale)
                            for v in self.values]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float().cpu() - ref).norm()) / max(float(ref.norm()), 1e-30)


def check_quantization_error(out, ref_unquantized, fp8, config):
    rel = relative_error(out, ref_unquantized)
    print(f"[{config}] relative error against the unquantized reference: {rel:.4f}")
    assert rel <= QUANT_REL_BOUND[fp8], (f"[{config}] fp8 error against the unquantized reference {rel:.4f} > "
                                         f"{QUANT_REL_BOUND[fp8]} (quantization much coarser than the format's)")


def run_decode_fp8(device, dtype, fp8, hq, hkv, d, kvbs, pattern_name, gen, with_scales=True, q_magnitude=1.0,
                   q_edit=None, seq_lens=None):
    long = lengths_for(pattern_name)
    seq_lens = seq_lens if seq_lens is not None else [1, 17, long, 0, kvbs + 1, 64, 65]
    pattern = build_pattern(pattern_name, hq, hkv, long, gen)
    if pattern_name == "phi3":
        assert_pattern_is_sparse(pattern, hq, hkv, long, "phi3 decode", num_queries=1)
    batch = Fp8Batch(seq_lens, [min(n, 1) for n in seq_lens], hkv, d, kvbs, dtype, fp8, gen, device, with_scales)
    q = randn((len(seq_lens), hq, d), dtype, gen, scale=q_magnitude)
    if q_edit is not None:
        q_edit(q)
    scale = 1.0 / d
    ref = torch.zeros(q.shape)
    ref_plain = torch.zeros(q.shape)
    with one_thread():
        for r, n in enumerate(seq_lens):
            if n:
                ref[r] = reference.attention_ref(q[r: r + 1], batch.keys_read[r], batch.values_read[r], scale,
                                                 pattern)[0][0]
                ref_plain[r] = reference.attention_ref(q[r: r + 1], batch.keys[r], batch.values[r], scale,
                                                       pattern)[0][0]
    out = poison(torch.empty(q.shape, dtype=dtype, device=device))
    ops.paged_decode(q.to(device), batch.key_cache, batch.value_cache, batch.block_tables,
                     torch.tensor(seq_lens, dtype=torch.int32, device=device), scale,
                     pattern.to(device) if isinstance(pattern, BlockLayout) else pattern, out=out,
                     k_scale=batch.k_scale, v_scale=batch.v_scale)
    return out, ref, ref_plain, seq_lens


def run_prefill_fp8(device, dtype, fp8, hq, hkv, d, kvbs, pattern_name, gen, with_scales=True, q_magnitude=1.0,
                    q_edit=None):
    long = lengths_for(pattern_name)
    seqs = [(0, 65), (1, 1), (kvbs - 1, 2), (long, 17), (130, 0), (64, 64)]  # (context, new)
    seq_lens, q_lens = [c + n for c, n in seqs], [n for _, n in seqs]
    pattern = build_pattern(pattern_name, hq, hkv, long + 17, gen)
    if pattern_name == "phi3":
        assert_pattern_is_sparse(pattern, hq, hkv, long + 17, "phi3 prefill", num_queries=17)
    batch = Fp8Batch(seq_lens, q_lens, hkv, d, kvbs, dtype, fp8, gen, device, with_scales)
    if q_magnitude == "mixed":  # every query token its own magnitude, 1e-3 .. 1e3
        magnitudes = 10 ** (torch.rand(sum(q_lens), 1, 1, generator=gen) * 6 - 3)
        q = (randn((sum(q_lens), hq, d), torch.float32, gen) * magnitudes).to(dtype)
    else:
        q = randn((sum(q_lens), hq, d), dtype, gen, scale=q_magnitude)
    if q_edit is not None:
        q_edit(q)
    scale = 1.0 / d
    cu_q, cu_k = cu_seqlens(q_lens, "cpu"), cu_seqlens(seq_lens, "cpu")
    with one_thread():
        ref, _ = reference.varlen_prefill_ref(q, torch.cat(batch.keys_read), torch.cat(batch.values_read), cu_q, cu_k,
                                              scale, pattern)
        ref_plain, _ = reference.varlen_prefill_ref(q, torch.cat(batch.keys), torch.cat(batch.values), cu_q, cu_k,
                                                    scale, pattern)
    out = poison(torch.empty(q.shape, dtype=dtype, device=device))
    ops.paged_prefill(q.to(device), batch.key_cache, batch.value_cache, batch.block_tables,
                      cu_seqlens(q_lens, device), torch.tensor(seq_lens, dtype=torch.int32, device=device), scale,
                      pattern.to(device) if isinstance(pattern, BlockLayout) else pattern, out=out,
                      k_scale=batch.k_scale, v_scale=batch.v_scale)
    return out, ref, ref_plain, seqs


RUNNERS = {"paged_decode": run_decode_fp8, "paged_prefill": run_prefill_fp8}


@pytest.mark.parametrize("op", RUNNERS)
@pytest.mark.parametrize("kv_block_size", KV_BLOCK_SIZES, ids=lambda x: f"kvbs{x}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_attention_fp8_shapes(device, op, fp8, dtype, head_dim, kv_block_size, gen):
    """Phi-3-small's pattern, 4 q heads per kv head, scales amax / max: the op equals the reference
    over the dequantized cache at the model dtype's tolerance."""
    skip_unsupported(device, dtype)
    hq, hkv = GQA[0]
    out, ref, ref_plain, lens = RUNNERS[op](device, dtype, fp8, hq, hkv, head_dim, kv_block_size, "phi3", gen)
    config = (f"{op} {device} {dtype_ids(dtype)} cache {fp8_ids(fp8)} D={head_dim} Hq={hq} Hkv={hkv} "
              f"kvbs={kv_block_size} phi3 lens={lens}")
    assert_close_to_ref(out, ref, dtype, config + " vs dequantized reference")
    check_quantization_error(out, ref_plain, fp8, config)


@pytest.mark.parametrize("op", RUNNERS)
@pytest.mark.parametrize("pattern_name", PATTERNS)
@pytest.mark.parametrize("heads", GQA, ids=gqa_ids)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_attention_fp8_patterns(device, op, fp8, heads, pattern_name, gen):
    """Both GQA ratios under Phi-3-small's pattern and under an explicit layout (bf16 model)."""
    dtype = torch.bfloat16
    hq, hkv = heads
    out, ref, ref_plain, lens = RUNNERS[op](device, dtype, fp8, hq, hkv, 64, 16, pattern_name, gen)
    config = f"{op} {device} {dtype_ids(dtype)} cache {fp8_ids(fp8)} D=64 Hq={hq} Hkv={hkv} kvbs=16 {pattern_name}"
    assert_close_to_ref(out, ref, dtype, config + " vs dequantized reference")
    check_quantization_error(out, ref_plain, fp8, config)


@pytest.mark.parametrize("splits", ("auto", "3"))
@pytest.mark.parametrize("q_magnitude", (1e-6, 1.0, 3e5), ids=lambda m: f"q{m:g}")
@pytest.mark.parametrize("head_dim", (80, 128, 256), ids=lambda d: f"D{d}")
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_decode_fp8_query_range_and_head_dims(device, fp8, head_dim, q_magnitude, splits, gen, monkeypatch):
    """A bf16 model over an fp8 cache: the CUDA decode runs its tensor-core steps in fp16 (Q scaled into
    fp16's range by a power of two, head dims taken in a permuted order); queries far outside fp16's
    range (3e5) or deep in its subnormals (1e-6), a padded head dim (80 -> 128) and 256, with and
    without split-KV, all equal the reference over the dequantized cache."""
    monkeypatch.setenv("BSA_DECODE_SPLITS", splits)
    dtype = torch.bfloat16
    hq, hkv = GQA[0]
    out, ref, _, lens = run_decode_fp8(device, dtype, fp8, hq, hkv, head_dim, 16, "phi3", gen,
                                       q_magnitude=q_magnitude)
    config = (f"paged_decode {device} bf16 cache {fp8_ids(fp8)} D={head_dim} |q|~{q_magnitude:g} splits={splits} "
              f"lens={lens}")
    assert_close_to_ref(out, ref, dtype, config + " vs dequantized reference")


@pytest.mark.parametrize("merge", ("kernel", "cluster"))
@pytest.mark.parametrize("head_dim", (80, 128), ids=lambda d: f"D{d}")
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_decode_fp8_merge_paths(device, fp8, head_dim, merge, gen, monkeypatch):
    """Over an fp8 cache, both ways a decode's 5 splits are combined (BSA_DECODE_MERGE: partials and
    a merge kernel, or on sm_90 one thread-block cluster per group): the values are scaled by v_scale
    before the merge, and a padded head dim (80 -> 128) leaves the merge's padding columns alone."""
    if device == "cpu":
        pytest.skip("the merge paths are the CUDA kernels'")
    if merge == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need compute capability 9.0")
    monkeypatch.setenv("BSA_DECODE_SPLITS", "5")
    monkeypatch.setenv("BSA_DECODE_MERGE", merge)
    dtype = torch.bfloat16
    hq, hkv = GQA[0]
    out, ref, _, lens = run_decode_fp8(device, dtype, fp8, hq, hkv, head_dim, 16, "phi3", gen)
    config = f"paged_decode {device} bf16 cache {fp8_ids(fp8)} D={head_dim} merge={merge} lens={lens}"
    assert_close_to_ref(out, ref, dtype, config + " vs dequantized reference")


@pytest.mark.parametrize("batch", (2, 48))
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_decode_fp8_small_and_large_grids(device, fp8, batch, gen):
    """On CUDA a decode whose grid fits 2 CTAs an SM in one wave runs the fp8 kernel built with the
    registers of 2 CTAs (Q's fragments in registers); a larger one the build for 4 CTAs an SM (Q's
    fragments in shared memory). Phi-3-small's layer (32 q / 8 kv heads, D 128): 2 sequences (16
    CTAs a split) and 48 (384 a split, more than 2 an SM of any current GPU), both equal to the
    reference over the dequantized cache."""
    dtype = torch.bfloat16
    lengths = torch.randint(1, 1300, (batch,), generator=gen).tolist()
    lengths[:2] = [1100, 65]
    out, ref, _, lens = run_decode_fp8(device, dtype, fp8, 32, 8, 128, 16, "phi3", gen, seq_lens=lengths)
    config = f"paged_decode {device} bf16 cache {fp8_ids(fp8)} batch {batch} lens={lens[:8]}..."
    assert_close_to_ref(out, ref, dtype, config + " vs dequantized reference")


@pytest.mark.parametrize("q_magnitude", (1e-6, 1.0, 3e5, "mixed"), ids=lambda m: f"q{m}")
@pytest.mark.parametrize("head_dim", (80, 128), ids=lambda d: f"D{d}")
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_prefill_fp8_query_range(device, fp8, head_dim, q_magnitude, gen):
    """A bf16 model over an fp8 cache, prefill: queries far outside fp16's range (3e5), deep in its
    subnormals (1e-6), and tokens of magnitudes 1e-3 to 1e3 side by side in one query tile, with a
    padded head dim (80 -> 128), all equal the reference over the dequantized cache (a kernel that
    took fp16 tensor-core steps with Q scaled by one power of two per tile must keep all of these)."""
    dtype = torch.bfloat16
    hq, hkv = GQA[0]
    out, ref, _, lens = run_prefill_fp8(device, dtype, fp8, hq, hkv, head_dim, 16, "phi3", gen,
                                        q_magnitude=q_magnitude)
    config = f"paged_prefill {device} bf16 cache {fp8_ids(fp8)} D={head_dim} |q|~{q_magnitude} lens={lens}"
    assert_close_to_ref(out, ref, dtype, config + " vs dequantized reference")


@pytest.mark.parametrize("op", RUNNERS)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_fp8_nonfinite_query_beside_large(device, op, fp8, gen):
    """A bf16 model over an fp8 cache: one query head holds an inf while the heads and tokens beside it
    are far outside fp16's range (3e5) and share its power of two on CUDA (the decode's CTA holds the
    kv group's heads; a Hopper prefill warp scales 16 tokens of one head). The inf's output row is not
    finite, as in dense attention; every other row equals the reference (a factor that the inf set
    would stay 1, and 3e5 overflows fp16)."""
    dtype = torch.bfloat16
    hq, hkv = GQA[0]
    # The long sequence's first query (prefill: token 68): over ~1100 keys some score is +inf, so its
    # row is NaN (a row whose only visible scores are -inf comes out 0, not NaN).
    row = (2, 1) if op == "paged_decode" else (68, 1)

    def put_inf(q):
        q[row + (5,)] = float("inf")

    out, ref, _, lens = RUNNERS[op](device, dtype, fp8, hq, hkv, 128, 16, "phi3", gen, q_magnitude=3e5,
                                    q_edit=put_inf)
    config = f"{op} {device} bf16 cache {fp8_ids(fp8)} |q|~3e5, inf at {row} lens={lens}"
    out = out.detach().float().cpu()
    assert not torch.isfinite(ref[row]).all(), f"[{config}] the reference's inf row is finite"
    assert not torch.isfinite(out[row]).all(), f"[{config}] the inf row came out finite: {out[row][:4]}"
    keep = torch.ones(out.shape[:2], dtype=torch.bool)
    keep[row] = False
    assert_close_to_ref(out[keep], ref[keep], dtype, config + " (other rows) vs dequantized reference")


@pytest.mark.parametrize("op", RUNNERS)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_attention_fp8_without_scales(device, op, fp8, gen):
    """No scale tensors: stored = fp8(x), read = float(stored) (values well inside the format's range)."""
    dtype = torch.float16
    out, ref, _, lens = RUNNERS[op](device, dtype, fp8, 8, 2, 64, 16, "layout", gen, with_scales=False)
    assert_close_to_ref(out, ref, dtype, f"{op} {device} fp16 cache {fp8_ids(fp8)} no scales lens={lens}")


# ---- a cache in the model's dtype ignores the scales ---------------------------------------------------------

@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=dtype_ids)
def test_model_dtype_cache_ignores_scales(device, dtype, gen):
    """write_kv_cache, paged_decode and paged_prefill with k_scale 3 / v_scale 0.5 on a cache in the
    model's dtype give exactly what they give without scales."""
    skip_unsupported(device, dtype)
    hq, hkv, d, kvbs = 4, 2, 64, 16
    seq_lens = [40, 70]
    keys = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
    values = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
    key_cache, value_cache, tables = build_paged_cache(keys, values, kvbs, gen, device)
    k_scale, v_scale = scale_tensor(3.0, device), scale_tensor(0.5, device)
    config = f"{device} {dtype_ids(dtype)} cache with scales"
    # write: the last 5 tokens of each sequence again, with and without the scales
    slots = torch.cat([sequence_slots(tables, r, torch.arange(n - 5, n), kvbs) for r, n in enumerate(seq_lens)])
    new_k, new_v = randn((10, hkv, d), dtype, gen).to(device), randn((10, hkv, d), dtype, gen).to(device)
    plain_k, plain_v = key_cache.clone(), value_cache.clone()
    ops.write_kv_cache(new_k, new_v, plain_k, plain_v, slots.to(device))
    ops.write_kv_cache(new_k, new_v, key_cache, value_cache, slots.to(device), k_scale, v_scale)
    for got, want, what in ((key_cache, plain_k, "key_cache"), (value_cache, plain_v, "value_cache")):
        same = (got == want) | (got.isnan() & want.isnan())
        assert same.all(), f"[{config}] write_kv_cache applied the scales to {what}"
    pattern = make_pattern("qslide", 16, 2, 3, hq, hkv)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    q = randn((2, hq, d), dtype, gen).to(device)
    plain = ops.paged_decode(q, key_cache, value_cache, tables, lens, 0.125, pattern)
    scaled = ops.paged_decode(q, key_cache, value_cache, tables, lens, 0.125, pattern, k_scale=k_scale,
                              v_scale=v_scale)
    assert torch.equal(plain, scaled), f"[{config}] paged_decode applied the scales"
    q = randn((12, hq, d), dtype, gen).to(device)
    cu_q = cu_seqlens([5, 7], device)
    plain = ops.paged_prefill(q, key_cache, value_cache, tables, cu_q, lens, 0.125, pattern)
    scaled = ops.paged_prefill(q, key_cache, value_cache, tables, cu_q, lens, 0.125, pattern, k_scale=k_scale,
                               v_scale=v_scale)
    assert torch.equal(plain, scaled), f"[{config}] paged_prefill applied the scales"


# ---- copy_blocks / swap_blocks -------------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_copy_blocks_fp8(device, fp8, gen):
    """Three layers of [2, NB, kvbs * Hkv * D] fp8 caches; one source forked to two destinations."""
    num_blocks, width = 12, 16 * 2 * 64
    caches = [fp8_cache((2, num_blocks, width), fp8, gen, device) for _ in range(3)]
    perm = torch.randperm(num_blocks, generator=gen)
    src, dst = perm[:4], perm[4:9]
    mapping = torch.stack([torch.cat([src, src[:1]]), dst], dim=1).to(torch.int64)
    want = [w.view(fp8) for w in reference.copy_blocks_ref([as_bytes(c) for c in caches], mapping)]
    try:
        ops.copy_blocks(caches, mapping.to(device))
    except NotImplementedError as e:
        pytest.fail(f"[copy_blocks {device} {fp8_ids(fp8)}] copy_blocks rejects fp8 caches (it must copy their "
                    f"bytes): {e}")
    for layer, (got, exp) in enumerate(zip(caches, want)):
        got_b, exp_b = as_bytes(got), as_bytes(exp)
        assert torch.equal(got_b, exp_b), (f"[copy_blocks {device} {fp8_ids(fp8)} layer {layer}] "
                                           f"{int((got_b != exp_b).sum())} bytes differ")


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
@pytest.mark.parametrize("src_device,dst_device", SWAP_DEVICES, ids=[f"{s}-to-{d}" for s, d in SWAP_DEVICES])
def test_swap_blocks_fp8(src_device, dst_device, fp8, gen):
    skip_without(src_device)
    skip_without(dst_device)
    width = 16 * 2 * 64
    src = fp8_cache((2, 9, width), fp8, gen, src_device)
    dst = fp8_cache((2, 6, width), fp8, gen, dst_device)
    mapping = torch.tensor([[8, 0], [0, 5], [3, 2], [4, 3]], dtype=torch.int64)
    want = reference.swap_blocks_ref(as_bytes(src), as_bytes(dst), mapping)
    src_before = as_bytes(src).clone()
    config = f"swap_blocks {src_device}->{dst_device} {fp8_ids(fp8)}"
    try:
        ops.swap_blocks(src, dst, mapping)
    except NotImplementedError as e:
        pytest.fail(f"[{config}] swap_blocks rejects fp8 caches (it must copy their bytes): {e}")
    assert torch.equal(as_bytes(dst), want), f"[{config}] {int((as_bytes(dst) != want).sum())} bytes differ"
    assert torch.equal(as_bytes(src), src_before), f"[{config}] the source changed"


# ---- bad inputs ----------------------------------------------------------------------------------------------

HQ, HKV, D, KVBS, NB = 4, 2, 64, 16, 8
BASE_DTYPE = torch.float16  # the model dtype of the baselines: supported on every device
PATTERN = make_pattern("qslide", 16, 2, 3, HQ, HKV)


def _valid_args(op: str, device) -> dict:
    """A valid call of op with e4m3 caches and both scales (test_fp8_valid_baselines runs them)."""
    g = torch.Generator().manual_seed(7)
    caches = dict(key_cache=fp8_cache((NB, HKV, KVBS, D), torch.float8_e4m3fn, g, device),
                  value_cache=fp8_cache((NB, HKV, KVBS, D), torch.float8_e4m3fn, g, device))
    scales = dict(k_scale=scale_tensor(0.5, device), v_scale=scale_tensor(0.25, device))
    rand = lambda *shape: randn(shape, BASE_DTYPE, g).to(device)  # noqa: E731
    ints = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    pattern = dict(zip(("pattern", "layout_crow", "layout_col"), PATTERN.op_args()))
    if op == "write_kv_cache":
        return dict(key=rand(10, HKV, D), value=rand(10, HKV, D), **caches,
                    slot_mapping=torch.tensor([0, 5, -1, 17, 127, 40, 41, -1, 64, 3], device=device), **scales)
    tables = ints([[3, 1, 0, 0], [7, 2, 5, 6]])
    if op == "paged_decode":
        return dict(out=torch.zeros(2, HQ, D, dtype=BASE_DTYPE, device=device), q=rand(2, HQ, D), **caches,
                    block_tables=tables, seq_lens=ints([20, 45]), scale=0.125, **pattern, lse=None, **scales)
    return dict(out=torch.zeros(30, HQ, D, dtype=BASE_DTYPE, device=device), q=rand(30, HQ, D), **caches,
                block_tables=tables, cu_seqlens_q=ints([0, 10, 30]), seq_lens=ints([20, 45]), scale=0.125, **pattern,
                lse=None, **scales)


OPS = ("write_kv_cache", "paged_decode", "paged_prefill")


def _recast(dtype):
    """Both caches reinterpreted (same bytes) as another 1-byte dtype."""
    def mutate(args, device):
        args["key_cache"], args["value_cache"] = args["key_cache"].view(dtype), args["value_cache"].view(dtype)
    return mutate


def _set(name, make):
    def mutate(args, device):
        args[name] = make(args[name], device)
    return mutate


def _cross_device(name):
    return _set(name, lambda t, device: t.to("cpu" if device.startswith("cuda") else "cuda"))


# name -> (mutation, regex the message must match (names the argument and the value), needs the values of
# a tensor (on CUDA checked only with BSA_CHECK_INPUTS=1), needs a second device)
BAD_CASES = {
    "k_scale-float64": (_set("k_scale", lambda t, dev: t.double()), r"k_scale.*Double", False, False),
    "v_scale-float16": (_set("v_scale", lambda t, dev: t.half()), r"v_scale.*Half", False, False),
    "k_scale-two-elements": (_set("k_scale", lambda t, dev: t.repeat(2)), r"k_scale.*\[2\]", False, False),
    "v_scale-other-device": (_cross_device("v_scale"), r"v_scale", False, True),
    "k_scale-zero": (_set("k_scale", lambda t, dev: t.zero_()), r"k_scale.*0", True, False),
    "k_scale-negative": (_set("k_scale", lambda t, dev: t.fill_(-1.0)), r"k_scale.*-1", True, False),
    "v_scale-nan": (_set("v_scale", lambda t, dev: t.fill_(math.nan)), r"(?i)v_scale.*nan", True, False),
    "v_scale-inf": (_set("v_scale", lambda t, dev: t.fill_(math.inf)), r"(?i)v_scale.*inf", True, False),
    # the message must blame the cache and say that fp8 would do (not "key must have the dtype of key_cache")
    "caches-int8": (_recast(torch.int8), r"(?s)key_cache.*fp8.*Char", False, False),
    "caches-uint8": (_recast(torch.uint8), r"(?s)key_cache.*fp8.*Byte", False, False),
    "value_cache-e5m2": (_set("value_cache", lambda t, dev: t.view(torch.float8_e5m2)),
                         r"value_cache.*Float8_e5m2", False, False),
    "value_cache-model-dtype": (_set("value_cache", lambda t, dev: torch.zeros(t.shape, dtype=BASE_DTYPE, device=dev)),
                                r"value_cache.*Half", False, False),
}


@pytest.mark.parametrize("op", OPS)
def test_fp8_valid_baselines(device, op):
    getattr(_ops, op)(*_valid_args(op, device).values())


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("op", OPS)
def test_fp8_bad_inputs(device, op, case, monkeypatch):
    mutate, match, needs_values, cross_device = BAD_CASES[case]
    if cross_device and not HAS_CUDA:
        pytest.skip("a second device needs CUDA")
    if needs_values and device.startswith("cuda"):
        monkeypatch.setenv("BSA_CHECK_INPUTS", "1")  # value checks cost a device->host copy on CUDA
    args = _valid_args(op, device)
    mutate(args, device)
    before = {name: as_bytes(args[name]).clone() for name in ("key_cache", "value_cache")}
    config = f"{op} {device} {case}"
    with pytest.raises((RuntimeError, ValueError)) as info:
        getattr(_ops, op)(*args.values())
    assert re.search(match, str(info.value)), (
        f"[{config}] the error does not name the argument and its value (expected /{match}/): {info.value}")
    for name, bytes_before in before.items():
        assert torch.equal(as_bytes(args[name]), bytes_before), f"[{config}] the rejected call changed {name}"


# ---- torch.library.opcheck -----------------------------------------------------------------------------------

# opcheck's test_schema compares every argument before and after the call with torch.allclose, which
# has no fp8 kernel ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'): it cannot run on
# fp8 tensors. The schemas' mutation annotations are checked with model-dtype caches in
# test_attention_ops.py / test_kv_cache_ops.py; here the other three checks run.
OPCHECK_UTILS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_opcheck_fp8(device, fp8, gen):
    """Fake kernel, autograd registration and AOT dispatch of the three ops with fp8 caches and scales."""
    dtype = torch.bfloat16
    hkv, d, kvbs = 2, 64, 16
    keys = [randn((n, hkv, d), dtype, gen) for n in (20, 45)]
    shape_cache, _, tables = build_paged_cache(keys, keys, kvbs, gen, device)
    key_cache = fp8_cache(tuple(shape_cache.shape), fp8, None, device).view(torch.uint8).zero_().view(fp8)
    value_cache = key_cache.clone()
    k_scale, v_scale = scale_tensor(0.05, device), scale_tensor(0.02, device)
    slots = torch.cat([sequence_slots(tables, r, torch.arange(k.shape[0]), kvbs) for r, k in enumerate(keys)])
    all_k = torch.cat(keys).to(device)
    torch.library.opcheck(_ops.write_kv_cache.default,
                          (all_k, all_k.neg(), key_cache, value_cache, slots.to(device), k_scale, v_scale),
                          test_utils=OPCHECK_UTILS)
    ops.write_kv_cache(all_k, all_k.neg(), key_cache, value_cache, slots.to(device), k_scale, v_scale)
    pattern = make_pattern("qslide", 16, 2, 3, 4, hkv)
    seq_lens = torch.tensor([20, 45], dtype=torch.int32, device=device)
    q = randn((2, 4, d), dtype, gen).to(device)
    out, lse = torch.zeros_like(q), torch.zeros(4, 2, device=device)
    torch.library.opcheck(_ops.paged_decode.default, (out, q, key_cache, value_cache, tables, seq_lens, 0.125,
                                                      *pattern.op_args(), lse, k_scale, v_scale),
                          test_utils=OPCHECK_UTILS)
    q = randn((30, 4, d), dtype, gen).to(device)
    out, lse = torch.zeros_like(q), torch.zeros(4, 30, device=device)
    torch.library.opcheck(_ops.paged_prefill.default, (out, q, key_cache, value_cache, tables,
                                                       cu_seqlens([10, 20], device), seq_lens, 0.125,
                                                       *pattern.op_args(), lse, k_scale, v_scale),
                          test_utils=OPCHECK_UTILS)


# ---- CUDA graphs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=fp8_ids)
def test_decode_graph_reads_new_scales(device, fp8, gen, monkeypatch):
    """A decode step (write the new token, attend) captured once with scale tensors; the scales then
    change in place (k_scale.fill_), the cache is rewritten with them, and the replay must use the new
    values: the scales are read from the device at run time, never baked into the graph."""
    if not device.startswith("cuda"):
        pytest.skip("CUDA graphs need a GPU")
    monkeypatch.delenv("BSA_CHECK_INPUTS", raising=False)  # value checks would sync: not capturable
    dtype, hq, hkv, d, kvbs = torch.bfloat16, 8, 2, 128, 16
    seq_lens = [300, 77, 1]
    pattern = make_pattern("qslide", 64, 2, 4, hq, hkv)
    keys = [randn((n, hkv, d), dtype, gen) for n in seq_lens]
    _, _, tables = build_paged_cache(keys, keys, kvbs, gen, device)
    key_cache = fp8_cache((sum(-(-n // kvbs) for n in seq_lens) + 3, hkv, kvbs, d), fp8, None, device)
    value_cache = key_cache.clone()
    k_scale, v_scale = scale_tensor(1.0, device), scale_tensor(1.0, device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    context_slots = torch.cat([sequence_slots(tables, r, torch.arange(n - 1), kvbs) for r, n in enumerate(seq_lens)])
    step_slots = torch.cat([sequence_slots(tables, r, torch.tensor([n - 1]), kvbs)
                            for r, n in enumerate(seq_lens)]).to(device)
    q = torch.zeros(len(seq_lens), hq, d, dtype=dtype, device=device)
    new_k = torch.zeros(len(seq_lens), hkv, d, dtype=dtype, device=device)
    new_v = torch.zeros_like(new_k)
    out = torch.empty_like(q)

    def step():
        ops.write_kv_cache(new_k, new_v, key_cache, value_cache, step_slots, k_scale, v_scale)
        ops.paged_decode(q, key_cache, value_cache, tables, lens, 1.0 / d, pattern, out=out, k_scale=k_scale,
                         v_scale=v_scale)

    def set_inputs(amplitude):
        """Fresh keys/values of the given size, scales amax / max set in place, context rewritten."""
        ks = [randn((n, hkv, d), dtype, gen, scale=amplitude) for n in seq_lens]
        vs = [randn((n, hkv, d), dtype, gen, scale=amplitude) for n in seq_lens]
        largest = reference.fp8_max(fp8)
        k_scale.fill_(max(float(k.float().abs().max()) for k in ks) / largest)
        v_scale.fill_(max(float(v.float().abs().max()) for v in vs) / largest)
        ops.write_kv_cache(torch.cat([k[:-1] for k in ks]).to(device), torch.cat([v[:-1] for v in vs]).to(device),
                           key_cache, value_cache, context_slots.to(device), k_scale, v_scale)
        new_k.copy_(torch.stack([k[-1] for k in ks]))
        new_v.copy_(torch.stack([v[-1] for v in vs]))
        q.copy_(randn(tuple(q.shape), dtype, gen))
        return ks, vs

    set_inputs(1.0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for amplitude in (1.0, 40.0, 0.01):
        ks, vs = set_inputs(amplitude)
        poison(out)
        graph.replay()
        torch.cuda.synchronize()
        config = f"graph replay {fp8_ids(fp8)} amplitude {amplitude} k_scale {k_scale.item():.4g}"
        ref = torch.zeros(q.shape)
        for r in range(len(seq_lens)):
            k_read = reference.dequantize(reference.quantize_fp8(ks[r], fp8, k_scale), k_scale)
            v_read = reference.dequantize(reference.quantize_fp8(vs[r], fp8, v_scale), v_scale)
            ref[r] = reference.attention_ref(q[r: r + 1].cpu(), k_read, v_read, 1.0 / d, pattern)[0][0]
        # Values of size `amplitude` cancel in O: compare in units of the values' size, as the
        # tolerances assume (P rounded to bf16 errs by ~2^-9 of |v|, not of |O|).
        assert_close_to_ref(out.float().cpu() / amplitude, ref / amplitude, dtype, config)
