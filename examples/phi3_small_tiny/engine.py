"""A minimal serving loop over the public blocksparse_attn API: paged blocks, chunked prefill, batched
greedy decode (captured in CUDA graphs on a GPU).

Each engine step packs a batch the way vLLM does: first a chunk of every prompt still being prefilled
(at most `chunk_size` prompt tokens per step in all), then one token for every sequence that is
decoding. `BlocksparseFlashAttentionMetadata.build` turns the per-sequence (new tokens, cached tokens,
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

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt)

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
                 preempt_every: int = 0, keep_logits: bool = False, seed: int = 0):
        """use_cuda_graph (default: on CUDA) replays captured graphs for decode-only steps; pad_decode runs
        those steps through the same padded static buffers eagerly (how the CPU tests cover that path).
        preempt_every = n > 0 swaps the newest decoding sequence out to a CPU cache every n steps and back
        in (to other blocks) the next step, as an engine under memory pressure would (swap_blocks)."""
        cfg = model.cfg
        self.model, self.kvbs, self.chunk_size, self.max_batch = model, kv_block_size, chunk_size, max_batch
        self.keep_logits = keep_logits
        self.device = model.device
        shape = Backend.get_kv_cache_shape(num_blocks, kv_block_size, model.hkv, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=model.cache_dtype, device=self.device)
                          for _ in range(cfg.num_layers)]
        self.allocator = BlockAllocator(num_blocks, seed)
        self.max_blocks_per_seq = -(-cfg.max_seqlen // kv_block_size)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.preempt_every, self.num_swaps = preempt_every, 0
        self.cpu_caches: list[torch.Tensor] | None = None  # the swap space, allocated on first use
        self.cpu_allocator = BlockAllocator(num_blocks, seed + 1)
        self.steps = 0
        self.history: list[StepRecord] = []  # every step that ran a batch
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        self.graphs = PaddedDecoder(self, capture=use_cuda_graph) if use_cuda_graph or pad_decode else None

    def add_request(self, req: Request) -> None:
        if len(req.prompt) < 1 or len(req.prompt) + req.max_new_tokens > self.model.cfg.max_seqlen:
            raise ValueError(f"request {req.rid}: {len(req.prompt)} prompt + {req.max_new_tokens} new tokens "
                             f"must be in [1, max_seqlen = {self.model.cfg.max_seqlen}]")
        need, total = self._blocks_needed(req), len(self.allocator.free) + sum(len(r.blocks) for r in self.running)
        if need > total:
            raise ValueError(f"request {req.rid} needs {need} KV-cache blocks, the cache has {total}")
        self.waiting.append(req)

    def _blocks_needed(self, req: Request) -> int:
        return -(-(len(req.prompt) + req.max_new_tokens - 1) // self.kvbs)

    def _admit(self) -> None:
        """FCFS: arrived requests take the blocks for their whole length (prompt + new tokens but the
        last, whose k/v are never needed), so a running request never waits for memory."""
        while self.waiting and self.waiting[0].arrival_step <= self.steps and len(self.running) < self.max_batch:
            req = self.waiting[0]
            need = self._blocks_needed(req)
            if need > self.allocator.num_free:
                break
            req.blocks = self.allocator.allocate(need)
            self.running.append(self.waiting.pop(0))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _swap_out(self, req: Request) -> None:
        """Copies the request's blocks to the CPU swap space (every layer) and frees them here."""
        if self.cpu_caches is None:
            pin = self.device.type == "cuda"
            self.cpu_caches = [torch.zeros(c.shape, dtype=c.dtype, pin_memory=pin) for c in self.kv_caches]
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
        """Copies a swapped-out request's blocks back into newly allocated blocks; False if none free."""
        if len(req.blocks) > self.allocator.num_free or len(self.running) >= self.max_batch:
            return False
        blocks = self.allocator.allocate(len(req.blocks))
        mapping = torch.tensor(list(zip(req.blocks, blocks)), dtype=torch.int64)
        for cache, cpu_cache in zip(self.kv_caches, self.cpu_caches):
            Backend.swap_blocks(cpu_cache, cache, mapping)
        self.cpu_allocator.release(req.blocks)
        req.blocks = blocks
        self.running.append(req)
        return True

    def step(self) -> int:
        """One forward over the scheduled batch; returns the number of tokens generated."""
        start = time.perf_counter()
        while self.swapped and self._swap_in(self.swapped[0]):
            self.swapped.pop(0)
        if self.preempt_every and self.steps % self.preempt_every == self.preempt_every - 1:
            decoding = [r for r in self.running if not r.prefilling]
            if decoding:
                self._swap_out(decoding[-1])
        self._admit()
        budget, batch = self.chunk_size, []         # (request, number of new tokens)
        for req in self.running:
            if req.prefilling and budget > 0:
                n = min(len(req.prompt) - req.num_computed, budget)
                batch.append((req, n))
                budget -= n
        num_prefill_seqs = len(batch)
        batch += [(req, 1) for req in self.running if not req.prefilling]
        self.steps += 1
        if not batch:
            return 0

        # a sequence samples when this step reaches its last known token (end of prompt, or a decode)
        sample = [req.num_computed + n == len(req.tokens) for req, n in batch]
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
        ids = sum((req.tokens[c: c + n] for (req, n), c in zip(batch, context_lens)), [])
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(context_lens, query_lens)])
        ends = torch.tensor(query_lens).cumsum(0) - 1
        rows = ends[torch.tensor(sample)]
        return self.model.forward(torch.tensor(ids, device=self.device), positions.to(self.device), self.kv_caches,
                                  md, rows.to(self.device))

    def run(self, requests: list[Request], progress: bool = True) -> dict:
        """Serves `requests` to completion; returns timing stats of this call.

        Steps that carry prompt tokens (the prefill phase, including the decodes batched with them) and
        decode-only steps are timed apart: prefill_seconds / prefill_steps, decode_seconds /
        decode_steps / decode_tokens (tokens generated by decode-only steps)."""
        for req in requests:
            self.add_request(req)
        total = sum(r.max_new_tokens for r in requests)
        first_record, first_step, first_swaps = len(self.history), self.steps, self.num_swaps
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
                    swaps=self.num_swaps - first_swaps,
                    prefill_steps=len(prefill), prefill_seconds=sum(r.seconds for r in prefill),
                    decodes_in_prefill_steps=sum(r.decodes for r in prefill),
                    decode_steps=len(decode), decode_seconds=sum(r.seconds for r in decode),
                    decode_tokens=sum(r.decodes for r in decode))


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
        ids = [r.tokens[p] for r, p in zip(reqs, pos)]
        slots = [r.blocks[p // kvbs] * kvbs + p % kvbs for r, p in zip(reqs, pos)]
        table = torch.zeros(size, self.tables.shape[1], dtype=torch.int32)
        for i, r in enumerate(reqs):
            table[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        pad = size - n
        self.ids[:size].copy_(torch.tensor(ids + [0] * pad), non_blocking=False)
        self.positions[:size].copy_(torch.tensor(pos + [0] * pad))
        self.slots[:size].copy_(torch.tensor(slots + [-1] * pad))
        self.seq_lens[:size].copy_(torch.tensor([p + 1 for p in pos] + [0] * pad, dtype=torch.int32))
        self.tables[:size].copy_(table)
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:n].clone()
        return self.runs[size]()[:n]
