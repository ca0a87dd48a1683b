"""The one walk over the visible key blocks (csrc/common/pattern.h) against the reference's formula.

Every kernel enumerates the blocks it visits through pattern.h: VisibleBlocks over one query block
(the CPU kernels, the sm80 kernel's 64-row tiles for B >= 64), over 2 (the Hopper kernel's 128-row
tiles) or 4 (the sm80 kernel's tiles for B = 16), and the decode kernel's closed form over a kv
group's heads. `ops.pattern_block_mask` runs each of them over every query block and returns what
they saw, with the query blocks each block was reported visible to; it must equal the reference's
dense block mask (blocksparse_attn.reference, written from the spec's formula) on random patterns
and random explicit layouts. The kernels' agreement with the walk on the same random patterns is
tested end to end in test_fuzz.py and test_prefill_kernels.py (test_random_patterns_every_kernel).
"""
from __future__ import annotations

import random

import pytest
import torch

from _helpers import random_block_mask
from blocksparse_attn import ops, reference
from blocksparse_attn.layout import BlockLayout, SparsePattern

WALKS = (1, 2, 4, 0)  # query blocks per walk; 0: the decode kernel's closed form over kv-group heads
NUM_RANDOM = 60


def reference_block_mask(pattern, num_heads: int, num_kv_heads: int, n: int) -> torch.Tensor:
    blocks = torch.arange(n)
    return reference.block_visible(pattern, num_heads, num_kv_heads, blocks, blocks)


def random_pattern(rng: random.Random) -> tuple[SparsePattern, int, int, int]:
    num_kv_heads = rng.choice((1, 2, 3))
    num_heads = num_kv_heads * rng.choice((1, 2, 4, 5))
    pattern = SparsePattern(block_size=rng.choice((16, 32, 64, 128)), local_blocks=rng.randint(1, 6),
                            vert_stride=rng.randint(1, 9), head_sliding_step=rng.randint(0, 3),
                            slide_by_kv_head=rng.random() < 0.3, head_offset=rng.randint(0, 40))
    return pattern, num_heads, num_kv_heads, rng.randint(1, 40)


@pytest.mark.parametrize("walk", WALKS, ids=lambda w: f"rows{w}" if w else "head-set")
def test_walk_is_the_pattern_on_random_patterns(walk):
    rng = random.Random(1234 + walk)
    for case in range(NUM_RANDOM):
        pattern, hq, hkv, n = random_pattern(rng)
        got = ops.pattern_block_mask(pattern, hq, n, hkv, rows_per_walk=walk)
        want = reference_block_mask(pattern, hq, hkv, n)
        config = f"case {case}: {pattern}, Hq {hq}, Hkv {hkv}, {n} query blocks, walk {walk}"
        assert got.shape == want.shape, config
        diff = (got != want).nonzero()
        assert diff.numel() == 0, f"{config}: differs at (head, query block, key block) {diff[:5].tolist()}"


@pytest.mark.parametrize("walk", (1, 2, 4), ids=lambda w: f"rows{w}")
@pytest.mark.parametrize("diagonal", (True, False), ids=("diagonal", "holes"))
def test_walk_is_the_layout_on_random_layouts(walk, diagonal, gen):
    for case in range(10):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        heads = int(torch.randint(1, 5, (1,), generator=gen))
        mask = random_block_mask(heads, n, gen, diagonal=diagonal, density=0.3)
        layout = BlockLayout.from_block_mask(mask, 32)
        got = ops.pattern_block_mask(layout, heads, n, rows_per_walk=walk)
        assert torch.equal(got, mask), f"case {case}: {n} query blocks, {heads} heads, walk {walk}"


@pytest.mark.parametrize("walk", WALKS, ids=lambda w: f"rows{w}" if w else "head-set")
def test_walk_phi3_small(walk):
    """Phi-3-small's layer (32 q / 8 kv heads) at 128k tokens, and at a tensor-parallel rank's offset."""
    for tp_rank in (0, 1):
        pattern = SparsePattern.phi3_small(num_heads=16, tp_size=2, tp_rank=tp_rank)
        n = 131072 // 64
        got = ops.pattern_block_mask(pattern, 16, n, 4, rows_per_walk=walk)
        assert torch.equal(got, reference_block_mask(pattern, 16, 4, n)), f"tp rank {tp_rank}, walk {walk}"


def test_pattern_block_mask_bad_arguments():
    pattern = SparsePattern(16, 2, 3, 1)
    with pytest.raises(RuntimeError, match="rows_per_walk.*3"):
        ops.pattern_block_mask(pattern, 4, 8, 2, rows_per_walk=3)
    with pytest.raises(RuntimeError, match="num_kv_heads.*3"):
        ops.pattern_block_mask(pattern, 4, 8, 3)
    with pytest.raises(RuntimeError, match="pattern must hold 6"):
        torch.ops.blocksparse_attn.pattern_block_mask([16, 2, 3], None, None, 4, 2, 8, 1)
    layout = BlockLayout.from_block_mask(torch.ones(4, 8, 8, dtype=torch.bool).tril(), 16)
    with pytest.raises(RuntimeError, match="closed form"):
        ops.pattern_block_mask(layout, 4, 8, 2, rows_per_walk=0)
