"""A minimal serving loop over the public blocksparse_attn API: paged blocks, chunked prefill, batched
greedy decode (captured in CUDA graphs on a GPU).

Each engine step packs a batch the way vLLM does: first a chunk of every prompt still being prefilled
(at most `chunk_size` prompt tokens per step in all), then one token for every sequence that is
decoding. Memory is managed as in vLLM's schedulers: a sequence takes cache blocks as its prompt chunks and
decoded tokens need them (as vLLM v1; v0 reserved the whole prompt at admission, which leaves a 128k
prompt's blocks idle for many steps); when none is free the newest running sequence is preempted:
swapped out to a CPU swap space (swap_blocks, as v0) and swapped back in, first in first out, before
any new request is admitted; where the swap space cannot hold it, its blocks are dropped and it is
recomputed from its prompt and the tokens it has generated (v0's fallback, v1's only mode). `BlocksparseFlashAttentionMetadata.build` turns the per-sequence (new tokens, cached tokens,
block table) into the batch's metadata; a prompt chunk after the first is a prefill with context,
which the backend answers from the paged cache. Steps with no prompt tokens are decode-only: on CUDA
they replay a CUDA graph captured for a padded batch size (padding rows: slot -1, seq_len 0).
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

from blocksparse_attn import BlocksparseFlashAttentionBackend as Backend
from blocksparse_attn import BlocksparseFlashAttentionMetadata as Metadata

from .model import Phi3SmallTiny

try:
    from tqdm import tqdm
except ImportError:  # the GPU machines may lack tqdm and have no package index: serve without a bar
    tqdm = None


class BlockAllocator:
    """Physical KV-cache blocks, handed out from a free list (in a seeded shuffled order, so the
    sequences' block tables are not contiguous, as in a long-running engine)."""

    def __init__(self, num_blocks: int, seed: int = 0):
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"out of KV-cache blocks: {n} wanted, {len(self.free)} free")
        blocks, self.free = self.free[:n], self.free[n:]
        return blocks

    def release(self, blocks: list[int]) -> None:
        self.free.extend(blocks)


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
    blocks: list[int] = field(default_factory=list)

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
                 preempt_every: int = 0, keep_logits: bool = False, seed: int = 0, swap_blocks: int | None = None):
        """use_cuda_graph (default: on CUDA) replays captured graphs for decode-only steps; pad_decode runs
        those steps through the same padded static buffers eagerly (how the CPU tests cover that path).
        preempt_every = n > 0 also swaps the newest decoding sequence out every n steps, memory or not (a
        test of the swap path). swap_blocks: the CPU swap space in blocks (default num_blocks; pinned host
        memory on CUDA, allocated on the first swap)."""
        cfg = model.cfg
        self.model, self.kvbs, self.chunk_size, self.max_batch = model, kv_block_size, chunk_size, max_batch
        self.keep_logits = keep_logits
        self.device = model.device
        self.num_blocks = num_blocks
        shape = Backend.get_kv_cache_shape(num_blocks, kv_block_size, model.hkv, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=model.cache_dtype, device=self.device)
                          for _ in range(cfg.num_layers)]
        self.allocator = BlockAllocator(num_blocks, seed)
        # Blocks kept free when admitting a request while others run (vLLM's 1 % watermark), so an
        # admission does not at once force the running sequences' next blocks into preemptions.
        self.watermark = num_blocks // 100
        self.max_blocks_per_seq = -(-cfg.max_seqlen // kv_block_size)
        self.waiting: list[Request] = []
        self.running: list[Request] = []            # oldest first: preemption takes the newest
        self.swapped: list[Request] = []
        self.preempt_every = preempt_every
        self.num_swaps = 0                           # swap-outs, forced by preempt_every or by memory
        self.num_preemptions = 0                     # sequences preempted because no block was free
        self.num_recomputes = 0                      # of those, dropped and recomputed (swap space full)
        self.cpu_caches: list[torch.Tensor] | None = None  # the swap space, allocated on first use
        self.swap_blocks = num_blocks if swap_blocks is None else swap_blocks
        self.cpu_allocator = BlockAllocator(self.swap_blocks, seed + 1)
        self.steps = 0
        self.history: list[StepRecord] = []  # every step that ran a batch
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        self.graphs = PaddedDecoder(self, capture=use_cuda_graph) if use_cuda_graph or pad_decode else None

    def add_request(self, req: Request) -> None:
        if len(req.prompt) < 1 or len(req.prompt) + req.max_new_tokens > self.model.cfg.max_seqlen:
            raise ValueError(f"request {req.rid}: {len(req.prompt)} prompt + {req.max_new_tokens} new tokens "
                             f"must be in [1, max_seqlen = {self.model.cfg.max_seqlen}]")
        # the last new token's k/v is never needed
        need = self._blocks_for(len(req.prompt) + req.max_new_tokens - 1)
        if need > self.num_blocks:
            raise ValueError(f"request {req.rid} needs {need} KV-cache blocks, the cache has {self.num_blocks}")
        self.waiting.append(req)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.kvbs)

    def _admit(self) -> None:
        """FCFS, after every swapped-out sequence is back in: an arrived request joins the running ones if
        the blocks for its first chunk are free beyond the watermark. Blocks are taken as chunks and
        decodes need them (_grow), so a long prompt holds only what it has computed."""
        free = self.allocator.num_free
        while (self.waiting and not self.swapped and self.waiting[0].arrival_step <= self.steps
               and len(self.running) < self.max_batch):
            need = self._blocks_for(min(self.waiting[0].num_tokens, self.chunk_size))
            if need + (self.watermark if self.running else 0) > free:
                break
            free -= need
            self.running.append(self.waiting.pop(0))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _preempt(self, req: Request) -> None:
        """Takes a running sequence's blocks: to the swap space if it has room, else dropped (the sequence
        goes back to the head of the queue and recomputes its prompt and output). A sequence admitted this
        step that got no block yet just goes back to the queue (no preemption: nothing is lost)."""
        if not req.blocks:
            self.running.remove(req)
            self.waiting.insert(0, req)
            return
        self.num_preemptions += 1
        if len(req.blocks) <= self.cpu_allocator.num_free:
            self._swap_out(req)
            return
        self.num_recomputes += 1
        self.allocator.release(req.blocks)
        req.blocks, req.num_computed = [], 0
        self.running.remove(req)
        self.waiting.insert(0, req)

    def _swap_out(self, req: Request) -> None:
        """Copies the request's blocks to the CPU swap space (every layer) and frees them here."""
        if self.cpu_caches is None:
            pin = self.device.type == "cuda"
            self.cpu_caches = [torch.zeros((c.shape[0], self.swap_blocks, *c.shape[2:]), dtype=c.dtype,
                                           pin_memory=pin) for c in self.kv_caches]
        cpu_blocks = self.cpu_allocator.allocate(len(req.blocks))
        mapping = torch.tensor(list(zip(req.blocks, cpu_blocks)), dtype=torch.int64)
        for cache, cpu_cache in zip(self.kv_caches, self.cpu_caches):
            Backend.swap_blocks(cache, cpu_cache, mapping)
        self.allocator.release(req.blocks)
        req.blocks = cpu_blocks
        self.running.remove(req)
        self.swapped.append(req)
        self.num_swaps += 1

    def _swap_in(self, req: Request) -> bool:
        """Copies a swapped-out request's blocks back into newly allocated blocks; False (nothing done)
        unless the blocks for its next step (a chunk or a decode) are free and the batch has room."""
        n = min(req.num_tokens - req.num_computed, self.chunk_size) if req.prefilling else 1
        need = max(len(req.blocks), self._blocks_for(req.num_computed + n))
        if need > self.allocator.num_free or len(self.running) >= self.max_batch:
            return False
        blocks = self.allocator.allocate(len(req.blocks))
        mapping = torch.tensor(list(zip(req.blocks, blocks)), dtype=torch.int64)
        for cache, cpu_cache in zip(self.kv_caches, self.cpu_caches):
            Backend.swap_blocks(cpu_cache, cache, mapping)
        self.cpu_allocator.release(req.blocks)
        req.blocks = blocks
        self.running.append(req)
        return True

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Gives a running request the blocks for num_tokens tokens, preempting the newest running sequences
        while none are free; False if that preempted the request itself."""
        need = self._blocks_for(num_tokens) - len(req.blocks)
        while need > self.allocator.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.blocks += self.allocator.allocate(need)
        return True

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
            if decoding and len(decoding[-1].blocks) <= self.cpu_allocator.num_free:
                self._swap_out(decoding[-1])
        self._admit()
        batch, num_prefill_seqs = self._schedule()
        self.steps += 1
        if not batch:
            return 0

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
            self.allocator.release(req.blocks)
            req.blocks = []
            self.running.remove(req)
        prefills = batch[:num_prefill_seqs]
        self.history.append(StepRecord(num_prefill_seqs, sum(req.num_computed > n for req, n in prefills),
                                       len(batch) - num_prefill_seqs, sum(n for _, n in prefills),
                                       time.perf_counter() - start))
        return len(sampled)

    def _eager(self, batch: list[tuple[Request, int]], sample: list[bool]) -> torch.Tensor:
        query_lens = [n for _, n in batch]
        context_lens = [req.num_computed for req, _ in batch]
        md = Metadata.build(query_lens, context_lens, [req.blocks for req, _ in batch], self.kvbs,
                            device=self.device)
        ids = [t for (req, n), c in zip(batch, context_lens) for t in req.token_range(c, c + n)]
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(context_lens, query_lens)])
        ends = torch.tensor(query_lens).cumsum(0) - 1
        rows = ends[torch.tensor(sample)]
        return self.model.forward(torch.tensor(ids, device=self.device), positions.to(self.device), self.kv_caches,
                                  md, rows.to(self.device))

    def run(self, requests: list[Request], progress: bool = True) -> dict:
        """Serves `requests` to completion; returns timing stats of this call.

        swaps: swap-outs (by memory pressure or preempt_every); preemptions: sequences preempted because
        the cache ran out of blocks, swapped out or (recomputes) dropped to be recomputed.
        Steps that carry prompt tokens (the prefill phase, including the decodes batched with them) and
        decode-only steps are timed apart: prefill_seconds / prefill_steps, decode_seconds /
        decode_steps / decode_tokens (tokens generated by decode-only steps)."""
        for req in requests:
            self.add_request(req)
        total = sum(r.max_new_tokens for r in requests)
        first_record, first_step = len(self.history), self.steps
        first = (self.num_swaps, self.num_preemptions, self.num_recomputes)
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
                    recomputes=self.num_recomputes - first[2],
                    prefill_steps=len(prefill), prefill_seconds=sum(r.seconds for r in prefill),
                    decodes_in_prefill_steps=sum(r.decodes for r in prefill),
                    decode_steps=len(decode), decode_seconds=sum(r.seconds for r in decode),
                    decode_tokens=sum(r.decodes for r in decode))


def cache_block_bytes(model: Phi3SmallTiny, kv_block_size: int) -> int:
    """Bytes of one KV-cache block over all layers (K and V) on one rank."""
    elem = torch.empty(0, dtype=model.cache_dtype).element_size()
    return model.cfg.num_layers * 2 * kv_block_size * model.hkv * model.cfg.head_dim * elem


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


class PaddedDecoder:
    """Decode-only steps over static buffers padded to a batch size of 1, 2, 4, ... max_batch; with
    capture=True (CUDA), one CUDA graph per size, replayed.

    Static inputs: token ids, positions, slot_mapping (padding rows -1: nothing written), seq_lens
    (padding rows 0: output 0), block tables. The metadata holds views of these buffers and no host
    seq_lens (seq_lens=None, max_decode_seq_len = max_seqlen), so the backend does no host work that
    would be frozen into the graph. With tensor parallelism the NCCL all-reduces are captured too.
    The capture and replay have not been run yet (no GPU on the development machine); the padded
    buffers and metadata run eagerly on the CPU with capture=False (tests/test_example_model.py).
    """

    def __init__(self, engine: Engine, capture: bool):
        model, dev, b = engine.model, engine.device, engine.max_batch
        self.engine = engine
        self.ids = torch.zeros(b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
        self.slots = torch.full((b,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(b, engine.max_blocks_per_seq, dtype=torch.int32, device=dev)
        # The tables' host copy, and per row the block list it was written from and how much of it: a
        # sequence's list only grows while it runs (swap-in and recompute give it a new list), so a
        # step writes only new blocks, not 8192-entry rows of 128k sequences.
        self.host_tables = torch.zeros(b, engine.max_blocks_per_seq, dtype=torch.int32)
        self.written: list[tuple[list[int] | None, int]] = [(None, 0)] * b
        self.sizes = sorted({min(1 << i, b) for i in range(b.bit_length() + 1)})
        self.graphs, self.outputs, self.runs = {}, {}, {}
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            md = Metadata(num_prefills=0, num_prefill_tokens=0, num_decode_tokens=size,
                          slot_mapping=self.slots[:size], seq_lens=None, seq_lens_tensor=self.seq_lens[:size],
                          max_query_len=1, max_decode_seq_len=model.cfg.max_seqlen,
                          block_tables=self.tables[:size], use_cuda_graph=True)

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
        n, kvbs = len(reqs), self.engine.kvbs
        size = next(s for s in self.sizes if s >= n)
        pos = [r.num_computed for r in reqs]  # the token being decoded: position num_computed
        ids = [r.token_range(p, p + 1)[0] for r, p in zip(reqs, pos)]
        slots = [r.blocks[p // kvbs] * kvbs + p % kvbs for r, p in zip(reqs, pos)]
        for i, r in enumerate(reqs):
            blocks, done = self.written[i]
            if blocks is not r.blocks:
                done = 0
            if done < len(r.blocks):
                self.host_tables[i, done: len(r.blocks)] = torch.tensor(r.blocks[done:], dtype=torch.int32)
                self.written[i] = (r.blocks, len(r.blocks))
        pad = size - n
        self.ids[:size].copy_(torch.tensor(ids + [0] * pad), non_blocking=False)
        self.positions[:size].copy_(torch.tensor(pos + [0] * pad))
        self.slots[:size].copy_(torch.tensor(slots + [-1] * pad))
        self.seq_lens[:size].copy_(torch.tensor([p + 1 for p in pos] + [0] * pad, dtype=torch.int32))
        self.tables[:size].copy_(self.host_tables[:size])
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:n].clone()
        return self.runs[size]()[:n]
