"""The page-retention rule of sparsity-aware KV memory (issue 17), SparsePattern.pages_read_later,
against the reference's token mask: a page of kv head g is kept iff some later query (positions
num_tokens .. num_tokens + horizon) of a q head of group g sees one of its tokens; the rule is written
for an unbounded future, so the horizon covers the band and a full vertical period past the current
block, after which nothing new becomes visible."""
from __future__ import annotations

import pytest
import torch

from blocksparse_attn import reference
from blocksparse_attn.layout import SparsePattern

CASES = [  # (pattern, Hq, Hkv)
    (SparsePattern(16, 2, 8, 1), 8, 2),                        # Phi-3-small-like, q heads sliding
    (SparsePattern(16, 2, 8, 0), 8, 2),                        # homo_head
    (SparsePattern(16, 3, 7, 3, slide_by_kv_head=True), 8, 4),  # homo_head_group
    (SparsePattern(32, 1, 5, 2, head_offset=8), 8, 1),         # a tensor-parallel rank's heads, MQA
    (SparsePattern(64, 16, 8, 1), 32, 8),                      # Phi-3-small
]


@pytest.mark.parametrize("pattern,hq,hkv", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("kv_block_size", (8, 16, 64))
def test_rule_matches_reference(pattern, hq, hkv, kv_block_size):
    g = torch.Generator().manual_seed(hq * 1000 + kv_block_size)
    b, qpk = pattern.block_size, hq // hkv
    horizon = (pattern.local_blocks + pattern.vert_stride + 1) * b
    for num_tokens in [1, b - 1, b, 5 * b + 3] + torch.randint(1, 24 * b, (4,), generator=g).tolist():
        pages = -(-num_tokens // kv_block_size)
        keep = pattern.pages_read_later(hq, hkv, num_tokens, kv_block_size)
        assert keep.shape == (hkv, pages)
        later = torch.arange(num_tokens, num_tokens + horizon)
        mask = reference.token_mask(pattern, hq, hkv, later, num_tokens + horizon)[:, :, :num_tokens]  # [Hq, Lq, keys]
        read = mask.any(1).view(hkv, qpk, num_tokens).any(1)                                          # [Hkv, keys]
        padded = torch.zeros(hkv, pages * kv_block_size, dtype=torch.bool)
        padded[:, :num_tokens] = read
        want = padded.view(hkv, pages, kv_block_size).any(-1)
        want[:, -1] |= pages * kv_block_size > num_tokens  # the page being filled stays
        assert torch.equal(keep, want), f"{pattern} Hq={hq} Hkv={hkv} kvbs={kv_block_size} n={num_tokens}"


def test_phi3_small_frees_about_half_at_long_lengths():
    """Phi-3-small (V = 8, 4 q heads per kv head sliding by one block): each kv head keeps the band and
    4 of every 8 older blocks; with homo_head one of 8."""
    n = 131072
    keep = SparsePattern.phi3_small(32).pages_read_later(32, 8, n, 16)
    assert abs(keep.float().mean().item() - 0.5) < 0.01
    homo = SparsePattern(64, 16, 8, 0).pages_read_later(32, 8, n, 16)
    assert abs(homo.float().mean().item() - 1 / 8) < 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        SparsePattern().pages_read_later(8, 3, 100, 16)
    with pytest.raises(ValueError, match="kv_block_size"):
        SparsePattern().pages_read_later(8, 2, 100, 0)


def _printed_fractions(text: str) -> dict[int, list[float]]:
    """The retention command's table: length -> kept fraction per pattern column."""
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    return {int(r[0]): [float(f.rstrip("%")) / 100 for f in r[1:]] for r in rows}


def test_retention_command_prints_the_rules_fractions(capsys):
    """`python -m blocksparse_attn retention --out ''` prints, for the flags' layer and its homo_head
    variant, the fraction of written pages that pages_read_later keeps, without needing matplotlib."""
    from blocksparse_attn.__main__ import main

    assert main(["retention", "--seq-len", "3000", "--max-len", "16384", "--kv-block-size", "16", "--out", ""]) == 0
    table = _printed_fractions(capsys.readouterr().out)
    assert sorted(table) == [1024, 2048, 3000, 4096, 8192, 16384]
    sliding, homo = SparsePattern.phi3_small(32), SparsePattern(64, 16, 8, 0)
    for n, printed in table.items():
        want = [p.pages_read_later(32, 8, n, 16).float().mean().item() for p in (sliding, homo)]
        assert printed == pytest.approx(want, abs=5e-5), f"length {n}: printed {printed}, rule {want}"


def test_retention_command_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from blocksparse_attn.__main__ import main

    out = tmp_path / "retention.png"
    args = ["retention", "--seq-len", "1024", "--max-len", "4096", "--kv-block-size", "32", "--kv-heads", "0,3",
            "--homo-head-group", "--out", str(out)]
    assert main(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "homo_head_group" in capsys.readouterr().out
