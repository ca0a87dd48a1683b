"""The engine's KV-cache memory: pools of pages, a sequence's page table in each, and the release rule.

Two layouts (`Engine(kv_layout=...)`, docs/serving.md):
  shared       one pool for every layer: a page (vLLM's block) holds kvbs tokens of all the rank's kv heads,
               a sequence has one row of page ids, as in vLLM.
  per-kv-head  one pool per group of layers with the same sparsity pattern: a page holds kvbs tokens of ONE
               kv head, a sequence has a row per kv head, and a page that no later query of its kv head reads
               (SparsePattern.pages_read_later) goes back to its pool after the step that made it so; its
               table entry becomes -1 (the kernels never read it).
Both get the same bytes from the same --num-blocks. Per-kv-head, the bytes are split between the groups
in proportion to their layers x the fraction of pages their rule keeps at the longest request: a group
that frees half its pages gets half the memory per layer of a dense one (`make_pools`).

Tensor parallelism: each rank keeps its own kv heads' pages, and its heads read other columns, so the
ranks free different numbers of pages. The scheduler must decide alike on every rank, so a pool counts
against each sequence its *charge*: the pages it holds on the rank that holds the most (an all-reduce
after each step's releases); on one rank the charge is simply the pages held.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from blocksparse_attn import BlocksparseFlashAttentionBackend as Backend
from blocksparse_attn.layout import SparsePattern

KV_LAYOUTS = ("shared", "per-kv-head")


def page_bytes(model, kv_block_size: int, heads_per_page: int) -> int:
    """Bytes of one page of one layer (K and V): kvbs tokens of heads_per_page kv heads."""
    elem = torch.empty(0, dtype=model.cache_dtype).element_size()
    return 2 * kv_block_size * heads_per_page * model.cfg.head_dim * elem


def all_ranks_max(model, values: list[float]) -> list[float]:
    """The elementwise maximum of `values` over the model's tensor-parallel ranks (itself on one rank)."""
    if model.tp_size == 1 or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=model.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=model.group)
    return t.tolist()


class PageSpace:
    """Page ids handed out from a free list (in a seeded shuffled order, so tables are not contiguous, as
    in a long-running engine), and the pages charged to the sequences living here. The scheduler reads
    num_free (pages not charged); the free list is at least that long."""

    def __init__(self, num_pages: int, seed: int):
        self.num_pages = num_pages
        self.free = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
        self.charged = 0

    @property
    def num_free(self) -> int:
        return self.num_pages - self.charged

    @property
    def in_use(self) -> int:
        return self.num_pages - len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"out of KV-cache pages: {n} wanted, {len(self.free)} free")
        pages, self.free = self.free[:n], self.free[n:]
        return pages


@dataclass(eq=False)
class PageTable:
    """A sequence's pages in one pool: rows[g][i] holds tokens i*kvbs ... of kv head g (one row, all heads,
    in the shared layout), -1 once released. Page ids change only by swapping, which makes a new table:
    whoever kept the old one (the decoder's host tables) can tell by identity."""

    rows: list[list[int]]
    live: int = 0                # entries >= 0
    charge: int = 0              # pages the pool counts against the sequence (module docstring)
    released_for: int = 0        # the sequence length whose unread pages have been released
    # (row, page index) of every entry set to -1, in order: the decoder's host tables replay them
    released: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_pages(self) -> int:
        """Logical pages per row: the tokens they cover, in units of kvbs."""
        return len(self.rows[0])


class PageReleaser:
    """Which pages of a sequence no later query of each kv head reads: SparsePattern.pages_read_later's
    rule, computed incrementally as the sequence grows.

    A complete page stops being read once its last sparse block leaves the local band (the current query
    block is local_blocks past it), unless one of its blocks is a vertical column of a head of the kv
    group. The band moves only when the length crosses a sparse-block boundary, so a step looks only at
    the pages whose last block just left it, never at the whole 8192-page row of a 128k sequence. Columns
    repeat every vert_stride blocks, so whether a page holds one is periodic in the page index."""

    def __init__(self, pattern: SparsePattern, num_heads: int, num_kv_heads: int, kv_block_size: int):
        self.block, self.local, self.kvbs = pattern.block_size, pattern.local_blocks, kv_block_size
        self.num_kv_heads = num_kv_heads
        v, b = pattern.vert_stride, pattern.block_size
        off = pattern.vertical_offsets(num_heads, num_kv_heads).view(num_kv_heads, -1)
        # key block j is a column of group g iff (j + off(h)) % v == 0 for one of its heads h
        column = torch.zeros(num_kv_heads, v, dtype=torch.bool)
        for g in range(num_kv_heads):
            column[g, (-off[g]) % v] = True
        self.period = v * b // math.gcd(v * b, kv_block_size)  # pages, after which the column residues repeat
        # bool [num_kv_heads, period]: page p holds a column of group g iff holds_column[g, p % period]
        blocks = [torch.arange(self._first_block(p), self._last_block(p) + 1) for p in range(self.period)]
        self.holds_column = torch.stack([column[:, j % v].any(1) for j in blocks], dim=1)
        self._holds = self.holds_column.tolist()  # the same as lists, for the per-step walk

    @property
    def releases(self) -> bool:
        """False where every page holds a column (dense layers: vert_stride 1), so nothing is ever released."""
        return not bool(self.holds_column.all())

    def _first_block(self, page: int) -> int:
        return page * self.kvbs // self.block

    def _last_block(self, page: int) -> int:
        return ((page + 1) * self.kvbs - 1) // self.block

    def unread_between(self, before: int, after: int) -> list[tuple[int, int]]:
        """(kv head, page) of every page that a sequence of `before` tokens still reads and one of `after`
        (>= before) tokens no longer does."""
        b, kvbs = self.block, self.kvbs
        lo = max(before // b - self.local + 1, 0)  # blocks lo .. hi leave the band
        hi = after // b - self.local
        if hi < lo:
            return []
        first = -(-(lo * b + 1) // kvbs) - 1      # the first page whose last block is >= lo
        end = -(-((hi + 1) * b + 1) // kvbs) - 1  # the first page whose last block is > hi
        return [(g, p) for p in range(first, end) for g in range(self.num_kv_heads)
                if not self._holds[g][p % self.period]]

    def release_lengths(self, num_pages: int) -> torch.Tensor:
        """int64 [num_kv_heads, num_pages]: the sequence length from which each page is no longer read
        (its last block local_blocks blocks behind the current one); pages holding a column never are."""
        pages = torch.arange(num_pages)
        when = ((((pages + 1) * self.kvbs - 1) // self.block) + self.local) * self.block
        return torch.where(self.holds_column[:, pages % self.period], torch.iinfo(torch.int64).max, when.view(1, -1))


class KVPool:
    """Pages for some layers: each layer's device cache [2, num_pages, kvbs * heads_per_page * D], the
    device and CPU swap page spaces, and (per-kv-head pages of a sparse pattern) the release rule."""

    def __init__(self, name: str, model, layers: list[int], num_pages: int, swap_pages: int, kv_block_size: int,
                 per_kv_head: bool, releaser: PageReleaser | None, kept_fraction: float, seed: int):
        self.name, self.layers, self.kvbs = name, layers, kv_block_size
        self.per_kv_head = per_kv_head
        self.rows = model.hkv if per_kv_head else 1  # table rows per sequence
        heads_per_page = 1 if per_kv_head else model.hkv
        self.page_bytes = page_bytes(model, kv_block_size, heads_per_page)
        self.releaser = releaser
        self.kept_fraction = kept_fraction
        shape = Backend.get_kv_cache_shape(num_pages, kv_block_size, heads_per_page, model.cfg.head_dim)
        self.caches = [torch.zeros(shape, dtype=model.cache_dtype, device=model.device) for _ in layers]
        self.device = PageSpace(num_pages, seed)
        self.host = PageSpace(swap_pages, seed + 1)
        self.cpu_caches: list[torch.Tensor] | None = None  # the swap space, allocated on first use
        # Pages kept free when admitting a request while others run (vLLM's 1 % watermark), so an admission
        # does not at once force the running sequences' next pages into preemptions.
        self.watermark = num_pages // 100
        self.peak_in_use = 0  # the most device pages held at once (this rank), reset by Engine.run

    @property
    def num_pages(self) -> int:
        return self.device.num_pages

    @property
    def all_free(self) -> bool:
        """Nothing held or charged, on the device or in the swap space."""
        return all(len(s.free) == s.num_pages and s.charged == 0 for s in (self.device, self.host))

    def new_table(self) -> PageTable:
        return PageTable([[] for _ in range(self.rows)])

    def table_arg(self, table: PageTable) -> list:
        """The table as Metadata.build takes it: a row per kv head, or the one row of shared pages."""
        return table.rows if self.per_kv_head else table.rows[0]

    def pages_for(self, num_tokens: int) -> int:
        return self.rows * -(-num_tokens // self.kvbs)

    def pages_to_grow(self, table: PageTable, num_tokens: int) -> int:
        return max(self.pages_for(num_tokens) - self.rows * table.num_pages, 0)

    def peak_pages_alone(self, num_tokens: int, chunk_size: int) -> int:
        """The most pages one sequence whose cache reaches num_tokens tokens ever holds, scheduled alone or
        not: a step from c cached tokens adds at most chunk_size tokens' pages to the pages not released
        at length c. (A request whose peak fits can always run, alone if it must.)"""
        if num_tokens <= 0:
            return 0
        c = torch.arange(num_tokens)
        held = self.rows * (-(-torch.clamp(c + chunk_size, max=num_tokens) // self.kvbs))
        if self.releaser is not None:
            lengths = self.releaser.release_lengths(-(-num_tokens // self.kvbs)).flatten().sort().values
            held = held - torch.searchsorted(lengths, c, right=True)
        return int(held.max())

    def grow(self, table: PageTable, num_tokens: int) -> None:
        """New pages at the end of every row, to cover num_tokens tokens."""
        n = self.pages_to_grow(table, num_tokens) // self.rows
        if n == 0:
            return
        pages = self.device.allocate(n * self.rows)
        for g, row in enumerate(table.rows):
            row += pages[g * n: (g + 1) * n]
        table.live += n * self.rows
        self._charge(self.device, table, table.charge + n * self.rows)

    def release_unread(self, table: PageTable, num_tokens: int) -> int:
        """Frees the pages that the sequence, now num_tokens long, no longer reads; returns how many. Its
        charge is left to settle() (on one rank: the pages it still holds)."""
        unread = self.releaser.unread_between(table.released_for, num_tokens)
        table.released_for = num_tokens
        freed = []
        for g, p in unread:
            page = table.rows[g][p]
            if page >= 0:
                freed.append(page)
                table.rows[g][p] = -1
                table.released.append((g, p))
        self.device.free += freed
        table.live -= len(freed)
        return len(freed)

    def settle(self, table: PageTable, charge: int) -> None:
        self._charge(self.device, table, charge)

    def drop(self, table: PageTable) -> None:
        """Frees every device page of a resident table (a finished or recomputed sequence)."""
        self.device.free += [p for row in table.rows for p in row if p >= 0]
        self.device.charged -= table.charge

    def swap_out(self, table: PageTable) -> PageTable:
        """Copies the table's live pages, every layer's, to CPU pages; returns the table over those. The
        caller has checked that the swap space has room for its charge."""
        if self.cpu_caches is None:
            pin = self.caches[0].device.type == "cuda"
            self.cpu_caches = [torch.zeros((c.shape[0], self.host.num_pages, *c.shape[2:]), dtype=c.dtype,
                                           pin_memory=pin) for c in self.caches]
        return self._move(table, self.device, self.host, self.caches, self.cpu_caches)

    def swap_in(self, table: PageTable) -> PageTable:
        """The reverse of swap_out, into newly allocated device pages."""
        return self._move(table, self.host, self.device, self.cpu_caches, self.caches)

    def _move(self, table: PageTable, source: PageSpace, to: PageSpace, src: list[torch.Tensor],
              dst: list[torch.Tensor]) -> PageTable:
        old = [p for row in table.rows for p in row if p >= 0]
        new = iter(to.allocate(len(old)))
        rows = [[next(new) if p >= 0 else -1 for p in row] for row in table.rows]  # released entries stay -1
        mapping = torch.tensor([(a, b) for r0, r1 in zip(table.rows, rows) for a, b in zip(r0, r1) if a >= 0],
                               dtype=torch.int64).view(-1, 2)
        for s, d in zip(src, dst):
            Backend.swap_blocks(s, d, mapping)
        source.free += old
        source.charged -= table.charge
        moved = PageTable(rows, live=table.live, released_for=table.released_for)
        self._charge(to, moved, table.charge)
        return moved

    @staticmethod
    def _charge(space: PageSpace, table: PageTable, charge: int) -> None:
        space.charged += charge - table.charge
        table.charge = charge

    def describe(self) -> dict:
        """The RESULT line's entry of this pool."""
        return dict(name=self.name, layers=self.layers, pages=self.num_pages, page_bytes=self.page_bytes,
                    kept_fraction=self.kept_fraction, swap_pages=self.host.num_pages, peak_pages=self.peak_in_use)


def make_pools(model, kv_layout: str, num_blocks: int, swap_blocks: int, kv_block_size: int, longest: int,
               seed: int) -> list[KVPool]:
    """The pools of a layout, with the shared layout's bytes: num_blocks blocks (swap_blocks in the swap
    space) of every layer and all the rank's kv heads. Per-kv-head, group g (its layers n_g, f_g the mean
    of its pages_read_later at `longest` tokens, 1 for a dense group) gets the share n_g f_g / sum(n f) of
    those bytes: P_g = num_blocks x layers x Hkv x f_g / sum(n f) one-head pages."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    num_layers = model.cfg.num_layers
    if kv_layout == "shared":
        return [KVPool("shared", model, list(range(num_layers)), num_blocks, swap_blocks, kv_block_size, False,
                       None, 1.0, seed)]
    groups: dict[SparsePattern, list[int]] = {}
    for layer, impl in enumerate(model.impls):
        groups.setdefault(impl.pattern, []).append(layer)
    releasers = [PageReleaser(p, model.hq, model.hkv, kv_block_size) for p in groups]
    kept = [float(p.pages_read_later(model.hq, model.hkv, longest, kv_block_size).float().mean()) if r.releases
            else 1.0 for p, r in zip(groups, releasers)]
    kept = all_ranks_max(model, kept)  # every rank sizes its pools alike (module docstring)
    weight = sum(len(layers) * f for layers, f in zip(groups.values(), kept))
    names = ["dense" if p.vert_stride == 1 else "sparse" for p in groups]
    pools = []
    for i, ((pattern, layers), releaser, f) in enumerate(zip(groups.items(), releasers, kept)):
        name = names[i] if names.count(names[i]) == 1 else f"{names[i]}{names[:i].count(names[i])}"
        share = num_layers * model.hkv * f / weight
        pools.append(KVPool(name, model, layers, int(num_blocks * share), int(swap_blocks * share), kv_block_size,
                            True, releaser if releaser.releases else None, f, seed + 2 * i))
    return pools
