"""The sparsity pattern objects (blocksparse_attn.layout) against spec §2 and the reference.

SparsePattern.block_mask and the reference's block_visible are two independent writings of the spec's
formula; they must agree everywhere, and both must draw the spec's worked example exactly.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from blocksparse_attn import layout, reference
from blocksparse_attn.layout import BlockLayout, SparsePattern

# ---- the axes (STYLE rule 12) ----------------------------------------------------------------------
LOCAL_BLOCKS = (1, 2, 4, 16)
VERT_STRIDES = (1, 2, 3, 8, 13)
HEAD_COUNTS = ((1, 1), (4, 2), (8, 1), (32, 8))  # (Hq, Hkv)
SLIDING_STEPS = (0, 1, 2, 5)
HEAD_OFFSETS = (0, 3, 32)  # tp_rank * Hq for some rank (3: an odd offset the formula must not assume away)
NUM_BLOCKS = 24
BLOCK_SIZES = (16, 32, 64, 128)

# Spec §2's example: 8x8 blocks, L = 2, V = 3, two heads, s = 1.
WORKED_EXAMPLE = {
    0: """\
q0 D . . . . . . .
q1 # D . . . . . .
q2 . # D . . . . .
q3 . . # D . . . .
q4 . . # # D . . .
q5 . . # . # D . .
q6 . . # . . # D .
q7 . . # . . # # D""",
    1: """\
q0 D . . . . . . .
q1 # D . . . . . .
q2 . # D . . . . .
q3 . # # D . . . .
q4 . # . # D . . .
q5 . # . . # D . .
q6 . # . . # # D .
q7 . # . . # . # D""",
}


def picture(mask: torch.Tensor) -> str:
    """One head's [n, n] block mask in the spec's notation: D diagonal, # visible, . skipped."""
    rows = []
    for i in range(mask.shape[0]):
        cells = ["D" if i == j and mask[i, j] else "#" if mask[i, j] else "." for j in range(mask.shape[1])]
        rows.append(f"q{i} " + " ".join(cells))
    return "\n".join(rows)


def reference_mask(pattern, num_heads, num_kv_heads, n):
    blocks = torch.arange(n)
    return reference.block_visible(pattern, num_heads, num_kv_heads, blocks, blocks)


# ---- SparsePattern.block_mask ----------------------------------------------------------------------

@pytest.mark.parametrize("local_blocks", LOCAL_BLOCKS, ids=lambda x: f"L{x}")
@pytest.mark.parametrize("vert_stride", VERT_STRIDES, ids=lambda x: f"V{x}")
def test_block_mask_matches_reference(local_blocks, vert_stride):
    for (hq, hkv), step, offset, by_kv in itertools.product(HEAD_COUNTS, SLIDING_STEPS, HEAD_OFFSETS, (False, True)):
        config = f"L={local_blocks} V={vert_stride} Hq={hq} Hkv={hkv} s={step} offset={offset} by_kv={by_kv}"
        p = SparsePattern(64, local_blocks, vert_stride, step, by_kv, offset)
        got = p.block_mask(hq, NUM_BLOCKS, hkv)
        want = reference_mask(p, hq, hkv, NUM_BLOCKS)
        assert got.dtype == torch.bool and got.shape == (hq, NUM_BLOCKS, NUM_BLOCKS), config
        assert torch.equal(got, want), f"[{config}] heads differ: {(got != want).flatten(1).any(-1).nonzero().tolist()}"
        # properties every pattern has: causal, the local band (diagonal included) always visible
        i = torch.arange(NUM_BLOCKS)
        assert not (got & (i.view(-1, 1) < i.view(1, -1))).any(), f"[{config}] block above the diagonal"
        band = (i.view(-1, 1) - i.view(1, -1) >= 0) & (i.view(-1, 1) - i.view(1, -1) < local_blocks)
        assert got[:, band].all(), f"[{config}] local band not fully visible"
        if vert_stride == 1:
            assert got[:, i.view(-1, 1) >= i.view(1, -1)].all(), f"[{config}] V = 1 must be dense causal"


def test_worked_example_pictures():
    p = SparsePattern(16, local_blocks=2, vert_stride=3, head_sliding_step=1)
    mask = p.block_mask(2, 8)
    ref = reference_mask(p, 2, 2, 8)
    for h, expected in WORKED_EXAMPLE.items():
        assert picture(mask[h]) == expected, f"head {h}:\n{picture(mask[h])}\nexpected\n{expected}"
        assert picture(ref[h]) == expected, f"reference head {h}:\n{picture(ref[h])}"


def test_homo_head_and_kv_sliding_share_columns():
    homo = SparsePattern(64, 2, 4, head_sliding_step=0).block_mask(8, 12)
    assert all(torch.equal(homo[0], homo[h]) for h in range(8)), "homo_head: every head has one pattern"
    by_kv = SparsePattern(64, 2, 4, 1, slide_by_kv_head=True).block_mask(8, 12, num_kv_heads=2)
    assert all(torch.equal(by_kv[0], by_kv[h]) for h in range(4)), "kv group 0 must share its pattern"
    assert all(torch.equal(by_kv[4], by_kv[h]) for h in range(4, 8)), "kv group 1 must share its pattern"
    assert not torch.equal(by_kv[0], by_kv[4]), "different kv groups must slide apart"
    by_q = SparsePattern(64, 2, 4, 1).block_mask(8, 12)
    assert len({tuple(by_q[h].flatten().tolist()) for h in range(4)}) == 4, "q sliding: 4 distinct heads"


def test_head_offset_is_the_global_head():
    """Rank r of a tensor-parallel group with Hq heads per rank sees the heads r*Hq.. of the full model."""
    full = SparsePattern(64, 2, 8, 1).block_mask(16, 20)
    for tp_rank in range(4):
        rank = SparsePattern(64, 2, 8, 1, head_offset=tp_rank * 4).block_mask(4, 20)
        assert torch.equal(rank, full[tp_rank * 4: tp_rank * 4 + 4]), f"tp_rank {tp_rank}"
    full_kv = SparsePattern(64, 2, 8, 1, slide_by_kv_head=True).block_mask(16, 20, num_kv_heads=4)
    rank = SparsePattern(64, 2, 8, 1, slide_by_kv_head=True, head_offset=8).block_mask(8, 20, num_kv_heads=2)
    assert torch.equal(rank, full_kv[8:]), "slide_by_kv_head on tp_rank 1 of 2"


def test_vertical_offsets():
    p = SparsePattern(64, 2, 8, 3, head_offset=4)
    assert p.vertical_offsets(4).tolist() == [13, 16, 19, 22]  # (4 + h) * 3 + 1
    kv = SparsePattern(64, 2, 8, 3, slide_by_kv_head=True, head_offset=4)
    assert kv.vertical_offsets(4, 2).tolist() == [7, 7, 10, 10]  # ((4 + h) // 2) * 3 + 1
    assert SparsePattern(64, 2, 8, 0).vertical_offsets(3).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv.vertical_offsets(4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv.vertical_offsets(4, 3)


# ---- head_sliding_step rule (spec §2: s = max(1, int(V / (tp_size * Hq)))) ----------------------------

@pytest.mark.parametrize("num_heads,tp_size,tp_rank,step,offset", [
    (32, 1, 0, 1, 0),   # Phi-3-small on one GPU
    (4, 1, 0, 2, 0),    # 8 / 4
    (2, 1, 0, 4, 0),
    (1, 1, 0, 8, 0),
    (4, 2, 1, 1, 4),    # 8 / 8, second rank
    (2, 2, 1, 2, 2),    # 8 / 4
    (8, 4, 3, 1, 24),   # Phi-3-small with tp 4, last rank
    (3, 1, 0, 2, 0),    # int(8 / 3) truncates
])
def test_phi3_small_sliding_step(num_heads, tp_size, tp_rank, step, offset):
    p = SparsePattern.phi3_small(num_heads, tp_size, tp_rank)
    assert (p.block_size, p.local_blocks, p.vert_stride) == (64, 16, 8)
    assert (p.head_sliding_step, p.head_offset, p.slide_by_kv_head) == (step, offset, False), p


# ---- BlockLayout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_heads,num_blocks,density", [(1, 1, 1.0), (3, 7, 0.5), (4, 16, 0.2), (2, 5, 0.0)])
def test_block_layout_round_trip(num_heads, num_blocks, density):
    gen = torch.Generator().manual_seed(num_heads * 100 + num_blocks)
    mask = (torch.rand(num_heads, num_blocks, num_blocks, generator=gen) < density) & \
        torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()
    lay = BlockLayout.from_block_mask(mask, 32)
    assert lay.crow.dtype == torch.int32 and lay.col.dtype == torch.int32
    assert lay.crow.shape == (num_heads, num_blocks + 1) and lay.col.shape[0] == num_heads
    assert (lay.num_heads, lay.num_q_blocks, lay.block_size) == (num_heads, num_blocks, 32)
    assert lay.crow.is_contiguous() and lay.col.is_contiguous()
    for h in range(num_heads):
        crow = lay.crow[h].tolist()
        assert crow[0] == 0 and crow[-1] == int(mask[h].sum())
        for i in range(num_blocks):
            cols = lay.col[h, crow[i]: crow[i + 1]].tolist()
            assert cols == sorted(set(cols)), f"head {h} row {i}: columns {cols} not strictly ascending"
    assert torch.equal(lay.block_mask(), mask)
    assert torch.equal(reference_mask(lay, num_heads, num_heads, num_blocks), mask)
    if num_blocks > 1:
        assert torch.equal(lay.block_mask(num_q_blocks=num_blocks - 1), mask[:, :-1, :-1])


def test_block_layout_rejects_bad_masks():
    above = torch.zeros(1, 4, 4, dtype=torch.bool)
    above[0, 1, 2] = True
    with pytest.raises(ValueError, match="above the diagonal"):
        BlockLayout.from_block_mask(above, 16)
    with pytest.raises(ValueError, match="block_mask"):
        BlockLayout.from_block_mask(torch.ones(4, 4, dtype=torch.bool).tril(), 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockLayout.from_block_mask(torch.ones(1, 4, 4, dtype=torch.bool).tril(), 24)
    with pytest.raises(ValueError, match="crow"):
        BlockLayout(16, torch.zeros(5, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="crow"):
        BlockLayout(16, torch.zeros(2, 5, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int32))
    lay = BlockLayout.from_block_mask(torch.ones(1, 4, 4, dtype=torch.bool).tril(), 16)
    with pytest.raises(ValueError, match="4 query blocks"):
        lay.block_mask(num_q_blocks=5)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("by_kv", (False, True), ids=("qslide", "kvslide"))
def test_to_layout_is_the_pattern(block_size, by_kv):
    p = SparsePattern(block_size, 3, 5, 1, by_kv, head_offset=6)
    max_seqlen = 9 * block_size + 1  # 10 query blocks, the last one partial
    lay = p.to_layout(6, max_seqlen, num_kv_heads=3)
    assert lay.block_size == block_size and lay.num_q_blocks == 10
    assert torch.equal(lay.block_mask(), p.block_mask(6, 10, 3))
    assert torch.equal(reference_mask(lay, 6, 3, 10), reference_mask(p, 6, 3, 10))
    ints, crow, col = lay.op_args()
    assert ints == [block_size, 0, 0, 0, 0, 0] and crow is lay.crow and col is lay.col, \
        "layouts pass L = V = 0 to the ops, then their CSR tensors"
    assert p.op_args() == ([block_size, 3, 5, 1, int(by_kv), 6], None, None)


# ---- density ---------------------------------------------------------------------------------------

def test_density_worked_example():
    d = layout.density(SparsePattern(16, 2, 3, 1), 2, 8 * 16)
    # visible blocks per row, head 0: 1 2 2 2 3 3 3 4 = 20; head 1: 1 2 2 3 3 3 4 4 = 22; of 36 causal
    assert d["block_density_per_head"].tolist() == pytest.approx([20 / 36, 22 / 36])
    assert d["block_density"] == pytest.approx(21 / 36)


@pytest.mark.parametrize("seq_len", (1, 15, 16, 17, 100, 16 * 9))
@pytest.mark.parametrize("pattern", [
    SparsePattern(16, 2, 3, 1), SparsePattern(16, 1, 4, 0), SparsePattern(16, 3, 2, 1, True, 4),
], ids=("L2V3", "L1V4homo", "L3V2kv"))
def test_density_pair_fraction_matches_reference_mask(pattern, seq_len):
    hq, hkv = 4, 2
    d = layout.density(pattern, hq, seq_len, num_kv_heads=hkv)
    mask = reference.token_mask(pattern, hq, hkv, torch.arange(seq_len), seq_len)
    pairs = mask.flatten(1).sum(-1)
    causal = seq_len * (seq_len + 1) // 2
    assert d["attended_pairs"] == int(pairs.sum())
    assert d["pair_fraction_per_head"].tolist() == pytest.approx((pairs.double() / causal).tolist())
    assert d["pair_fraction"] == pytest.approx(float((pairs.double() / causal).mean()))
    n = -(-seq_len // 16)
    blocks = reference_mask(pattern, hq, hkv, n).flatten(1).sum(-1).double() / (n * (n + 1) // 2)
    assert d["block_density_per_head"].tolist() == pytest.approx(blocks.tolist())


def test_density_of_dense_and_layout():
    d = layout.density(SparsePattern(32, 1, 1, 0), 3, 200)
    assert d["block_density"] == 1.0 and d["pair_fraction"] == 1.0
    assert d["attended_pairs"] == 3 * 200 * 201 // 2
    p = SparsePattern(32, 2, 3, 1)
    assert layout.density(p.to_layout(3, 200), 3, 200)["attended_pairs"] == layout.density(p, 3, 200)["attended_pairs"]


# ---- validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=48), "block_size"),
    (dict(block_size=8), "block_size"),
    (dict(local_blocks=0), "local_blocks"),
    (dict(vert_stride=0), "vert_stride"),
    (dict(head_sliding_step=-1), "head_sliding_step"),
    (dict(head_offset=-4), "head_offset"),
])
def test_sparse_pattern_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsePattern(**kwargs)


def test_draw_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "pattern.png"
    layout.draw(SparsePattern(16, 2, 3, 1), 4, 300, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lay_path = tmp_path / "layout.png"
    layout.draw(SparsePattern(16, 2, 3, 1).to_layout(2, 300), 2, 300, str(lay_path))
    assert lay_path.stat().st_size > 0
