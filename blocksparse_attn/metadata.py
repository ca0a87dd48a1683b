"""Per-batch metadata in vLLM's shape, and the sparsity parameters of one attention layer.

`BlocksparseFlashAttentionMetadata` is built once per batch (by an engine, or by `build` from plain
lists) and read by every layer's `forward`; `BlocksparseParams` is fixed per layer. Batch layout
(spec §4): every prefill sequence's new tokens in order, then one token per decode sequence, then
possibly padding rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from .layout import SUPPORTED_BLOCK_SIZES, SparsePattern
from .parallel import resolve_tensor_parallel


@dataclass
class BlocksparseParams:
    """Phi-3-small-style sparsity of one attention layer, with vLLM's field names and conventions.

    num_heads / num_kv_heads are the counts on this tensor-parallel rank; the pattern is defined over
    global heads (rank tp_rank holds global q heads tp_rank * num_heads ... + num_heads - 1).
    tp_size / tp_rank left None are taken from vLLM's tensor-parallel group when it is initialized; a
    single process is tp 1 / rank 0; with several torch.distributed processes and no vLLM group they
    must be given (see parallel.py).
    Derived:
      head_sliding_step  vLLM's encoding: 0 for homo_head; -max(1, int(V / total_kv_heads)) for
                         homo_head_group (negative = slide along kv heads); max(1, int(V / total_heads))
                         otherwise, with total_* = tp_size * per-rank count.
      active_head_range  (first, last + 1) global q head of this rank.
    """

    max_seqlen: int
    num_heads: int
    num_kv_heads: int
    block_size: int
    local_blocks: int
    vert_stride: int
    homo_head: bool = False
    homo_head_group: bool = False
    tp_size: int | None = None
    tp_rank: int | None = None
    head_sliding_step: int = field(init=False)
    active_head_range: tuple[int, int] = field(init=False)

    def __post_init__(self):
        if self.max_seqlen < 1:
            raise ValueError(f"max_seqlen must be >= 1, got {self.max_seqlen}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size (the sparse block size) must be one of {SUPPORTED_BLOCK_SIZES}, "
                             f"got {self.block_size}")
        if self.local_blocks < 1:
            raise ValueError(f"local_blocks must be >= 1, got {self.local_blocks}")
        if self.vert_stride < 1:
            raise ValueError(f"vert_stride must be >= 1, got {self.vert_stride}")
        if self.num_heads < 1 or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must be >= 1 and divide num_heads "
                             f"({self.num_heads})")
        self.tp_size, self.tp_rank = resolve_tensor_parallel(self.tp_size, self.tp_rank)
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must lie in [0, tp_size) and tp_size >= 1, got tp_rank={self.tp_rank}, "
                             f"tp_size={self.tp_size}")
        if self.homo_head and self.homo_head_group:
            raise ValueError("homo_head and homo_head_group are exclusive; got both set")
        total_heads = self.tp_size * self.num_heads
        total_kv_heads = self.tp_size * self.num_kv_heads
        # int(a / b), not a // b: vLLM truncates a float quotient; equal for the positive values here.
        if self.homo_head:
            self.head_sliding_step = 0
        elif self.homo_head_group:
            self.head_sliding_step = -max(1, int(self.vert_stride / total_kv_heads))
        else:
            self.head_sliding_step = max(1, int(self.vert_stride / total_heads))
        self.active_head_range = (self.tp_rank * self.num_heads, (self.tp_rank + 1) * self.num_heads)

    @property
    def pattern(self) -> SparsePattern:
        """The same sparsity as the ops' SparsePattern (non-negative step plus a slide_by_kv_head flag)."""
        return SparsePattern(self.block_size, self.local_blocks, self.vert_stride, abs(self.head_sliding_step),
                             slide_by_kv_head=self.homo_head_group, head_offset=self.tp_rank * self.num_heads)


@dataclass
class BlocksparseFlashAttentionMetadata:
    """One batch, vLLM's field names (construct by keyword). S sequences, the first num_prefills of them
    prefills, the rest decodes; N = num_prefill_tokens + num_decode_tokens real tokens.

    slot_mapping         int64 [>= N] cache slot of each token (block * kvbs + offset); -1 = don't write;
                         [>= N, Hkv] with per-kv-head pages (slot of each token's kv head h)
    seq_lens             host list[int] [S] context + new tokens, or None (decode-only CUDA-graph batches)
    seq_lens_tensor      int32 [S] the same on the device (0 marks a padding decode row)
    max_query_len        longest query of the batch (host int)
    max_prefill_seq_len  longest prefill sequence, 0 without prefills (host int)
    max_decode_seq_len   longest decode sequence, 0 without decodes (host int)
    query_start_loc      int32 [S + 1] (or at least [num_prefills + 1]) cumulative query lengths
    seq_start_loc        int32 [S + 1] cumulative seq lengths
    context_lens_tensor  int32 [S] tokens already in the cache
    block_tables         int32 [S, max_blocks] physical cache block of each logical block; an empty
                         tensor (or None) when no sequence has cached context: prefill then attends over
                         the new tokens' contiguous k/v instead of reading them back from the cache.
                         Per-kv-head pages: [S, Hkv, max_blocks], -1 for a page released because no
                         later query reads it (SparsePattern.pages_read_later)
    use_cuda_graph       the decode part runs inside a captured CUDA graph
    max_decode_query_len longest decode query (host int; vLLM's runners set it; only 1 is supported)

    `prefill_metadata` / `decode_metadata` are views on the prefill / decode part (None when empty),
    computed once and cached; treat the metadata as immutable after the first access.
    """

    num_prefills: int
    num_prefill_tokens: int
    num_decode_tokens: int
    slot_mapping: torch.Tensor
    seq_lens: list[int] | None = None
    seq_lens_tensor: torch.Tensor | None = None
    max_query_len: int | None = None
    max_prefill_seq_len: int = 0
    max_decode_seq_len: int = 0
    query_start_loc: torch.Tensor | None = None
    seq_start_loc: torch.Tensor | None = None
    context_lens_tensor: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    use_cuda_graph: bool = False
    # Accepted because vLLM's base metadata has them; unused here.
    multi_modal_placeholder_index_maps: dict | None = None
    enable_kv_scales_calculation: bool = False
    max_decode_query_len: int | None = None

    _cached_prefill_metadata: BlocksparseFlashAttentionMetadata | None = field(
        default=None, init=False, repr=False, compare=False)
    _cached_decode_metadata: BlocksparseFlashAttentionMetadata | None = field(
        default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("num_prefills", "num_prefill_tokens", "num_decode_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_prefills > 0 and self.num_prefill_tokens == 0:
            raise ValueError(f"num_prefills = {self.num_prefills} but num_prefill_tokens = 0")

    def asdict_zerocopy(self, skip_fields: set[str] | None = None) -> dict:
        """The constructor's fields as a dict without copying tensors (vLLM's runners broadcast it to the
        other workers, which rebuild the metadata with make_metadata(**fields))."""
        skip_fields = skip_fields or set()
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name not in skip_fields}

    @property
    def prefill_metadata(self) -> BlocksparseFlashAttentionMetadata | None:
        """The first num_prefills sequences / num_prefill_tokens tokens, or None without prefills."""
        if self.num_prefills == 0:
            return None
        if self._cached_prefill_metadata is None:
            s, t = self.num_prefills, self.num_prefill_tokens
            self._cached_prefill_metadata = BlocksparseFlashAttentionMetadata(
                num_prefills=s,
                num_prefill_tokens=t,
                num_decode_tokens=0,
                slot_mapping=self.slot_mapping[:t],
                seq_lens=None if self.seq_lens is None else self.seq_lens[:s],
                seq_lens_tensor=_head(self.seq_lens_tensor, s),
                max_query_len=self.max_query_len,
                max_prefill_seq_len=self.max_prefill_seq_len,
                max_decode_seq_len=0,
                query_start_loc=_head(self.query_start_loc, s + 1),
                seq_start_loc=_head(self.seq_start_loc, s + 1),
                context_lens_tensor=_head(self.context_lens_tensor, s),
                block_tables=_head(self.block_tables, s),
                use_cuda_graph=False,
            )
        return self._cached_prefill_metadata

    @property
    def decode_metadata(self) -> BlocksparseFlashAttentionMetadata | None:
        """The sequences after the prefills (one token each), or None without decodes."""
        if self.num_decode_tokens == 0:
            return None
        if self._cached_decode_metadata is None:
            s, t = self.num_prefills, self.num_prefill_tokens
            self._cached_decode_metadata = BlocksparseFlashAttentionMetadata(
                num_prefills=0,
                num_prefill_tokens=0,
                num_decode_tokens=self.num_decode_tokens,
                slot_mapping=self.slot_mapping[t:],
                seq_lens=None if self.seq_lens is None else self.seq_lens[s:],
                seq_lens_tensor=_tail(self.seq_lens_tensor, s),
                max_query_len=None,
                max_prefill_seq_len=0,
                max_decode_seq_len=self.max_decode_seq_len,
                query_start_loc=None,
                seq_start_loc=None,
                context_lens_tensor=None,
                block_tables=_tail(self.block_tables, s),
                use_cuda_graph=self.use_cuda_graph,
                max_decode_query_len=self.max_decode_query_len,
            )
        return self._cached_decode_metadata

    @classmethod
    def build(cls, query_lens: Sequence[int], context_lens: Sequence[int],
              block_tables: Sequence[Sequence[int]] | torch.Tensor, kv_block_size: int, *,
              device: torch.device | str = "cpu") -> BlocksparseFlashAttentionMetadata:
        """Metadata for a batch given as plain lists, for users without an engine.

        Sequence r has context_lens[r] tokens in the cache and query_lens[r] new tokens, and owns the
        physical cache blocks block_tables[r] (a list per sequence or an int [S, max_blocks] tensor),
        which must cover its context_lens[r] + query_lens[r] tokens. Pack the new tokens of the
        sequences in the order given. Per-kv-head pages: block_tables[r] is a list of Hkv lists (or the
        tensor is [S, Hkv, max_blocks]), kv head g's pages, -1 where one was released; slot_mapping is
        then [N, Hkv].

        Decode rule: the trailing run of sequences with query_len == 1 and context_len > 0 are decodes;
        every sequence before them is a prefill (a one-token query with context placed before a
        prefill is answered as a one-token chunked prefill, with the same result). Put decodes last
        to get the decode kernel. When no sequence has context, block_tables is left empty in the
        metadata (the slots still come from it), as vLLM does for prompts without a cached prefix.
        """
        query_lens, context_lens = [int(x) for x in query_lens], [int(x) for x in context_lens]
        num_seqs = len(query_lens)
        if len(context_lens) != num_seqs or len(block_tables) != num_seqs:
            raise ValueError(f"query_lens, context_lens and block_tables must have one entry per sequence, got "
                             f"{num_seqs}, {len(context_lens)} and {len(block_tables)}")
        if kv_block_size < 1:
            raise ValueError(f"kv_block_size must be >= 1, got {kv_block_size}")
        if isinstance(block_tables, torch.Tensor):
            block_tables = block_tables.tolist()
        per_kv_head = num_seqs > 0 and len(block_tables[0]) > 0 and isinstance(block_tables[0][0], (list, tuple))
        # per sequence, a list of rows: [its blocks] (shared pages) or one row per kv head
        tables = [list(seq) if per_kv_head else [seq] for seq in block_tables]
        seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
        for r, (q, c, n, rows) in enumerate(zip(query_lens, context_lens, seq_lens, tables)):
            if q < 1 or c < 0:
                raise ValueError(f"sequence {r}: query_len must be >= 1 and context_len >= 0, got {q} and {c}")
            if per_kv_head and len(rows) != len(tables[0]):
                raise ValueError(f"sequence {r}: block_tables[{r}] has {len(rows)} kv heads' rows, sequence 0 "
                                 f"has {len(tables[0])}")
            for g, row in enumerate(rows):
                if len(row) * kv_block_size < n:
                    raise ValueError(f"sequence {r}: block_tables[{r}]{f'[{g}]' if per_kv_head else ''} has "
                                     f"{len(row)} blocks of {kv_block_size} tokens, too few for its {n} tokens")

        num_decodes = 0
        while num_decodes < num_seqs and query_lens[-1 - num_decodes] == 1 and context_lens[-1 - num_decodes] > 0:
            num_decodes += 1
        num_prefills = num_seqs - num_decodes

        # Rows as tensors (a Python loop per page and per token cost ~95 ms for 12 sequences of 32k tokens
        # with 8 kv heads' rows, ~15x the shared layout's time).
        num_rows = len(tables[0]) if num_seqs else 1
        width = max((len(row) for rows in tables for row in rows), default=0)
        padded = torch.zeros(num_seqs, num_rows, width, dtype=torch.int64)
        for r, rows in enumerate(tables):
            for g, row in enumerate(rows):
                if len(row):
                    padded[r, g, : len(row)] = torch.tensor(row, dtype=torch.int64).flatten()
        if padded.numel() and (int(padded.max()) > torch.iinfo(torch.int32).max
                               or int(padded.min()) < torch.iinfo(torch.int32).min):
            raise ValueError("block_tables: block numbers must fit in int32")
        slots = []
        for r, (c, n) in enumerate(zip(context_lens, seq_lens)):
            positions = torch.arange(c, n)
            # [rows, new tokens] -> [new tokens, rows]
            slots.append((padded[r][:, positions // kv_block_size] * kv_block_size + positions % kv_block_size).T)
        slot_mapping = (torch.cat(slots) if slots else torch.zeros(0, num_rows, dtype=torch.int64)).contiguous()
        table = padded.to(torch.int32) if any(context_lens) else torch.zeros(num_seqs, num_rows, 0, dtype=torch.int32)
        if not per_kv_head:
            table, slot_mapping = table[:, 0], slot_mapping[:, 0]

        def cumsum(xs):
            return torch.tensor([0] + xs, dtype=torch.int64).cumsum(0).to(torch.int32)

        def int32(xs):
            return torch.tensor(xs, dtype=torch.int32)

        return cls(
            num_prefills=num_prefills,
            num_prefill_tokens=sum(query_lens[:num_prefills]),
            num_decode_tokens=num_decodes,
            slot_mapping=slot_mapping.to(device),
            seq_lens=seq_lens,
            seq_lens_tensor=int32(seq_lens).to(device),
            max_query_len=max(query_lens, default=0),
            max_prefill_seq_len=max(seq_lens[:num_prefills], default=0),
            max_decode_seq_len=max(seq_lens[num_prefills:], default=0),
            query_start_loc=cumsum(query_lens).to(device),
            seq_start_loc=cumsum(seq_lens).to(device),
            context_lens_tensor=int32(context_lens).to(device),
            block_tables=table.to(device),
            use_cuda_graph=False,
            max_decode_query_len=1 if num_decodes else 0,
        )


def prefill_block_tables(slot_mapping: torch.Tensor, query_start_loc: torch.Tensor,
                         context_lens: torch.Tensor | None, block_tables: torch.Tensor | None, num_seqs: int,
                         max_seq_len: int, kv_block_size: int) -> torch.Tensor:
    """int32 [num_seqs, max_blocks] block tables of prefill sequences whose new tokens were just written at
    slot_mapping: a logical block that holds some new token is read off that token's slot (token j of
    sequence r sits at slot_mapping[query_start_loc[r] + j], position context_lens[r] + j); every other
    block comes from block_tables (the context), or is 0 where none is given (no kernel reads it).

    So a prompt reads its own pages even where the engine gave it no table row (a batch mixing cached
    prefixes with new prompts pads their rows with zeros), and an fp8 prompt without context reads its
    K/V back as stored. Negative (unwritten) slots give block 0. On the slots' device, no host sync.
    Per-kv-head pages: slot_mapping [N, Hkv] and block_tables [S, Hkv, max_blocks] give [num_seqs, Hkv,
    max_blocks]."""
    device = slot_mapping.device
    starts = query_start_loc[:num_seqs].to(device=device, dtype=torch.int64)[:, None]
    ends = query_start_loc[1:num_seqs + 1].to(device=device, dtype=torch.int64)[:, None]
    context = (torch.zeros_like(starts) if context_lens is None else
               context_lens[:num_seqs].to(device=device, dtype=torch.int64)[:, None])
    given = block_tables if block_tables is not None and block_tables.numel() > 0 else None
    num_blocks = max(-(-max_seq_len // kv_block_size), 0 if given is None else given.shape[-1])
    block_start = torch.arange(num_blocks, device=device, dtype=torch.int64)[None, :] * kv_block_size
    first_new = torch.maximum(block_start, context)  # the block's first position written in this step
    holds_new = first_new < torch.minimum(block_start + kv_block_size, context + ends - starts)
    slots = slot_mapping[torch.where(holds_new, starts + first_new - context, 0)]  # [S, blocks(, Hkv)]
    if slot_mapping.dim() == 2:  # per-kv-head pages: a table row per kv head
        slots, holds_new = slots.permute(0, 2, 1), holds_new[:, None, :]
    from_slots = torch.where(slots >= 0, slots // kv_block_size, 0)
    if given is None:
        return torch.where(holds_new, from_slots, 0).to(torch.int32).contiguous()
    given = torch.nn.functional.pad(given[:num_seqs], (0, num_blocks - given.shape[-1]))
    return torch.where(holds_new, from_slots, given).to(torch.int32).contiguous()


def _head(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t[:n]


def _tail(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t[n:]
