"""Every bad input of spec §6 is rejected with an error that names the argument.

Each case starts from a valid call of one op (test_valid_baselines checks that they run), changes one
thing and expects an error whose message matches a fragment naming the offending argument. Cases that
need tensor values (cu_seqlens, block ids, slots, layouts) are checked on the CPU path only: on the GPU
the spec allows skipping checks that would cost a device->host sync. A rejected call changes no cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from blocksparse_attn.layout import BlockLayout, SparsePattern
from conftest import HAS_CUDA

_ops = torch.ops.blocksparse_attn
ERRORS = (RuntimeError, ValueError, TypeError)

# ---- the valid baselines ----------------------------------------------------------------------------
DTYPE = torch.float16  # supported on every device
HQ, HKV, D, B, KVBS, NB = 4, 2, 64, 16, 16, 8
PATTERN = SparsePattern(B, 2, 3, 1)
MUTATED_CACHES = ("key_cache", "value_cache", "kv_caches", "dst_kv_cache")


def _t(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def _rand(shape, device, dtype=DTYPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype).to(device)


def _pattern_args(pattern=PATTERN):
    return dict(zip(("pattern", "layout_crow", "layout_col"), pattern.op_args()))


# The fields of the ops' `pattern` argument, in order (csrc/common/pattern.h, PatternArgs).
PATTERN_FIELDS = ("sparse_block_size", "local_blocks", "vert_stride", "head_sliding_step", "slide_by_kv_head",
                  "head_offset")


def _caches(device):
    return _rand((NB, HKV, KVBS, D), device), _rand((NB, HKV, KVBS, D), device)


# 3 sequences: (q_len, k_len) = (5, 10), (5, 5), (30, 35)
def varlen_args(device):
    return dict(out=torch.zeros(40, HQ, D, dtype=DTYPE, device=device), q=_rand((40, HQ, D), device),
                k=_rand((50, HKV, D), device), v=_rand((50, HKV, D), device),
                cu_seqlens_q=_t([0, 5, 10, 40], torch.int32, device),
                cu_seqlens_k=_t([0, 10, 15, 50], torch.int32, device), scale=0.125, **_pattern_args(),
                lse=torch.zeros(HQ, 40, device=device))


# 2 sequences of 20 and 45 tokens (10 and 20 new), 4 cache blocks of 16 each at most
def paged_prefill_args(device):
    key_cache, value_cache = _caches(device)
    return dict(out=torch.zeros(30, HQ, D, dtype=DTYPE, device=device), q=_rand((30, HQ, D), device),
                key_cache=key_cache, value_cache=value_cache,
                block_tables=_t([[3, 1, 0, 0], [7, 2, 5, 6]], torch.int32, device),
                cu_seqlens_q=_t([0, 10, 30], torch.int32, device), seq_lens=_t([20, 45], torch.int32, device),
                scale=0.125, **_pattern_args(), lse=torch.zeros(HQ, 30, device=device))


def paged_decode_args(device):
    key_cache, value_cache = _caches(device)
    return dict(out=torch.zeros(3, HQ, D, dtype=DTYPE, device=device), q=_rand((3, HQ, D), device),
                key_cache=key_cache, value_cache=value_cache,
                block_tables=_t([[3, 1, 0, 0], [7, 2, 5, 6], [0, 0, 0, 0]], torch.int32, device),
                seq_lens=_t([20, 45, 0], torch.int32, device), scale=0.125, **_pattern_args(),
                lse=torch.zeros(HQ, 3, device=device))


def write_kv_cache_args(device):
    qkv = _rand((10, HKV, 4, D), device)  # fused QKV with q_per_kv = 2: key/value are strided views
    key_cache, value_cache = _caches(device)
    return dict(key=qkv[:, :, 2], value=qkv[:, :, 3], key_cache=key_cache, value_cache=value_cache,
                slot_mapping=_t([0, 5, -1, 17, 127, 40, 41, -1, 64, 3], torch.int64, device))


def copy_blocks_args(device):
    return dict(kv_caches=[_rand((2, NB, KVBS * HKV * D), device) for _ in range(2)],
                block_mapping=_t([[0, 3], [1, 4], [0, 5]], torch.int64, device))


def swap_blocks_args(device):
    return dict(src_kv_cache=_rand((2, NB, KVBS * HKV * D), "cpu"), dst_kv_cache=_rand((2, 5, KVBS * HKV * D), device),
                block_mapping=_t([[7, 0], [2, 4]], torch.int64, "cpu"))


BASELINES = {"varlen_prefill": varlen_args, "paged_prefill": paged_prefill_args, "paged_decode": paged_decode_args,
             "write_kv_cache": write_kv_cache_args, "copy_blocks": copy_blocks_args, "swap_blocks": swap_blocks_args}


def call(op: str, args: dict):
    getattr(_ops, op)(*args.values())


@pytest.mark.parametrize("op", BASELINES)
def test_valid_baselines(device, op):
    call(op, BASELINES[op](device))


# ---- the bad cases -----------------------------------------------------------------------------------

@dataclass
class Case:
    op: str
    name: str
    mutate: Callable  # (args, device, other_device) -> None, edits args in place
    match: str        # regex that the error message must contain (names the argument)
    values: bool = False        # needs tensor values: checked on the CPU path
    cross_device: bool = False  # moves one tensor to the other device: needs CUDA
    cuda_only: bool = False


def both(a: str, b: str) -> str:
    """A regex matching messages that contain both fragments, in any order."""
    return rf"(?s)(?=.*{a})(?=.*{b})"


def setarg(name, make):
    def mutate(args, device, other):
        args[name] = make(args[name], device, other) if callable(make) else make
    return mutate


def setfield(field, value):
    """One field of the `pattern` ints set to value."""
    def mutate(args, device, other):
        args["pattern"] = list(args["pattern"])
        args["pattern"][PATTERN_FIELDS.index(field)] = value
    return mutate


def to_other(name):
    return setarg(name, lambda t, device, other: t.to(other))


def noncontig(t):
    """The same values, every stride doubled-up: a view that is not contiguous."""
    return torch.stack([t, t], dim=-1)[..., 0]


def misaligned(t):
    """A contiguous tensor of t's shape and dtype (zeros) whose storage starts 2 bytes past a 16-byte
    boundary: a view into a flat buffer at an odd offset."""
    flat = torch.zeros(t.numel() + 8, dtype=t.dtype, device=t.device)
    return flat[1:1 + t.numel()].view(t.shape)


def strided_rows(t):
    """Same shape, rows of a wider tensor: unit last stride but not contiguous overall."""
    wide = torch.cat([t, t], dim=-1)
    return wide[..., : t.shape[-1]]


def layout(mask_rows, block_size=B, heads=HQ):
    """BlockLayout from per-row column lists (same for every head), no validation of the values."""
    crow = [0]
    col = []
    for row in mask_rows:
        col += row
        crow.append(len(col))
    crow_t = torch.tensor([crow] * heads, dtype=torch.int32)
    col_t = torch.tensor([col or [0]] * heads, dtype=torch.int32)
    return BlockLayout(block_size, crow_t, col_t)


def with_layout(lay):
    def mutate(args, device, other):
        args.update(_pattern_args(lay.to(device)))
    return mutate


def set_values(**values):
    def mutate(args, device, other):
        for name, v in values.items():
            args[name] = torch.tensor(v, dtype=args[name].dtype, device=args[name].device)
    return mutate


def set_entry(name, index, value):
    """A copy of args[name] with one entry changed (a used seq_lens / block_tables entry)."""
    def make(t, device, other):
        t = t.clone()
        t[index] = value
        return t
    return setarg(name, make)


def chain(*mutations):
    def mutate(args, device, other):
        for m in mutations:
            m(args, device, other)
    return mutate


def cast(name, dtype):
    return setarg(name, lambda t, device, other: t.to(dtype))


def reshape(name, shape_fn):
    return setarg(name, lambda t, device, other: torch.zeros(shape_fn(t.shape), dtype=t.dtype, device=t.device))


def kv_heads(n):  # caches with n kv heads
    return chain(reshape("key_cache", lambda s: (s[0], n, s[2], s[3])),
                 reshape("value_cache", lambda s: (s[0], n, s[2], s[3])))


def kv_block_size(kvbs):
    return chain(reshape("key_cache", lambda s: (s[0], s[1], kvbs, s[3])),
                 reshape("value_cache", lambda s: (s[0], s[1], kvbs, s[3])))


# A column above the diagonal: query block 1 lists key block 2.
ABOVE_DIAGONAL = layout([[0], [0, 2], [2], [3]])
FULL_LAYOUT_4 = layout([[0], [0, 1], [1, 2], [2, 3]])  # covers 64 tokens
SHORT_LAYOUT = layout([[0], [0, 1]])                   # covers 32 tokens only
NOT_ASCENDING = layout([[0], [1, 0], [2], [1, 3]])

ATTENTION_CASES = []
for op in ("varlen_prefill", "paged_prefill", "paged_decode"):
    ATTENTION_CASES += [
        Case(op, "q-float64", cast("q", torch.float64), r"\bq\b.*dtype"),
        Case(op, "q-int", cast("q", torch.int32), r"\bq\b.*dtype"),
        Case(op, "out-dtype", cast("out", torch.bfloat16), r"\bout\b.*dtype"),
        Case(op, "lse-dtype", cast("lse", torch.float16), r"\blse\b.*dtype"),
        Case(op, "q-2d", setarg("q", lambda t, d, o: t[:, 0]), r"\bq\b"),
        Case(op, "out-shape", setarg("out", lambda t, d, o: t[:, :2].contiguous()), r"\bout\b.*shape"),
        Case(op, "lse-shape", setarg("lse", lambda t, d, o: t[:, 1:].contiguous()), r"\blse\b.*shape"),
        Case(op, "out-noncontiguous", setarg("out", lambda t, d, o: noncontig(t)), r"\bout\b.*contiguous"),
        Case(op, "out-misaligned", setarg("out", lambda t, d, o: misaligned(t)), r"\bout\b.*16-byte", cuda_only=True),
        Case(op, "lse-noncontiguous", setarg("lse", lambda t, d, o: noncontig(t)), r"\blse\b.*contiguous"),
        Case(op, "q-last-stride", setarg("q", lambda t, d, o: noncontig(t)), r"\bq\b.*stride"),
        Case(op, "head-size-72", chain(*[reshape(n, lambda s: (*s[:-1], 72))
                                         for n in ("out", "q", "k", "v", "key_cache", "value_cache")
                                         if n in BASELINES[op]("cpu")]), r"\bq\b.*72"),
        Case(op, "local-blocks-0", setfield("local_blocks", 0), r"local_blocks.*0"),
        Case(op, "vert-stride-0", setfield("vert_stride", 0), r"vert_stride.*0"),
        Case(op, "block-size-48", setfield("sparse_block_size", 48), r"sparse_block_size.*48"),
        Case(op, "block-size-8", setfield("sparse_block_size", 8), r"sparse_block_size.*8"),
        Case(op, "sliding-step-negative", setfield("head_sliding_step", -1), r"head_sliding_step"),
        # below 2^30 itself, but the last head's vertical offset (sliding index x step) passes 2^31
        Case(op, "sliding-step-overflow", chain(setfield("head_offset", 8), setfield("head_sliding_step", 1 << 29)),
             r"head_sliding_step \(536870912\).*below 2\^31"),
        Case(op, "head-offset-negative", setfield("head_offset", -2), r"head_offset"),
        Case(op, "layout-crow-only", setarg("layout_crow", lambda t, d, o: FULL_LAYOUT_4.crow.to(d)), r"layout_crow"),
        Case(op, "layout-with-L", chain(with_layout(FULL_LAYOUT_4), setfield("local_blocks", 2)), r"local_blocks"),
        Case(op, "layout-crow-int64", chain(with_layout(FULL_LAYOUT_4), cast("layout_crow", torch.int64)),
             r"layout_crow.*dtype"),
        Case(op, "layout-heads", chain(with_layout(layout([[0], [0, 1], [1, 2], [2, 3]], heads=HQ + 1))),
             r"layout_(crow|col)"),
        Case(op, "layout-above-diagonal", with_layout(ABOVE_DIAGONAL), r"layout_col.*diagonal", values=True),
        Case(op, "layout-not-ascending", with_layout(NOT_ASCENDING), r"layout_col.*ascending", values=True),
        Case(op, "layout-too-short", with_layout(SHORT_LAYOUT), r"layout.*(query blocks|short|cover)", values=True),
        Case(op, "q-fp32-on-cuda", chain(cast("q", torch.float32), cast("out", torch.float32),
                                         *[cast(n, torch.float32) for n in ("k", "v", "key_cache", "value_cache")
                                           if n in BASELINES[op]("cpu")]),
             r"\bq\b.*(dtype|Float|float32)", cuda_only=True),
        Case(op, "out-device", to_other("out"), r"\bout\b.*device", cross_device=True),
        Case(op, "lse-device", to_other("lse"), r"\blse\b.*device", cross_device=True),
        Case(op, "layout-device", chain(with_layout(FULL_LAYOUT_4), to_other("layout_col")), r"layout_col.*device",
             cross_device=True),
    ]

ATTENTION_CASES += [
    # varlen_prefill: k/v and cu_seqlens
    Case("varlen_prefill", "k-dtype", cast("k", torch.bfloat16), r"\bk\b.*dtype"),
    Case("varlen_prefill", "v-dtype", cast("v", torch.bfloat16), r"\bv\b.*dtype"),
    Case("varlen_prefill", "cu_seqlens_q-int64", cast("cu_seqlens_q", torch.int64), r"cu_seqlens_q.*dtype"),
    Case("varlen_prefill", "cu_seqlens_k-int64", cast("cu_seqlens_k", torch.int64), r"cu_seqlens_k.*dtype"),
    Case("varlen_prefill", "k-head-size", chain(reshape("k", lambda s: (s[0], s[1], 128)),
                                                 reshape("v", lambda s: (s[0], s[1], 128))), r"\bk\b.*64"),
    Case("varlen_prefill", "v-shape", reshape("v", lambda s: (s[0] - 1, s[1], s[2])), r"\bv\b.*shape"),
    Case("varlen_prefill", "k-last-stride", setarg("k", lambda t, d, o: noncontig(t)), r"\bk\b.*stride"),
    Case("varlen_prefill", "hq-not-multiple-of-hkv", chain(reshape("k", lambda s: (s[0], 3, s[2])),
                                                            reshape("v", lambda s: (s[0], 3, s[2]))), r"\bk\b.*3"),
    Case("varlen_prefill", "cu_seqlens-length", set_values(cu_seqlens_k=[0, 10, 50]), r"cu_seqlens_k"),
    Case("varlen_prefill", "cu_seqlens_q-noncontiguous",
         setarg("cu_seqlens_q", lambda t, d, o: noncontig(t)), r"cu_seqlens_q.*contiguous"),
    Case("varlen_prefill", "cu_seqlens_q-decreasing", set_values(cu_seqlens_q=[0, 6, 5, 40]),
         r"cu_seqlens_q.*decrease", values=True),
    Case("varlen_prefill", "cu_seqlens_k-decreasing", set_values(cu_seqlens_q=[0, 5, 5, 40],
                                                                 cu_seqlens_k=[0, 10, 9, 50]),
         r"cu_seqlens_k.*decrease", values=True),
    Case("varlen_prefill", "cu_seqlens_q-wrong-end", set_values(cu_seqlens_q=[0, 5, 10, 39]),
         r"cu_seqlens_q.*40", values=True),
    Case("varlen_prefill", "cu_seqlens_k-wrong-end", set_values(cu_seqlens_k=[0, 10, 15, 51]),
         r"cu_seqlens_k.*50", values=True),
    Case("varlen_prefill", "cu_seqlens_q-start", set_values(cu_seqlens_q=[1, 5, 10, 40]),
         r"cu_seqlens_q\[0\]", values=True),
    Case("varlen_prefill", "q_len-above-k_len", set_values(cu_seqlens_q=[0, 5, 12, 40], cu_seqlens_k=[0, 10, 15, 50]),
         r"(cu_seqlens|query|q_len).*(key|k_len|cu_seqlens_k)", values=True),
    Case("varlen_prefill", "k-device", to_other("k"), r"\bk\b.*device", cross_device=True),
    Case("varlen_prefill", "cu_seqlens_q-device", to_other("cu_seqlens_q"), r"cu_seqlens_q.*device",
         cross_device=True),
]

for op in ("paged_prefill", "paged_decode"):
    ATTENTION_CASES += [
        Case(op, "key_cache-dtype", cast("key_cache", torch.bfloat16), r"key_cache.*dtype"),
        Case(op, "value_cache-dtype", cast("value_cache", torch.bfloat16), r"value_cache.*dtype"),
        Case(op, "key_cache-3d", setarg("key_cache", lambda t, d, o: t[:, 0]), r"key_cache"),
        Case(op, "value_cache-shape", reshape("value_cache", lambda s: (s[0] - 1, *s[1:])), r"value_cache.*shape"),
        Case(op, "key_cache-head-size", chain(reshape("key_cache", lambda s: (*s[:3], 128)),
                                              reshape("value_cache", lambda s: (*s[:3], 128))), r"key_cache"),
        Case(op, "key_cache-noncontiguous", setarg("key_cache", lambda t, d, o: noncontig(t)),
             r"key_cache.*contiguous"),
        Case(op, "hq-not-multiple-of-hkv", kv_heads(3), r"key_cache.*3"),
        Case(op, "kvbs-incompatible", kv_block_size(24), r"(sparse_block_size|kv block size).*24"),
        Case(op, "block_tables-int64", cast("block_tables", torch.int64), r"block_tables.*dtype"),
        Case(op, "block_tables-rows", setarg("block_tables", lambda t, d, o: t[:1].contiguous()),
             r"block_tables"),
        Case(op, "block_tables-strided", setarg("block_tables", lambda t, d, o: noncontig(t)), r"block_tables"),
        Case(op, "seq_lens-int64", cast("seq_lens", torch.int64), r"seq_lens.*dtype"),
        Case(op, "seq_lens-length", setarg("seq_lens", lambda t, d, o: torch.cat([t, t[:1]])), r"seq_lens"),
        Case(op, "seq_len-beyond-block-table", set_entry("seq_lens", 1, 65), r"seq_lens.*65", values=True),
        Case(op, "seq_len-negative", set_entry("seq_lens", 0, -1), r"seq_lens.*-1", values=True),
        Case(op, "block-id-too-large", set_entry("block_tables", (1, 2), NB), r"block_tables.*8", values=True),
        Case(op, "block-id-negative", set_entry("block_tables", (1, 0), -3), r"block_tables.*-3", values=True),
        Case(op, "key_cache-device", to_other("key_cache"), r"key_cache.*device", cross_device=True),
        Case(op, "block_tables-device", to_other("block_tables"), r"block_tables.*device", cross_device=True),
        Case(op, "seq_lens-device", to_other("seq_lens"), r"seq_lens.*device", cross_device=True),
    ]

ATTENTION_CASES += [
    Case("paged_prefill", "cu_seqlens_q-wrong-end", set_values(cu_seqlens_q=[0, 10, 29]), r"cu_seqlens_q.*30",
         values=True),
    Case("paged_prefill", "cu_seqlens_q-decreasing", set_values(cu_seqlens_q=[0, 31, 30]),
         r"cu_seqlens_q.*decrease", values=True),
    Case("paged_prefill", "q_len-above-seq_len", chain(set_values(cu_seqlens_q=[0, 25, 30])),
         r"(cu_seqlens_q|query|q_len).*(seq_len|20)", values=True),
    # one sequence by cu_seqlens_q, two by seq_lens: either may be named
    Case("paged_prefill", "cu_seqlens_q-length", set_values(cu_seqlens_q=[0, 30]), r"cu_seqlens_q|seq_lens"),
    Case("paged_decode", "q-rows", setarg("seq_lens", lambda t, d, o: t[:2].contiguous()), r"seq_lens"),
]

CACHE_CASES = [
    Case("write_kv_cache", "key-dtype", cast("key", torch.bfloat16), r"\bkey\b.*dtype"),
    Case("write_kv_cache", "value-dtype", cast("value", torch.bfloat16), r"\bvalue\b.*dtype"),
    Case("write_kv_cache", "cache-dtype", chain(cast("key_cache", torch.float32), cast("value_cache", torch.float32)),
         both(r"\bkey\b", "dtype")),
    Case("write_kv_cache", "value_cache-dtype", cast("value_cache", torch.float32), r"value_cache.*dtype"),
    Case("write_kv_cache", "slot_mapping-int32", cast("slot_mapping", torch.int32), r"slot_mapping.*dtype"),
    Case("write_kv_cache", "slot_mapping-length", setarg("slot_mapping", lambda t, d, o: t[:9]), r"slot_mapping"),
    Case("write_kv_cache", "value-shape", setarg("value", lambda t, d, o: t[:9]), r"\bvalue\b.*shape"),
    Case("write_kv_cache", "key-head-size", chain(setarg("key", lambda t, d, o: t[..., :32]),
                                                   setarg("value", lambda t, d, o: t[..., :32])),
         both(r"\bkey\b", "64")),
    Case("write_kv_cache", "key-last-stride", setarg("key", lambda t, d, o: noncontig(t)), r"\bkey\b.*stride"),
    Case("write_kv_cache", "key_cache-noncontiguous", setarg("key_cache", lambda t, d, o: noncontig(t)),
         r"key_cache.*contiguous"),
    Case("write_kv_cache", "value_cache-shape", reshape("value_cache", lambda s: (s[0] - 1, *s[1:])),
         r"value_cache.*shape"),
    Case("write_kv_cache", "slot-too-large", set_values(slot_mapping=[0, 5, -1, 17, 128, 40, 41, -1, 64, 3]),
         r"slot.*128", values=True),
    Case("write_kv_cache", "slot-far-too-large", set_values(slot_mapping=[0, 5, -1, 17, 127, 40, 41, -1, 64, 2**40]),
         r"slot", values=True),
    Case("write_kv_cache", "slot_mapping-device", to_other("slot_mapping"), r"slot_mapping.*device", cross_device=True),
    Case("write_kv_cache", "key-device", chain(to_other("key"), to_other("value")), r"\bkey\b.*device",
         cross_device=True),
    Case("copy_blocks", "mapping-int32", cast("block_mapping", torch.int32), r"block_mapping.*dtype"),
    Case("copy_blocks", "mapping-shape", setarg("block_mapping", lambda t, d, o: t[:, :1].contiguous()),
         r"block_mapping.*shape"),
    Case("copy_blocks", "mapping-src-too-large", set_values(block_mapping=[[0, 3], [8, 4]]), r"block_mapping.*8",
         values=True),
    Case("copy_blocks", "mapping-dst-negative", set_values(block_mapping=[[0, 3], [1, -1]]), r"block_mapping.*-1",
         values=True),
    Case("copy_blocks", "caches-device", setarg("kv_caches", lambda t, d, o: [t[0], t[1].to(o)]),
         r"kv_caches.*device", cross_device=True),
    Case("swap_blocks", "dtype-mismatch", cast("dst_kv_cache", torch.bfloat16), r"dst_kv_cache.*dtype"),
    Case("swap_blocks", "block-shape-mismatch", reshape("dst_kv_cache", lambda s: (2, s[1], s[2] // 2)),
         r"dst_kv_cache.*shape"),
    Case("swap_blocks", "mapping-int32", cast("block_mapping", torch.int32), r"block_mapping.*dtype"),
    Case("swap_blocks", "mapping-src-too-large", set_values(block_mapping=[[7, 0], [8, 4]]), r"block_mapping.*8",
         values=True),
    Case("swap_blocks", "mapping-dst-too-large", set_values(block_mapping=[[7, 0], [2, 5]]), r"block_mapping.*5",
         values=True),
    Case("swap_blocks", "mapping-on-cuda", to_other("block_mapping"), r"block_mapping.*(CPU|cpu|device)",
         cross_device=True),
]

CASES = ATTENTION_CASES + CACHE_CASES


def snapshot(args):
    """Copies of every cache the op may write into."""
    out = {}
    for name in MUTATED_CACHES:
        if name in args:
            value = args[name]
            out[name] = [t.clone() for t in value] if isinstance(value, list) else value.clone()
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.name}")
def test_bad_input(device, case):
    other = "cpu" if device.startswith("cuda") else "cuda"
    if case.cross_device and not HAS_CUDA:
        pytest.skip("needs CUDA for a second device")
    if case.values and device != "cpu":
        pytest.skip("value checks are only required on the CPU path")
    if case.cuda_only and not device.startswith("cuda"):
        pytest.skip("a CUDA-only restriction")
    if case.op == "swap_blocks" and case.name == "mapping-on-cuda" and not device.startswith("cpu"):
        other = device  # the mapping must be on the CPU whatever the caches' devices
    args = BASELINES[case.op](device)
    case.mutate(args, device, other)
    before = snapshot(args)
    with pytest.raises(ERRORS, match=case.match):
        call(case.op, args)
    for name, old in before.items():
        new = args[name]
        for a, b in zip(new if isinstance(new, list) else [new], old if isinstance(old, list) else [old]):
            assert torch.equal(a, b), f"{case.op}-{case.name}: the rejected call changed {name}"
