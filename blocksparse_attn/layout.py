"""The sparsity pattern as an object: parameters, dense block mask, CSR layout, density, picture.

`SparsePattern` is the parametric Phi-3-small pattern (spec §2); `BlockLayout` is an explicit per-head
CSR block layout. Both are accepted by every attention op in `blocksparse_attn.ops`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .supported import SPARSE_BLOCK_SIZES as SUPPORTED_BLOCK_SIZES


@dataclass(frozen=True)
class SparsePattern:
    """Key block j is visible to query block i of q head h iff j <= i and
    (i - j < local_blocks or (j + off(h)) % vert_stride == 0), with
    off(h) = (head_offset + h) * head_sliding_step + 1, or with the kv-head index in place of the
    q-head index when slide_by_kv_head (vLLM's homo_head_group). Token-causal inside the diagonal.
    """

    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    head_sliding_step: int = 1
    slide_by_kv_head: bool = False
    head_offset: int = 0

    def __post_init__(self):
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {self.block_size}")
        if self.local_blocks < 1:
            raise ValueError(f"local_blocks must be >= 1, got {self.local_blocks}")
        if self.vert_stride < 1:
            raise ValueError(f"vert_stride must be >= 1, got {self.vert_stride}")
        if self.head_sliding_step < 0:
            raise ValueError(f"head_sliding_step must be >= 0, got {self.head_sliding_step}")
        if self.head_offset < 0:
            raise ValueError(f"head_offset must be >= 0, got {self.head_offset}")

    @classmethod
    def phi3_small(cls, num_heads: int = 32, tp_size: int = 1, tp_rank: int = 0) -> "SparsePattern":
        """Phi-3-small's attention pattern (B = 64, L = 16, V = 8) for `num_heads` q heads per rank."""
        vert_stride = 8
        step = max(1, vert_stride // (num_heads * tp_size))
        return cls(64, 16, vert_stride, step, False, tp_rank * num_heads)

    def vertical_offsets(self, num_heads: int, num_kv_heads: int | None = None) -> torch.Tensor:
        """off(h) for the local q heads 0..num_heads-1, as an int64 tensor [num_heads]."""
        heads = torch.arange(num_heads) + self.head_offset
        if self.slide_by_kv_head:
            if num_kv_heads is None or num_heads % num_kv_heads:
                raise ValueError("slide_by_kv_head needs num_kv_heads dividing num_heads")
            heads = heads // (num_heads // num_kv_heads)
        return heads * self.head_sliding_step + 1

    def block_mask(self, num_heads: int, num_q_blocks: int, num_kv_heads: int | None = None) -> torch.Tensor:
        """Dense bool [num_heads, num_q_blocks, num_q_blocks]: True where key block j is visible to i."""
        i = torch.arange(num_q_blocks).view(1, -1, 1)
        j = torch.arange(num_q_blocks).view(1, 1, -1)
        off = self.vertical_offsets(num_heads, num_kv_heads).view(-1, 1, 1)
        return (j <= i) & ((i - j < self.local_blocks) | ((j + off) % self.vert_stride == 0))

    def pages_read_later(self, num_heads: int, num_kv_heads: int, num_tokens: int, kv_block_size: int,
                         num_pages: int | None = None) -> torch.Tensor:
        """Bool [num_kv_heads, num_pages]: will some query at a position >= num_tokens, of a q head of kv
        group g, read a key of page p (tokens p * kvbs ... (p + 1) * kvbs - 1) of this sequence?

        The rule (sparsity-aware KV memory, issue 17): key block j is read later iff it is still in the
        band of the current query block i0 = num_tokens // B (j > i0 - local_blocks; later query blocks
        only move the band away), or it is a vertical column of one of the group's heads
        ((j + off(h)) % vert_stride == 0, which every later query block sees). A page is read later iff
        one of its sparse blocks is; pages at or past num_tokens are being filled and always kept.
        Everything else can be freed for this kv head and is never read again."""
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must be >= 1 and divide num_heads ({num_heads})")
        if num_tokens < 0 or kv_block_size < 1:
            raise ValueError(f"num_tokens must be >= 0 and kv_block_size >= 1, got {num_tokens}, {kv_block_size}")
        num_pages = -(-num_tokens // kv_block_size) if num_pages is None else num_pages
        if num_pages == 0:
            return torch.zeros(num_kv_heads, 0, dtype=torch.bool)
        b = self.block_size
        current = num_tokens // b
        # the sparse blocks each page touches: [first, last]
        first = torch.arange(num_pages) * kv_block_size // b
        last = ((torch.arange(num_pages) + 1) * kv_block_size - 1) // b
        blocks = torch.arange(int(last.max()) + 1 if num_pages else 0)
        off = self.vertical_offsets(num_heads, num_kv_heads).view(num_kv_heads, -1, 1)  # [Hkv, q per kv, 1]
        vertical = ((blocks.view(1, 1, -1) + off) % self.vert_stride == 0).any(1)      # [Hkv, blocks]
        kept_block = vertical | (blocks > current - self.local_blocks).view(1, -1)
        in_page = (blocks.view(1, -1) >= first.view(-1, 1)) & (blocks.view(1, -1) <= last.view(-1, 1))  # [pages, blocks]
        kept = (kept_block.view(num_kv_heads, 1, -1) & in_page.view(1, num_pages, -1)).any(-1)
        filling = (torch.arange(num_pages) + 1) * kv_block_size > num_tokens
        return kept | filling.view(1, -1)

    def to_layout(self, num_heads: int, max_seqlen: int, num_kv_heads: int | None = None) -> "BlockLayout":
        """The same pattern as an explicit CSR layout covering sequences of up to max_seqlen tokens."""
        num_q_blocks = -(-max_seqlen // self.block_size)
        return BlockLayout.from_block_mask(self.block_mask(num_heads, num_q_blocks, num_kv_heads), self.block_size)

    def op_args(self) -> tuple:
        """The attention ops' sparsity arguments (csrc/ops.cpp): the `pattern` ints in the order of
        csrc/common/pattern.h's PatternArgs, then the explicit layout's tensors (none here)."""
        return ([self.block_size, self.local_blocks, self.vert_stride, self.head_sliding_step,
                 int(self.slide_by_kv_head), self.head_offset], None, None)


@dataclass(frozen=True)
class BlockLayout:
    """An explicit block-sparse layout: per q head, CSR rows of visible key blocks.

    crow: int32 [num_heads, num_q_blocks + 1] row pointers; col: int32 [num_heads, max_nnz] ascending
    key blocks of each row (entries past a head's last row pointer are padding). Key blocks above the
    diagonal are rejected; the diagonal block, where present, is cut token-causally.
    """

    block_size: int
    crow: torch.Tensor
    col: torch.Tensor

    def __post_init__(self):
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {self.block_size}")
        if self.crow.dim() != 2 or self.col.dim() != 2 or self.crow.shape[0] != self.col.shape[0]:
            raise ValueError(f"crow must be [H, num_q_blocks + 1] and col [H, max_nnz], got "
                             f"{tuple(self.crow.shape)} and {tuple(self.col.shape)}")

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_size: int) -> "BlockLayout":
        """From a dense bool [H, num_q_blocks, num_k_blocks] mask (only j <= i may be set)."""
        if block_mask.dim() != 3:
            raise ValueError(f"block_mask must be [H, num_q_blocks, num_k_blocks], got {tuple(block_mask.shape)}")
        block_mask = block_mask.bool().cpu()
        num_heads, num_q_blocks, num_k_blocks = block_mask.shape
        above = torch.ones(num_q_blocks, num_k_blocks, dtype=torch.bool).triu(1)
        if (block_mask & above).any():
            raise ValueError("block_mask has key blocks above the diagonal; they can never be visible")
        counts = block_mask.sum(-1)
        crow = torch.zeros(num_heads, num_q_blocks + 1, dtype=torch.int32)
        crow[:, 1:] = counts.cumsum(-1)
        max_nnz = max(int(crow[:, -1].max()), 1)
        col = torch.zeros(num_heads, max_nnz, dtype=torch.int32)
        for h in range(num_heads):
            cols = block_mask[h].nonzero()[:, 1].to(torch.int32)  # row-major, so ascending per row
            col[h, : cols.numel()] = cols
        return cls(block_size, crow, col)

    @property
    def num_heads(self) -> int:
        return self.crow.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.crow.shape[1] - 1

    def to(self, device) -> "BlockLayout":
        return BlockLayout(self.block_size, self.crow.to(device), self.col.to(device))

    def block_mask(self, num_heads: int | None = None, num_q_blocks: int | None = None,
                   num_kv_heads: int | None = None) -> torch.Tensor:
        """Dense bool [H, n, n] with n = num_q_blocks (default: all the layout's rows)."""
        n = self.num_q_blocks if num_q_blocks is None else num_q_blocks
        if n > self.num_q_blocks:
            raise ValueError(f"the layout has {self.num_q_blocks} query blocks, {n} were asked for")
        crow, col = self.crow.cpu().long(), self.col.cpu().long()
        mask = torch.zeros(self.num_heads, n, max(n, 1), dtype=torch.bool)
        for h in range(self.num_heads):
            for i in range(n):
                mask[h, i, col[h, crow[h, i]: crow[h, i + 1]]] = True
        return mask[:, :, :n]

    def op_args(self) -> tuple:
        """The attention ops' sparsity arguments: L = V = 0 in the `pattern` ints (the layout alone
        decides visibility), then the CSR tensors."""
        return ([self.block_size, 0, 0, 0, 0, 0], self.crow, self.col)


Pattern = SparsePattern | BlockLayout


def attended_pairs(block_mask: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Attended (query, key) token pairs per head of one sequence of seq_len tokens: int64 [H].
    Full blocks count B*B pairs, the diagonal block B*(B+1)/2, and the last partial block its rows."""
    num_blocks = -(-seq_len // block_size)
    mask = block_mask[:, :num_blocks, :num_blocks].long()
    rows = torch.full((num_blocks,), block_size, dtype=torch.long)
    rows[-1] = seq_len - (num_blocks - 1) * block_size
    i = torch.arange(num_blocks)
    full = mask * rows.view(1, -1, 1) * rows.view(1, 1, -1)  # key block j has rows[j] keys
    diag = mask[:, i, i] * (rows * (rows + 1) // 2)
    return full.sum((1, 2)) - (mask[:, i, i] * rows * rows).sum(-1) + diag.sum(-1)


def density(pattern: Pattern, num_heads: int, seq_len: int, num_kv_heads: int | None = None) -> dict:
    """Block density (visible / causal blocks) and attended fraction of causal (q, k) token pairs,
    per head and overall, for one sequence of seq_len tokens."""
    b = pattern.block_size
    n = -(-seq_len // b)
    mask = pattern.block_mask(num_heads, n, num_kv_heads)
    causal_blocks = n * (n + 1) // 2
    pairs = attended_pairs(mask, seq_len, b)
    causal_pairs = seq_len * (seq_len + 1) // 2
    block_density = mask.sum((1, 2)).double() / causal_blocks
    pair_fraction = pairs.double() / causal_pairs
    return {
        "block_density_per_head": block_density,
        "pair_fraction_per_head": pair_fraction,
        "block_density": float(block_density.mean()),
        "pair_fraction": float(pair_fraction.mean()),
        "attended_pairs": int(pairs.sum()),
    }


def draw(pattern: Pattern, num_heads: int, seq_len: int, out_path: str, heads=(0, 1, 2, 3),
         num_kv_heads: int | None = None) -> None:
    """Draws the block mask of a few heads side by side into out_path (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = -(-seq_len // pattern.block_size)
    mask = pattern.block_mask(num_heads, n, num_kv_heads)
    heads = [h for h in heads if h < num_heads]
    fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.4), squeeze=False)
    for ax, h in zip(axes[0], heads):
        ax.imshow(mask[h].numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1.3)
        frac = float(mask[h].sum()) / (n * (n + 1) // 2)
        ax.set_title(f"head {h}: {frac:.0%} of causal blocks", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(f"{type(pattern).__name__}, {seq_len} tokens, block {pattern.block_size}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def draw_retention(patterns: dict, num_heads: int, num_kv_heads: int, seq_len: int, kv_block_size: int,
                   out_path: str, kv_heads=(0, 1, 2), curve_max_len: int = 131072, curve_points: int = 34) -> None:
    """Draws which pages each kv head keeps (SparsePattern.pages_read_later) as a sequence grows, into
    out_path (needs matplotlib). `patterns` maps a row label to a SparsePattern.

    One row per pattern: for each kv head in kv_heads, an image with x = the sequence's length (sampled
    at every page boundary up to seq_len) and y = page index, coloured kept / released / not yet
    written. Below, the fraction of written pages kept (all kv heads) against length, at curve_points
    lengths spaced evenly on a log scale from half the first pattern's local band (where everything is
    still kept) up to curve_max_len: the rule costs one call per length, so a few dozen points keep the
    picture to a few seconds even at 128k tokens.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    kv_heads = [g for g in kv_heads if 0 <= g < num_kv_heads]
    q_per_kv = num_heads // num_kv_heads
    num_pages = -(-seq_len // kv_block_size)
    lengths = torch.arange(1, num_pages + 1) * kv_block_size
    lengths[-1] = seq_len
    not_written, released, kept = 0, 1, 2
    colours = ListedColormap(["white", "#f3c9a6", "#2b6cb0"])

    rows, cols = len(patterns), max(len(kv_heads), 1)
    fig = plt.figure(figsize=(3.3 * cols, 3.6 * rows + 3.2))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.0] * rows + [1.05])
    for r, (label, pattern) in enumerate(patterns.items()):
        # state[g, page, column]: the page's fate once the sequence holds lengths[column] tokens
        state = torch.full((num_kv_heads, num_pages, num_pages), not_written, dtype=torch.uint8)
        for c, n in enumerate(lengths.tolist()):
            written = -(-n // kv_block_size)
            keep = pattern.pages_read_later(num_heads, num_kv_heads, n, kv_block_size)
            state[:, :written, c] = torch.where(keep, kept, released).to(torch.uint8)
        for c, g in enumerate(kv_heads):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(state[g].numpy(), cmap=colours, vmin=0, vmax=2, origin="lower", aspect="auto",
                      interpolation="nearest", extent=(0, seq_len, 0, num_pages))
            final = float((state[g, :, -1] == kept).float().mean())
            ax.set_title(f"{label}\nkv head {g} (q heads {g * q_per_kv}-{(g + 1) * q_per_kv - 1}): "
                         f"keeps {final:.0%} at {seq_len}", fontsize=8)
            ax.set_xlabel("sequence length (tokens)", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel(f"page ({kv_block_size} tokens)", fontsize=8)

    ax = fig.add_subplot(grid[rows, :])
    first = next(iter(patterns.values()))
    start = min(first.block_size * first.local_blocks // 2, curve_max_len)
    curve = torch.logspace(torch.log2(torch.tensor(float(start))), torch.log2(torch.tensor(float(curve_max_len))),
                           curve_points, base=2).round().long().unique().tolist()
    for label, pattern in patterns.items():
        fractions = [float(pattern.pages_read_later(num_heads, num_kv_heads, n, kv_block_size).float().mean())
                     for n in curve]
        line, = ax.plot(curve, fractions, marker=".", label=label)
        ax.annotate(f"{fractions[-1]:.1%}", (curve[-1], fractions[-1]), textcoords="offset points",
                    xytext=(4, 0), va="center", fontsize=8, color=line.get_color())
    ax.axvline(seq_len, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("sequence length (tokens)", fontsize=8)
    ax.set_ylabel(f"fraction of pages kept\n(all {num_kv_heads} kv heads)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")

    fig.legend(handles=[Patch(color=colours(kept), label="kept (read later)"),
                        Patch(color=colours(released), label="released (never read again)"),
                        Patch(facecolor="white", edgecolor="grey", label="not yet written")],
               loc="upper center", bbox_to_anchor=(0.5, 0.97), ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Pages kept per kv head, kv block {kv_block_size}, {num_heads} q / {num_kv_heads} kv heads "
                 f"(dotted line: the images' {seq_len} tokens)", fontsize=10, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
