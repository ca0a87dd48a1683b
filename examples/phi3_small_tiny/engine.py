"""A minimal serving loop over the public blocksparse_attn API: paged blocks, chunked prefill, batched
greedy decode (captured in CUDA graphs on a GPU).

Each engine step packs a batch the way vLLM does: first a chunk of every prompt still being prefilled
(at most `chunk_size` prompt tokens per step in all), then one token for every sequence that is
decoding. Memory is managed as in vLLM's schedulers: a sequence takes cache pages as its prompt chunks and
decoded tokens need them (as vLLM v1; v0 reserved the whole prompt at admission, which leaves a 128k
prompt's pages idle for many steps); when none is free the newest running sequence is preempted:
swapped out to a CPU swap space (swap_blocks, as v0) and swapped back in, first in first out, before
any new request is admitted; where the swap space cannot hold it, its pages are dropped and it is
recomputed from its prompt and the tokens it has generated (v0's fallback, v1's only mode).
The memory is one pool of shared pages (vLLM's blocks), or with kv_layout="per-kv-head" a pool of
one-kv-head pages per group of layers with the same pattern, from which the pages no later query reads
are released after every step (kv_pools.py); a sequence then needs room in every pool.
`BlocksparseFlashAttentionMetadata.build` turns the per-sequence (new tokens, cached tokens, page table)
into each pool's metadata for the batch; a prompt chunk after the first is a prefill with context, which
the backend answers from the paged cache. Steps with no prompt tokens are decode-only: on CUDA they
replay a CUDA graph captured for a padded batch size (padding rows: slot -1, seq_len 0).
Sampling is greedy; with tensor parallelism every rank runs the same schedule and rank 0's tokens
are broadcast, so the ranks never disagree.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from blocksparse_attn import BlocksparseFlashAttentionMetadata as Metadata

from .kv_pools import KVPool, PageTable, all_ranks_max, make_pools, page_bytes
from .model import Phi3SmallTiny

try:
    from tqdm import tqdm
except ImportError:  # the GPU machines may lack tqdm and have no package index: serve without a bar
    tqdm = None


@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int = 0                       # the engine step at which the request arrives
    # Tokens to emit instead of the greedy ones (teacher forcing): a second engine fed the first one's
    # tokens computes logits for the same sequences, so two runs compare logit for logit even where a
    # near-tie made their argmax differ.
    forced_output: list[int] | None = None
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # float32 [vocab] per generated token (CPU)
    num_computed: int = 0                       # tokens whose k/v are in the cache
    tables: list[PageTable] = field(default_factory=list)  # its pages in each of the engine's pools

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    # The engine's per-step reads go through these: at 128k tokens, `tokens` would copy the prompt for
    # every sequence on every step (milliseconds per decode step).
    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token_range(self, start: int, stop: int) -> list[int]:
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        return self.prompt[start:stop] + self.output[max(start - p, 0): stop - p]

    @property
    def prefilling(self) -> bool:
        """More than the last token to compute (a prompt, or a preempted sequence being recomputed), or
        a prompt whose first token is not sampled yet; otherwise the next step decodes one token."""
        return self.num_tokens - self.num_computed > 1 or not self.output

    @property
    def finished(self) -> bool:
        return len(self.output) >= self.max_new_tokens


class StepRecord(NamedTuple):
    """One engine step: prefill sequences (of which with cached context), decode sequences, prompt
    tokens, and the step's wall time (scheduling to sampled tokens on the host; reading the tokens
    back synchronises with the device, so the time covers the step's device work)."""
    prefills: int
    prefills_with_context: int
    decodes: int
    prompt_tokens: int
    seconds: float


class Engine:
    def __init__(self, model: Phi3SmallTiny, num_blocks: int, kv_block_size: int = 16, chunk_size: int = 64,
                 max_batch: int = 16, use_cuda_graph: bool | None = None, pad_decode: bool = False,
                 preempt_every: int = 0, keep_logits: bool = False, seed: int = 0, swap_blocks: int | None = None,
                 kv_layout: str = "shared", longest_request: int | None = None):
        """use_cuda_graph (default: on CUDA) replays captured graphs for decode-only steps; pad_decode runs
        those steps through the same padded static buffers eagerly (how the CPU tests cover that path).
        preempt_every = n > 0 also swaps the newest decoding sequence out every n steps, memory or not (a
        test of the swap path). swap_blocks: the CPU swap space in blocks (default num_blocks; pinned host
        memory on CUDA, allocated on the first swap).
        kv_layout: "shared" (pages of all kv heads, one pool, as vLLM) or "per-kv-head" (one-head pages in a
        pool per pattern, released as soon as no later query reads them: kv_pools.py). Either way the cache
        and the swap space hold the bytes of num_blocks / swap_blocks shared blocks of every layer.
        longest_request: the most tokens (prompt + new) a request will have, the length at which the
        per-kv-head split weighs what each pattern keeps (default: the model's max_seqlen)."""
        cfg = model.cfg
        self.model, self.kvbs, self.chunk_size, self.max_batch = model, kv_block_size, chunk_size, max_batch
        self.keep_logits = keep_logits
        self.device = model.device
        self.num_blocks, self.kv_layout = num_blocks, kv_layout
        self.swap_blocks = num_blocks if swap_blocks is None else swap_blocks
        self.pools: list[KVPool] = make_pools(model, kv_layout, num_blocks, self.swap_blocks, kv_block_size,
                                              longest_request or cfg.max_seqlen, seed)
        self.layer_pool = [next(i for i, pool in enumerate(self.pools) if layer in pool.layers)
                           for layer in range(cfg.num_layers)]
        self.kv_caches = [self.pools[i].caches[self.pools[i].layers.index(layer)]
                          for layer, i in enumerate(self.layer_pool)]
        self.max_pages_per_seq = -(-cfg.max_seqlen // kv_block_size)
        self.waiting: list[Request] = []
        self.running: list[Request] = []            # oldest first: preemption takes the newest
        self.swapped: list[Request] = []
        self.preempt_every = preempt_every
        self.num_swaps = 0                           # swap-outs, forced by preempt_every or by memory
        self.num_preemptions = 0                     # sequences preempted because no page was free
        self.num_recomputes = 0                      # of those, dropped and recomputed (swap space full)
        self.pages_released = 0                      # pages given back because no later query reads them
        self.peak_running = 0                        # the most sequences with pages on the device at once
        self.steps = 0
        self.history: list[StepRecord] = []  # every step that ran a batch
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        self.graphs = PaddedDecoder(self, capture=use_cuda_graph) if use_cuda_graph or pad_decode else None

    def add_request(self, req: Request) -> None:
        if len(req.prompt) < 1 or len(req.prompt) + req.max_new_tokens > self.model.cfg.max_seqlen:
            raise ValueError(f"request {req.rid}: {len(req.prompt)} prompt + {req.max_new_tokens} new tokens "
                             f"must be in [1, max_seqlen = {self.model.cfg.max_seqlen}]")
        cached = len(req.prompt) + req.max_new_tokens - 1  # the last new token's k/v is never needed
        peaks = [pool.peak_pages_alone(cached, self.chunk_size) for pool in self.pools]
        if any(pool.releaser is not None for pool in self.pools):
            peaks = all_ranks_max(self.model, peaks)  # the ranks release different pages
        for pool, peak in zip(self.pools, peaks):
            if peak > pool.num_pages:
                raise ValueError(f"request {req.rid} needs {int(peak)} KV-cache pages of the {pool.name} pool at "
                                 f"its peak, the pool has {pool.num_pages}")
        req.tables = [pool.new_table() for pool in self.pools]
        self.waiting.append(req)

    def _admit(self) -> None:
        """FCFS, after every swapped-out sequence is back in: an arrived request joins the running ones if
        the pages for its first chunk are free beyond the watermark in every pool. Pages are taken as
        chunks and decodes need them (_grow), so a long prompt holds only what it has computed."""
        free = [pool.device.num_free for pool in self.pools]
        while (self.waiting and not self.swapped and self.waiting[0].arrival_step <= self.steps
               and len(self.running) < self.max_batch):
            first = min(self.waiting[0].num_tokens, self.chunk_size)
            need = [pool.pages_for(first) for pool in self.pools]
            if any(n + (pool.watermark if self.running else 0) > f for n, f, pool in zip(need, free, self.pools)):
                break
            free = [f - n for f, n in zip(free, need)]
            self.running.append(self.waiting.pop(0))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _fits_swap_space(self, req: Request) -> bool:
        return all(t.charge <= pool.host.num_free for pool, t in zip(self.pools, req.tables))

    def _preempt(self, req: Request) -> None:
        """Takes a running sequence's pages: to the swap space if it has room, else dropped (the sequence
        goes back to the head of the queue and recomputes its prompt and output). A sequence admitted this
        step that got no page yet just goes back to the queue (no preemption: nothing is lost)."""
        self.running.remove(req)
        if all(t.num_pages == 0 for t in req.tables):
            self.waiting.insert(0, req)
            return
        self.num_preemptions += 1
        if self._fits_swap_space(req):
            self._swap_out(req)
            return
        self.num_recomputes += 1
        for pool, table in zip(self.pools, req.tables):
            pool.drop(table)
        req.tables, req.num_computed = [pool.new_table() for pool in self.pools], 0
        self.waiting.insert(0, req)

    def _swap_out(self, req: Request) -> None:
        """Copies the (removed from running) request's live pages to the CPU swap space and frees them here."""
        req.tables = [pool.swap_out(table) for pool, table in zip(self.pools, req.tables)]
        self.swapped.append(req)
        self.num_swaps += 1

    def _swap_in(self, req: Request) -> bool:
        """Copies a swapped-out request's pages back into newly allocated ones; False (nothing done) unless
        every pool has room for them and for its next step (a chunk or a decode) and the batch has room."""
        n = min(req.num_tokens - req.num_computed, self.chunk_size) if req.prefilling else 1
        if len(self.running) >= self.max_batch or any(
                t.charge + pool.pages_to_grow(t, req.num_computed + n) > pool.device.num_free
                for pool, t in zip(self.pools, req.tables)):
            return False
        req.tables = [pool.swap_in(table) for pool, table in zip(self.pools, req.tables)]
        self.running.append(req)
        return True

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Gives a running request the pages for num_tokens tokens in every pool, preempting the newest
        running sequences while some pool is short; False if that preempted the request itself."""
        while any(pool.pages_to_grow(t, num_tokens) > pool.device.num_free for pool, t in zip(self.pools, req.tables)):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        for pool, table in zip(self.pools, req.tables):
            pool.grow(table, num_tokens)
        return True

    def _release_unread(self) -> None:
        """After a step, each running sequence gives back, in every pool with a release rule, the pages no
        later query of their kv head reads; its charge then settles to the pages it still holds (the
        most on any tensor-parallel rank: kv_pools.py)."""
        releasing = [i for i, pool in enumerate(self.pools) if pool.releaser is not None]
        held = [(self.pools[i], req.tables[i], req.num_computed) for req in self.running for i in releasing]
        for pool, table, num_tokens in held:
            self.pages_released += pool.release_unread(table, num_tokens)
        for (pool, table, _), charge in zip(held, all_ranks_max(self.model, [t.live for _, t, _ in held])):
            pool.settle(table, int(charge))

    def _schedule(self) -> tuple[list[tuple[Request, int]], int]:
        """The step's batch, (request, number of new tokens): prompt chunks first (running order, within
        chunk_size tokens in all), then decodes; and the number of prompt chunks."""
        budget, prefills, decodes = self.chunk_size, [], []
        i = 0
        while i < len(self.running):  # preemption removes sequences from the end, never before i
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget) if req.prefilling else 1
            if n == 0:
                i += 1
                continue
            if not self._grow(req, req.num_computed + n):
                continue
            if req.prefilling:
                prefills.append((req, n))
                budget -= n
            else:
                decodes.append((req, 1))
            i += 1
        return prefills + decodes, len(prefills)

    def step(self) -> int:
        """One forward over the scheduled batch; returns the number of tokens generated."""
        start = time.perf_counter()
        while self.swapped and self._swap_in(self.swapped[0]):
            self.swapped.pop(0)
        if self.preempt_every and self.steps % self.preempt_every == self.preempt_every - 1:
            decoding = [r for r in self.running if not r.prefilling]
            if decoding and self._fits_swap_space(decoding[-1]):
                self.running.remove(decoding[-1])
                self._swap_out(decoding[-1])
        self._admit()
        batch, num_prefill_seqs = self._schedule()
        self.steps += 1
        if not batch:
            return 0
        self.peak_running = max(self.peak_running, sum(1 for r in self.running if r.tables[0].num_pages))
        for pool in self.pools:
            pool.peak_in_use = max(pool.peak_in_use, pool.device.in_use)

        # a sequence samples when this step reaches its last known token (end of prompt, or a decode)
        sample = [req.num_computed + n == req.num_tokens for req, n in batch]
        if num_prefill_seqs == 0 and self.graphs is not None:
            logits = self.graphs.decode([req for req, _ in batch])
        else:
            logits = self._eager(batch, sample)
        sampled = [req for (req, _), s in zip(batch, sample) if s]
        next_tokens = logits.argmax(-1)
        if self.model.tp_size > 1:  # one source of truth for the ranks' schedules
            dist.broadcast(next_tokens, src=0, group=self.model.group)
        for (req, n) in batch:
            req.num_computed += n
        for req, tok, row in zip(sampled, next_tokens.tolist(), logits):
            req.output.append(tok if req.forced_output is None else req.forced_output[len(req.output)])
            if self.keep_logits:
                req.logits.append(row.cpu())
        for req in [r for r in self.running if r.finished]:
            for pool, table in zip(self.pools, req.tables):
                pool.drop(table)
            req.tables = []
            self.running.remove(req)
        self._release_unread()
        prefills = batch[:num_prefill_seqs]
        self.history.append(StepRecord(num_prefill_seqs, sum(req.num_computed > n for req, n in prefills),
                                       len(batch) - num_prefill_seqs, sum(n for _, n in prefills),
                                       time.perf_counter() - start))
        return len(sampled)

    def _eager(self, batch: list[tuple[Request, int]], sample: list[bool]) -> torch.Tensor:
        query_lens = [n for _, n in batch]
        context_lens = [req.num_computed for req, _ in batch]
        per_pool = [Metadata.build(query_lens, context_lens, [pool.table_arg(req.tables[i]) for req, _ in batch],
                                   self.kvbs, device=self.device) for i, pool in enumerate(self.pools)]
        ids = [t for (req, n), c in zip(batch, context_lens) for t in req.token_range(c, c + n)]
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(context_lens, query_lens)])
        ends = torch.tensor(query_lens).cumsum(0) - 1
        rows = ends[torch.tensor(sample)]
        return self.model.forward(torch.tensor(ids, device=self.device), positions.to(self.device), self.kv_caches,
                                  [per_pool[i] for i in self.layer_pool], rows.to(self.device))

    def run(self, requests: list[Request], progress: bool = True) -> dict:
        """Serves `requests` to completion; returns timing stats of this call.

        swaps: swap-outs (by memory pressure or preempt_every); preemptions: sequences preempted because
        the cache ran out of pages, swapped out or (recomputes) dropped to be recomputed; pages_released:
        pages given back because no later query reads them (per-kv-head; this rank's); peak_running: the
        most sequences with pages on the device at once; peak_pages: per pool, the most pages in use.
        Steps that carry prompt tokens (the prefill phase, including the decodes batched with them) and
        decode-only steps are timed apart: prefill_seconds / prefill_steps, decode_seconds /
        decode_steps / decode_tokens (tokens generated by decode-only steps)."""
        for req in requests:
            self.add_request(req)
        total = sum(r.max_new_tokens for r in requests)
        first_record, first_step = len(self.history), self.steps
        first = (self.num_swaps, self.num_preemptions, self.num_recomputes, self.pages_released)
        self.peak_running = 0
        for pool in self.pools:
            pool.peak_in_use = 0
        bar = tqdm(total=total, unit="tok", file=sys.stderr) if progress and tqdm is not None else None
        done, start = 0, time.perf_counter()
        while self.has_work():
            sampled = self.step()
            done += sampled
            if bar is not None:
                bar.update(sampled)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if bar is not None:
            bar.close()
        records = self.history[first_record:]
        prefill = [r for r in records if r.prompt_tokens]
        decode = [r for r in records if not r.prompt_tokens]
        return dict(requests=len(requests), prompt_tokens=sum(len(r.prompt) for r in requests),
                    generated_tokens=done, seconds=elapsed, steps=self.steps - first_step,
                    swaps=self.num_swaps - first[0], preemptions=self.num_preemptions - first[1],
                    recomputes=self.num_recomputes - first[2], pages_released=self.pages_released - first[3],
                    peak_running=self.peak_running, peak_pages=[pool.peak_in_use for pool in self.pools],
                    prefill_steps=len(prefill), prefill_seconds=sum(r.seconds for r in prefill),
                    decodes_in_prefill_steps=sum(r.decodes for r in prefill),
                    decode_steps=len(decode), decode_seconds=sum(r.seconds for r in decode),
                    decode_tokens=sum(r.decodes for r in decode))


def cache_block_bytes(model: Phi3SmallTiny, kv_block_size: int) -> int:
    """Bytes of one KV-cache block over all layers (K and V) on one rank: the unit of --num-blocks in
    either layout."""
    return model.cfg.num_layers * page_bytes(model, kv_block_size, model.hkv)


def blocks_for_memory(model: Phi3SmallTiny, fraction: float, kv_block_size: int, chunk_size: int) -> int:
    """KV-cache blocks that fit when this process may use `fraction` of the GPU's memory (vLLM's
    gpu_memory_utilization): what the weights (already loaded) and a profiled forward of one
    chunk_size-token prompt chunk (its activations' peak; the cache is empty, so nothing is written)
    leave of fraction * total, less what the CUDA context and other processes hold. The decode graphs'
    buffers (a few [max_batch, vocab] rows) and the backend's small workspaces fit in the rounding."""
    dev = model.device
    if dev.type != "cuda":
        raise ValueError(f"sizing the cache from GPU memory needs a CUDA model, got device {dev}")
    if not 0 < fraction <= 1:
        raise ValueError(f"gpu memory fraction must be in (0, 1], got {fraction}")
    cfg = model.cfg
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    n = min(chunk_size, cfg.max_seqlen)
    md = Metadata.build([n], [0], [list(range(-(-n // kv_block_size)))], kv_block_size, device=dev)
    empty = [torch.empty(0, dtype=model.cache_dtype, device=dev)] * cfg.num_layers
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(cfg.vocab_size, (n,), device=dev, generator=g)
    model.forward(ids, torch.arange(n, device=dev), empty, md, torch.tensor([n - 1], device=dev))
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    free, total = torch.cuda.mem_get_info(dev)
    not_torch = (total - free) - torch.cuda.memory_reserved(dev)  # CUDA context, other processes
    available = fraction * total - not_torch - peak
    blocks = int(available // cache_block_bytes(model, kv_block_size))
    if blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache at gpu memory fraction {fraction}: total "
                           f"{total / 2**30:.1f} GiB, weights {before / 2**30:.1f} GiB, peak with activations "
                           f"{peak / 2**30:.1f} GiB, outside torch {not_torch / 2**30:.1f} GiB")
    return blocks


class PaddedTables:
    """One pool's static decode inputs for PaddedDecoder: slot_mapping [b, rows] (padding rows -1: nothing
    written) and block tables [b, rows, max_pages], rows = the pool's table rows per sequence (Hkv with
    per-kv-head pages; 1 with shared pages, whose metadata gets [b] and [b, max_pages] views).

    The tables' host copy is written per batch row from the sequence's PageTable, and only what changed:
    its new pages at the end, and the entries released since the last step (in the middle of the row,
    replayed from PageTable.released), never the 8192-entry rows of a 128k sequence on every step. A
    swap-in or a recompute makes a new PageTable, which rewrites the row. The device gets only the
    columns the batch's longest table covers (the kernels read no further)."""

    def __init__(self, pool: KVPool, batch: int, max_pages: int, device: torch.device):
        self.pool = pool
        self.slots = torch.full((batch, pool.rows), -1, dtype=torch.int64, device=device)
        self.tables = torch.zeros(batch, pool.rows, max_pages, dtype=torch.int32, device=device)
        self.host_tables = torch.zeros(batch, pool.rows, max_pages, dtype=torch.int32)
        # per batch row: the table it was written from, its pages written, its releases replayed
        self.written: list[tuple[PageTable | None, int, int]] = [(None, 0, 0)] * batch

    def views(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_mapping, block_tables) of the first `size` batch rows, shaped as the metadata takes them."""
        if self.pool.per_kv_head:
            return self.slots[:size], self.tables[:size]
        return self.slots[:size, 0], self.tables[:size, 0]

    def update(self, tables: list[PageTable], positions: list[int], size: int) -> None:
        """Writes the batch's slots (the decoded token at positions[i]) and tables, padded to `size` rows."""
        kvbs = self.pool.kvbs
        for i, table in enumerate(tables):
            old, done, replayed = self.written[i]
            if old is not table:
                done, replayed = 0, len(table.released)
            n = table.num_pages
            if done < n:
                self.host_tables[i, :, done:n] = torch.tensor([row[done:n] for row in table.rows], dtype=torch.int32)
            for g, p in table.released[replayed:]:
                self.host_tables[i, g, p] = -1
            self.written[i] = (table, n, len(table.released))
        slots = [[row[p // kvbs] * kvbs + p % kvbs for row in t.rows] for t, p in zip(tables, positions)]
        slots += [[-1] * self.pool.rows] * (size - len(tables))
        self.slots[:size].copy_(torch.tensor(slots, dtype=torch.int64))
        cols = max(t.num_pages for t in tables)
        self.tables[:size, :, :cols].copy_(self.host_tables[:size, :, :cols])


class PaddedDecoder:
    """Decode-only steps over static buffers padded to a batch size of 1, 2, 4, ... max_batch; with
    capture=True (CUDA), one CUDA graph per size, replayed.

    Static inputs: token ids, positions, seq_lens (padding rows 0: output 0), and per pool its slots and
    block tables (PaddedTables). Each pool's metadata holds views of these buffers and no host seq_lens
    (seq_lens=None, max_decode_seq_len = max_seqlen), so the backend does no host work that would be
    frozen into the graph; every layer gets its pool's. With tensor parallelism the NCCL all-reduces are
    captured too. The capture and replay have not been run with per-kv-head pages (no GPU on the
    development machine); the padded buffers and metadata run eagerly on the CPU with capture=False
    (tests/test_example_model.py, tests/test_kv_layout_engine.py).
    """

    def __init__(self, engine: Engine, capture: bool):
        model, dev, b = engine.model, engine.device, engine.max_batch
        self.engine = engine
        self.ids = torch.zeros(b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.pool_tables = [PaddedTables(pool, b, engine.max_pages_per_seq, dev) for pool in engine.pools]
        self.sizes = sorted({min(1 << i, b) for i in range(b.bit_length() + 1)})
        self.graphs, self.outputs, self.runs = {}, {}, {}
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            per_pool = []
            for tables in self.pool_tables:
                slots, block_tables = tables.views(size)
                per_pool.append(Metadata(num_prefills=0, num_prefill_tokens=0, num_decode_tokens=size,
                                         slot_mapping=slots, seq_lens=None, seq_lens_tensor=self.seq_lens[:size],
                                         max_query_len=1, max_decode_seq_len=model.cfg.max_seqlen,
                                         block_tables=block_tables, use_cuda_graph=True))
            md = [per_pool[i] for i in engine.layer_pool]

            def run(md=md, size=size):
                return model.forward(self.ids[:size], self.positions[:size], engine.kv_caches, md)

            self.runs[size] = run
            if not capture:
                continue
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up (all rows padding: writes nothing, reads nothing)
                run()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = run()
            pool = graph.pool()
            self.graphs[size] = graph
        # One replay each (all rows padding: nothing written), so the first timed decode step does not
        # pay the graph's upload to the device.
        for graph in self.graphs.values():
            graph.replay()
        if self.graphs:
            torch.cuda.synchronize(dev)

    def decode(self, reqs: list[Request]) -> torch.Tensor:
        """Logits [len(reqs), vocab] of each request's next token."""
        n = len(reqs)
        size = next(s for s in self.sizes if s >= n)
        pos = [r.num_computed for r in reqs]  # the token being decoded: position num_computed
        ids = [r.token_range(p, p + 1)[0] for r, p in zip(reqs, pos)]
        for i, tables in enumerate(self.pool_tables):
            tables.update([r.tables[i] for r in reqs], pos, size)
        pad = size - n
        self.ids[:size].copy_(torch.tensor(ids + [0] * pad), non_blocking=False)
        self.positions[:size].copy_(torch.tensor(pos + [0] * pad))
        self.seq_lens[:size].copy_(torch.tensor([p + 1 for p in pos] + [0] * pad, dtype=torch.int32))
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:n].clone()
        return self.runs[size]()[:n]
