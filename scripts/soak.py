"""Soak run of the serving example (issue 21): many requests of log-uniform prompt lengths arriving at
random steps through one engine whose KV cache is too small for them all, so that sequences are
preempted (swapped out to a CPU swap space half the cache's size, or recomputed where that is full),
with chunked prefill and CUDA-graph decode; then every request is served again alone (a batch of one,
eager, the same cache dtype), fed the tokens the soak produced, and must agree logit for logit within
the example's tolerance (a greedy token may differ only at a near-tie: another batching rounds
differently in bfloat16). Nothing may be lost or stuck (a step limit), every cache page must be back in
its pool, and the device memory must come back to its level before the engines. --kv-layout per-kv-head
soaks the one-head pages released as the sequences grow (the same bytes; the re-runs stay shared).

    python scripts/soak.py --device cuda --model phi3-small-128k --num-layers 4 --num-requests 500 \
        --max-prompt 131072 [--kv-cache-dtype fp8] [--kv-layout per-kv-head]
    python scripts/soak.py --device cpu --model tiny-longrope --num-layers 2 --num-requests 12 --max-prompt 300 \
        --chunk-size 128

Prints one `RESULT json {...}` line (requests, prompt and generated tokens, steps, preemptions, swaps,
recomputes, pages released, mismatches, lost, stuck, memory) and exits non-zero on any mismatch, lost or
stuck request, page not returned or leaked device memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from examples.phi3_small_tiny.engine import Engine, Request  # noqa: E402
from examples.phi3_small_tiny.kv_pools import KV_LAYOUTS  # noqa: E402
from examples.phi3_small_tiny.model import Phi3SmallTiny, init_weights  # noqa: E402
from examples.phi3_small_tiny.serve import _agree, logit_tol, make_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, choices=("tiny", "tiny-longrope", "phi3-small", "phi3-small-128k"),
                   help="default: phi3-small-128k on CUDA, tiny-longrope (LongRoPE from 64 to 1024) on the CPU")
    p.add_argument("--num-layers", type=int, default=None,
                   help="default: 4 for the phi3-small models (the soak tests serving, not depth: 32 layers take "
                        "8x as long), all of the tiny ones'")
    p.add_argument("--num-requests", type=int, default=500)
    p.add_argument("--max-prompt", type=int, default=None, help="longest prompt (default: max_seqlen - new tokens)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="new tokens drawn uniformly in [1, this]")
    p.add_argument("--arrival-gap", type=int, default=3, help="engine steps between arrivals, uniform in [0, this]")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV-cache blocks (default: 1.1 x the longest request's: requests queue and running ones "
                        "are preempted)")
    p.add_argument("--swap-blocks", type=int, default=None,
                   help="CPU swap space in blocks (default: half the cache; a longer sequence is recomputed)")
    p.add_argument("--kv-block-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--preempt-every", type=int, default=0,
                   help="also swap a decoding sequence out every N steps, memory or not (0: only under pressure)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--max-steps", type=int, default=None, help="a run longer than this is stuck")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-factors", default=None)
    p.add_argument("--dense-all", action="store_true")
    p.add_argument("--sparse-all", action="store_true")
    p.add_argument("--homo-head", action="store_true")
    p.add_argument("--kv-layout", default="shared", choices=KV_LAYOUTS,
                   help="per-kv-head: one-head pages, the unread ones given back after every step (the same bytes)")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "phi3-small-128k" if args.device.startswith("cuda") else "tiny-longrope"
    if args.num_layers is None and args.model.startswith("phi3-small"):
        args.num_layers = 4
    return args


def draw_requests(args, max_seqlen: int, vocab: int) -> list[Request]:
    g = torch.Generator().manual_seed(args.seed + 7)
    longest = min(args.max_prompt or max_seqlen, max_seqlen - args.max_new_tokens)
    out, step = [], 0
    for i in range(args.num_requests):
        n = int(math.exp(torch.rand(1, generator=g).item() * math.log(longest)))  # log-uniform in [1, longest]
        new = int(torch.randint(1, args.max_new_tokens + 1, (1,), generator=g))
        out.append(Request(rid=i, prompt=torch.randint(vocab, (max(n, 1),), generator=g).tolist(), max_new_tokens=new,
                           arrival_step=step))
        step += int(torch.randint(0, args.arrival_gap + 1, (1,), generator=g))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = make_config(argparse.Namespace(model=args.model, rope_factors=args.rope_factors, num_layers=args.num_layers,
                                         dense_all=args.dense_all, sparse_all=args.sparse_all, homo_head=args.homo_head))
    weights = init_weights(cfg, args.seed, device if device.type == "cuda" else "cpu", dtype)
    model = Phi3SmallTiny(cfg, weights, device=device, dtype=dtype, kv_cache_dtype=args.kv_cache_dtype)
    requests = draw_requests(args, cfg.max_seqlen, cfg.vocab_size)
    need = max(-(-(len(r.prompt) + r.max_new_tokens) // args.kv_block_size) for r in requests)
    num_blocks = args.num_blocks or need * 11 // 10
    swap_blocks = num_blocks // 2 if args.swap_blocks is None else args.swap_blocks
    max_steps = args.max_steps or 20 * sum(-(-len(r.prompt) // args.chunk_size) + r.max_new_tokens for r in requests)

    def memory() -> int:
        if device.type != "cuda":
            return 0
        gc.collect()  # (the engine and its decode graphs reference each other)
        torch.cuda.synchronize(device)
        # cuBLAS keeps a workspace per stream it ran on, from torch's allocator; the graph capture's side
        # streams would leave new ones behind that are no leak of ours
        getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
        return torch.cuda.memory_allocated(device)

    start_memory = memory()
    start = time.perf_counter()
    engine = Engine(model, num_blocks, args.kv_block_size, args.chunk_size, args.max_batch,
                    preempt_every=args.preempt_every, keep_logits=True, seed=args.seed, swap_blocks=swap_blocks,
                    kv_layout=args.kv_layout, longest_request=max(len(r.prompt) + r.max_new_tokens for r in requests))
    for req in requests:
        engine.add_request(req)
    while engine.has_work() and engine.steps < max_steps:
        engine.step()
    stuck = engine.has_work()
    soak_s = time.perf_counter() - start
    swaps, steps = engine.num_swaps, engine.steps
    preemptions, recomputes = engine.num_preemptions, engine.num_recomputes
    released, peak_running = engine.pages_released, engine.peak_running
    all_returned = not stuck and all(pool.all_free for pool in engine.pools)
    del engine
    lost = [r.rid for r in requests if len(r.output) != r.max_new_tokens]

    # every request again, alone and eagerly, fed the soak's tokens
    start = time.perf_counter()
    alone = Engine(model, need + 1, args.kv_block_size, args.chunk_size, 1, use_cuda_graph=False, keep_logits=True,
                   seed=args.seed)
    mismatches, worst, tol = [], 0.0, logit_tol(dtype, args.kv_cache_dtype)
    for req in requests:
        if req.rid in lost:
            continue
        again = Request(rid=req.rid, prompt=req.prompt, max_new_tokens=req.max_new_tokens, forced_output=req.output)
        alone.run([again], progress=False)
        try:
            for t, (tok, got, want) in enumerate(zip(req.output, req.logits, again.logits)):
                worst = max(worst, _agree(req, t, tok, got, want, tol, "its eager run alone"))
        except AssertionError as e:
            mismatches.append((req.rid, str(e)))
    rerun_s = time.perf_counter() - start
    del alone
    end_memory = memory()

    result = dict(model=args.model, num_layers=cfg.num_layers, device=str(device), dtype=str(dtype).removeprefix("torch."),
                  kv_cache_dtype=args.kv_cache_dtype, kv_layout=args.kv_layout, homo_head=args.homo_head,
                  sparse_all=args.sparse_all, requests=len(requests),
                  prompt_tokens=sum(len(r.prompt) for r in requests), longest_prompt=max(len(r.prompt) for r in requests),
                  generated_tokens=sum(len(r.output) for r in requests), num_blocks=num_blocks, swap_blocks=swap_blocks,
                  max_steps=max_steps, steps=steps, preemptions=preemptions, swaps=swaps, recomputes=recomputes,
                  pages_released=released, peak_running=peak_running, pages_returned=all_returned, stuck=stuck,
                  lost=len(lost), mismatches=len(mismatches), max_rel_err=worst,
                  memory_start=start_memory, memory_end=end_memory, soak_s=soak_s, rerun_s=rerun_s)
    for rid, message in mismatches[:5]:
        print(f"mismatch: {message}", file=sys.stderr)
    print("RESULT json " + json.dumps(result), flush=True)
    return int(bool(stuck or lost or mismatches or not all_returned or end_memory != start_memory))


if __name__ == "__main__":
    sys.exit(main())
