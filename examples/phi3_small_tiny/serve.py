"""Serve random requests with a Phi-3-small-shaped model on blocksparse_attn; optionally check them.

    python -m examples.phi3_small_tiny.serve --chunk-size 48 --check           # one process, CPU or GPU
    torchrun --nproc-per-node 2 -m examples.phi3_small_tiny.serve --check      # tensor parallel, 2 ranks
    python -m examples.phi3_small_tiny.serve --model phi3-small --num-layers 4 --num-requests 32 \
        --min-prompt 2048 --max-prompt 2048 --max-new-tokens 256 --arrival-every 0 --max-batch 32 \
        --chunk-size 8192 --warmup-requests 4 --init-on-device [--dense-all]       # throughput, one GPU

(run from the repository root). Requests get random prompts of different lengths and arrive a few
engine steps apart; prompts are prefilled in chunks of --chunk-size tokens, then decoded in batches,
greedily. A progress bar (tqdm's; none where tqdm is not installed) goes to stderr, a tokens/s line
to stdout, and last a line `RESULT json {...}` with the configuration and the timings. --check
recomputes every request with the dense-mask float32 reference model (no cache, full recompute per
generated token, the served tokens fed back) and fails unless each logit vector and each greedy
token agrees.
The KV cache holds all requests at once unless --num-blocks or (CUDA) --gpu-memory-fraction say
otherwise; a smaller one makes the engine preempt sequences (swapped to --swap-space, or recomputed),
counted in the RESULT line as preemptions / swaps / recomputes. --kv-layout per-kv-head spends the same
bytes on pages of one kv head, a pool per layer pattern, and gives back after every step the pages no
later query reads (examples/phi3_small_tiny/kv_pools.py); the RESULT line then has each pool's pages and
peak use, pages_released and peak_running (the most sequences with their cache on the device at once).
--compare-eager serves the same requests again in one process, one rank, no CUDA graphs, fed the
served tokens, and fails unless the logits and tokens agree (checks CUDA-graph decode against eager
decode, and tensor parallelism against one rank).

Timing: the timed run excludes drawing the weights and loading the model (setup_s), allocating the
cache and capturing the CUDA graphs (capture_s) and the --warmup-requests (warmup_s); they are
reported apart. prefill = the steps that carry prompt tokens (with the decodes batched into them),
decode = the decode-only steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from .engine import Engine, Request, blocks_for_memory, cache_block_bytes
from .kv_pools import KV_LAYOUTS
from .model import Config, Phi3SmallTiny, ReferencePhi3Small, init_weights

# Error allowed between the served logits and the float32 reference, relative to the largest |logit| of
# the vector. float32: the kernels and the reference sum in different orders (observed ~1e-6); half
# precision: a few times the rounding of a residual stream carried through 4 layers in that dtype.
# Observed on the CPU with the defaults: float32 1.1e-6, float16 3.0e-3, bfloat16 2.5e-2.
LOGIT_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
# With an fp8 cache the reference quantizes its own float32 K/V: where the model's K differs from it in the
# last bits (another summation order, as also between two batchings of the served model), an element can
# round to the neighbouring fp8 value (1/8 of it for e4m3, 1/4 for e5m2), and a flip in one layer moves
# the next layers' inputs. Observed on the CPU in
# float32 (6 requests, 4 layers): up to 1.6e-3 (e4m3) and 5.9e-3 (e5m2); against an unquantized reference
# the same runs differ by 4.5e-2 (e4m3) and more.
FP8_LOGIT_TOL = {"e4m3": 5e-3, "e5m2": 2e-2}


def logit_tol(dtype: torch.dtype, kv_cache_dtype: str = "auto") -> float:
    if kv_cache_dtype == "auto":
        return LOGIT_TOL[dtype]
    return max(LOGIT_TOL[dtype], FP8_LOGIT_TOL["e5m2" if kv_cache_dtype.endswith("e5m2") else "e4m3"])
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_requests(cfg: Config, num: int, min_prompt: int, max_prompt: int, max_new_tokens: int,
                  arrival_every: int, seed: int) -> list[Request]:
    g = torch.Generator().manual_seed(seed + 1)
    lens = torch.randint(min_prompt, max_prompt + 1, (num,), generator=g).tolist()
    return [Request(rid=i, prompt=torch.randint(cfg.vocab_size, (n,), generator=g).tolist(),
                    max_new_tokens=max_new_tokens, arrival_step=i * arrival_every) for i, n in enumerate(lens)]


def check_against_reference(cfg: Config, weights: dict, requests: list[Request], dtype: torch.dtype,
                            sparse: bool = True, per_step: bool = True, kv_cache_dtype: str = "auto",
                            kv_scale: float = 1.0) -> float:
    """Asserts every served logit vector matches the reference's within logit_tol (relative to the
    vector's largest |logit|) and every greedy token equals the reference's argmax unless the reference's
    top two are closer than the tolerance (a tie the two summation orders may break differently).
    per_step: each generated token is a full recompute over prompt + the served tokens before it (as a
    cacheless engine would); otherwise one forward over prompt + all served tokens gives them all (the
    same numbers: the model is causal, so row p depends only on tokens 0..p). Returns the largest
    relative error seen. With an fp8 cache the reference quantizes K and V the same way.
    """
    ref = ReferencePhi3Small(cfg, weights, sparse=sparse, kv_cache_dtype=kv_cache_dtype, kv_scale=kv_scale)
    threads = torch.get_num_threads()
    # One thread: the reference's many small ops gain nothing from more, and on a busy 2-core machine
    # lose many times over to threads waiting on each other.
    torch.set_num_threads(1)
    try:
        return _check(ref, requests, logit_tol(dtype, kv_cache_dtype), per_step)
    finally:
        torch.set_num_threads(threads)


def _check(ref: ReferencePhi3Small, requests: list[Request], tol: float, per_step: bool) -> float:
    worst = 0.0
    for req in requests:
        assert len(req.logits) == len(req.output) == req.max_new_tokens, f"request {req.rid} incomplete"
        if not per_step:
            every = ref.forward(torch.tensor(req.tokens[:-1]))[len(req.prompt) - 1:]
        for t, (tok, got) in enumerate(zip(req.output, req.logits)):
            want = ref.forward(torch.tensor(req.tokens[: len(req.prompt) + t]))[-1] if per_step else every[t]
            worst = max(worst, _agree(req, t, tok, got, want, tol, "the reference"))
    return worst


def _agree(req: Request, t: int, tok: int, got: torch.Tensor, want: torch.Tensor, tol: float, other: str) -> float:
    """Asserts that token t's logits `got` are within tol of `want` (relative to want's largest |logit|) and
    that the served token is want's argmax or a near-tie; returns the relative error."""
    scale = want.abs().max().item()
    err = (got.float() - want.float()).abs().max().item() / scale
    assert err <= tol, (f"request {req.rid} (prompt {len(req.prompt)}) token {t}: logits differ from {other} "
                        f"by {err:.2e} of max |logit| (tolerance {tol:.0e})")
    top2 = want.float().topk(2).values
    assert tok == int(want.argmax()) or (top2[0] - top2[1]).item() <= tol * scale, (
        f"request {req.rid} token {t}: served {tok}, {other}'s argmax {int(want.argmax())}")
    return err


def compare_with_eager(model: Phi3SmallTiny, requests: list[Request], args: argparse.Namespace,
                       num_blocks: int, swap_blocks: int | None = None, longest_request: int | None = None) -> float:
    """Serves `requests` again on `model` (one rank) with eager decode, each fed its served tokens, and
    asserts every logit vector and token agrees within LOGIT_TOL; returns the largest relative error."""
    again = [Request(rid=r.rid, prompt=r.prompt, max_new_tokens=r.max_new_tokens,
                     arrival_step=i * args.arrival_every, forced_output=r.output) for i, r in enumerate(requests)]
    engine = Engine(model, num_blocks, args.kv_block_size, args.chunk_size, args.max_batch, use_cuda_graph=False,
                    keep_logits=True, seed=args.seed, swap_blocks=swap_blocks, kv_layout=args.kv_layout,
                    longest_request=longest_request)
    engine.run(again, progress=False)
    worst, tol = 0.0, logit_tol(model.dtype, model.kv_cache_dtype)  # fp8: K/V rounded in other batches
    for a, b in zip(requests, again):
        assert len(a.logits) == len(b.logits) == a.max_new_tokens, f"request {a.rid} incomplete"
        for t, (tok, got, want) in enumerate(zip(a.output, a.logits, b.logits)):
            worst = max(worst, _agree(a, t, tok, got, want, tol, "the eager one-rank run"))
    return worst


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.phi3_small_tiny.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "tiny-longrope", "phi3-small", "phi3-small-128k"), default="tiny",
                   help="tiny: 8 q / 2 kv heads, D=64, 4 layers (CPU-sized); tiny-longrope: the same with LongRoPE "
                        "from 64 to 1024 positions; phi3-small: the real shape, 32 layers (GPU); phi3-small-128k: "
                        "its 128k variant (LongRoPE from 8192 to 131072 positions)")
    p.add_argument("--rope-factors", default=None, metavar="JSON",
                   help="LongRoPE factors {\"short_factor\": [...], \"long_factor\": [...]} (head_dim / 2 each); "
                        "default: a fixed plausible set (model.longrope_factors)")
    p.add_argument("--num-layers", type=int, default=None, help="override the model's number of layers")
    layers = p.add_mutually_exclusive_group()
    layers.add_argument("--dense-all", action="store_true",
                        help="every layer dense (the same backend with vert_stride 1), instead of alternating "
                             "block-sparse and dense layers as Phi-3-small")
    layers.add_argument("--sparse-all", action="store_true",
                        help="every layer block-sparse (no dense layers): half of Phi-3-small's layers are dense, "
                             "which caps what --kv-layout per-kv-head saves at 2 / (1 + kept fraction)")
    p.add_argument("--homo-head", action="store_true",
                   help="the sparse layers' heads all read the same vertical columns (homo_head=True) instead of "
                        "sliding them by head; the reference uses the same pattern")
    p.add_argument("--num-requests", type=int, default=6)
    p.add_argument("--min-prompt", type=int, default=40)
    p.add_argument("--max-prompt", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--arrival-every", type=int, default=2, help="engine steps between request arrivals")
    p.add_argument("--chunk-size", type=int, default=64, help="prompt tokens per engine step (chunked prefill)")
    p.add_argument("--kv-block-size", type=int, default=16, help="tokens per paged KV-cache block")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"), default="auto",
                   help="auto: K/V in the model dtype; fp8*: quantized with one per-tensor scale (--kv-scale)")
    p.add_argument("--kv-scale", type=float, default=1.0,
                   help="the fp8 cache's K and V scale (stored = fp8(x / scale)); the random weights' K/V "
                        "stay well inside e4m3's range at 1")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV-cache blocks (default: enough for all requests at once, or as --gpu-memory-fraction says); "
                        "with --kv-layout per-kv-head the same bytes in one-head pages")
    p.add_argument("--kv-layout", choices=KV_LAYOUTS, default="shared",
                   help="shared: a page holds all kv heads (vLLM's blocks); per-kv-head: a page holds one kv head, a "
                        "pool per layer pattern, and pages no later query reads are given back after every step")
    p.add_argument("--gpu-memory-fraction", type=float, default=None, metavar="F",
                   help="CUDA, without --num-blocks: size the cache to what weights and a profiled prefill chunk "
                        "leave of F x the GPU's memory (vLLM's gpu_memory_utilization); with torchrun the "
                        "smallest rank's count")
    p.add_argument("--swap-space", type=float, default=None, metavar="GIB",
                   help="CPU swap space for preempted sequences, in GiB (default: as large as the cache, at most "
                        "16 GiB); a sequence that does not fit is recomputed instead")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences running at once")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA too")
    p.add_argument("--preempt-every", type=int, default=0, metavar="N",
                   help="every N steps swap a decoding sequence out to a CPU cache and back (swap_blocks)")
    p.add_argument("--pad-decode", action="store_true",
                   help="decode-only steps through the CUDA-graph path's padded buffers, without capture")
    p.add_argument("--warmup-requests", type=int, default=0, metavar="N",
                   help="serve N untimed requests (--max-prompt tokens, up to 4 new tokens) before the timed run")
    p.add_argument("--init-on-device", action="store_true",
                   help="draw the random weights on --device in --dtype (fast for phi3-small; other values than "
                        "the CPU's draw; with torchrun, rank 0's are broadcast)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none without tqdm)")
    p.add_argument("--check", action="store_true", help="compare with the dense-mask float32 reference")
    p.add_argument("--compare-eager", action="store_true",
                   help="serve the requests again on one rank with eager decode (no CUDA graphs, no padding), fed "
                        "the served tokens, and compare logits and tokens")
    args = p.parse_args(argv)
    if args.chunk_size < 1 or args.num_requests < 1 or not 1 <= args.min_prompt <= args.max_prompt:
        p.error("need --chunk-size >= 1, --num-requests >= 1 and 1 <= --min-prompt <= --max-prompt")
    if (args.num_layers is not None and args.num_layers < 1) or args.warmup_requests < 0:
        p.error("need --num-layers >= 1 and --warmup-requests >= 0")
    if args.gpu_memory_fraction is not None and not 0 < args.gpu_memory_fraction <= 1:
        p.error(f"--gpu-memory-fraction must be in (0, 1], got {args.gpu_memory_fraction}")
    return args


def make_config(args: argparse.Namespace) -> Config:
    factors = None
    if args.rope_factors:
        with open(args.rope_factors) as f:
            factors = json.load(f)
    if args.model == "phi3-small-128k":
        cfg = Config.phi3_small_128k(factors)
    elif args.model == "tiny-longrope":  # LongRoPE past 64 positions, up to 1024: long prompts at CPU size
        cfg = Config.tiny().with_longrope(1024, 64, factors)
    else:
        cfg = Config.tiny() if args.model == "tiny" else Config.phi3_small()
    if args.num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=args.num_layers)
    if args.dense_all:
        cfg = dataclasses.replace(cfg, dense_every=1)
    if args.sparse_all:
        cfg = dataclasses.replace(cfg, dense_every=0)
    if args.homo_head:
        cfg = dataclasses.replace(cfg, homo_head=True)
    return cfg


def blocks_for(requests: list[Request], kv_block_size: int) -> int:
    return sum(-(-(len(r.prompt) + r.max_new_tokens) // kv_block_size) for r in requests)


SWAP_SPACE_CAP_GIB = 16.0  # default swap space at most: pinned host memory, on machines with ~128 GiB


def swap_blocks_for(model: Phi3SmallTiny, num_blocks: int, kv_block_size: int, swap_space_gib: float | None) -> int:
    """Blocks of CPU swap space: --swap-space GiB, else the cache's size capped at SWAP_SPACE_CAP_GIB."""
    per_block = cache_block_bytes(model, kv_block_size)
    if swap_space_gib is None:
        return min(num_blocks, int(SWAP_SPACE_CAP_GIB * 2**30 // per_block))
    return int(swap_space_gib * 2**30 // per_block)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world > 1:  # launched by torchrun: one rank per process, heads split across ranks
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    backend = dist.get_backend() if world > 1 else None
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = make_config(args)
    lead = rank == 0

    start = time.perf_counter()
    if args.init_on_device:
        weights = init_weights(cfg, args.seed, device, dtype)
        if world > 1:  # one draw for all ranks, whatever their generators do
            for t in weights.values():
                dist.broadcast(t, src=0)
    else:
        weights = init_weights(cfg, args.seed)
    kv = dict(kv_cache_dtype=args.kv_cache_dtype, kv_scale=args.kv_scale)
    model = Phi3SmallTiny(cfg, weights, tp_size=world, tp_rank=rank, device=device, dtype=dtype, **kv)
    if not (args.check or args.compare_eager):
        del weights  # the model holds what it needs (views of these where no copy was made)
    _sync(device)
    setup_s = time.perf_counter() - start

    requests = make_requests(cfg, args.num_requests, args.min_prompt, args.max_prompt, args.max_new_tokens,
                             args.arrival_every, args.seed)
    warmup = make_requests(cfg, args.warmup_requests, args.max_prompt, args.max_prompt,
                           min(args.max_new_tokens, 4), 0, args.seed + 1000) if args.warmup_requests else []
    start = time.perf_counter()
    if args.num_blocks:
        num_blocks = args.num_blocks
    elif args.gpu_memory_fraction is not None and device.type == "cuda":
        num_blocks = blocks_for_memory(model, args.gpu_memory_fraction, args.kv_block_size, args.chunk_size)
        if world > 1:  # every rank must schedule alike
            count = torch.tensor([num_blocks], device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            num_blocks = int(count)
    else:  # (the CPU ignores --gpu-memory-fraction)
        num_blocks = max(blocks_for(requests, args.kv_block_size), blocks_for(warmup, args.kv_block_size))
    swap_blocks = swap_blocks_for(model, num_blocks, args.kv_block_size, args.swap_space)
    longest = max(len(r.prompt) + r.max_new_tokens for r in requests + warmup)
    engine = Engine(model, num_blocks, args.kv_block_size, args.chunk_size, args.max_batch,
                    use_cuda_graph=device.type == "cuda" and not args.no_cuda_graph, pad_decode=args.pad_decode,
                    preempt_every=args.preempt_every, keep_logits=args.check or args.compare_eager, seed=args.seed,
                    swap_blocks=swap_blocks, kv_layout=args.kv_layout, longest_request=longest)
    _sync(device)
    capture_s = time.perf_counter() - start
    cuda_graphs = bool(engine.graphs and engine.graphs.graphs)
    layers = "/".join("dense" if cfg.is_dense(i) else "sparse" for i in range(cfg.num_layers))
    if lead:
        lens = [len(r.prompt) for r in requests]
        print(f"model: {args.model}, {cfg.num_layers} layers ({_short(layers)}), "
              f"q heads {cfg.num_heads}, kv heads {cfg.num_kv_heads}, head dim {cfg.head_dim}; "
              f"tp {world}{f' ({backend})' if backend else ''}, device {device} (torch threads per rank: "
              f"{torch.get_num_threads()}), {str(dtype).removeprefix('torch.')}, KV cache "
              f"{str(model.cache_dtype).removeprefix('torch.')}, CUDA graphs "
              f"{'on' if cuda_graphs else 'off'}")
        print(f"requests: {len(requests)}, prompt lengths {lens if len(lens) <= 8 else f'{min(lens)}..{max(lens)}'}, "
              f"{args.max_new_tokens} new tokens each, chunk {args.chunk_size}, max batch {args.max_batch}")
        print(_describe_cache(engine, model, cfg, longest))

    start = time.perf_counter()
    if warmup:
        engine.run(warmup, progress=False)
    warmup_s = time.perf_counter() - start
    for req in requests:  # arrival steps count from the start of the timed run
        req.arrival_step += engine.steps
    stats = engine.run(requests, progress=lead and not args.no_progress)
    pools = [pool.describe() for pool in engine.pools]  # with this run's peaks
    # The cache and the decode graphs go before the checks: --compare-eager allocates a cache as large (all
    # of the GPU's share with --gpu-memory-fraction), and with tensor parallelism the graphs captured NCCL
    # all-reduces, which must not outlive the communicator (tearing NCCL down under live graphs left the
    # 2-GPU run hanging after its last line).
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    status = 0
    if lead:
        generated, prompt, seconds = stats["generated_tokens"], stats["prompt_tokens"], stats["seconds"]
        print(f"{generated} tokens generated ({prompt} prompt tokens) in "
              f"{stats['steps']} steps ({stats['preemptions']} preemptions, {stats['swaps']} swaps, "
              f"{stats['recomputes']} recomputes; at most {stats['peak_running']} sequences running, "
              f"{stats['pages_released']} pages released), {seconds:.2f} s: "
              f"{generated / seconds:.1f} generated tokens/s, {(generated + prompt) / seconds:.1f} tokens/s in all")
        print(f"prefill: {stats['prefill_steps']} steps, {stats['prefill_seconds']:.3f} s, "
              f"{_rate(prompt, stats['prefill_seconds']):.1f} prompt tokens/s; decode: {stats['decode_steps']} "
              f"decode-only steps, {stats['decode_seconds']:.3f} s, "
              f"{_rate(stats['decode_tokens'], stats['decode_seconds']):.1f} tokens/s; "
              f"untimed: setup {setup_s:.2f} s, cache + graph capture {capture_s:.2f} s, warm-up {warmup_s:.2f} s")
        result = dict(
            model=args.model, num_layers=cfg.num_layers, layers=layers, dense_all=args.dense_all,
            sparse_all=args.sparse_all, homo_head=args.homo_head,
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            hidden_size=cfg.hidden_size, sparse_block_size=cfg.sparse_block_size, local_blocks=cfg.local_blocks,
            vert_stride=cfg.vert_stride, max_seqlen=cfg.max_seqlen, rope_original_max=cfg.rope_original_max or None,
            dtype=str(dtype).removeprefix("torch."), device=str(device),
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, tp=world,
            dist_backend=backend, cuda_graphs=cuda_graphs, num_requests=len(requests),
            min_prompt=args.min_prompt, max_prompt=args.max_prompt, max_new_tokens=args.max_new_tokens,
            arrival_every=args.arrival_every, chunk_size=args.chunk_size, kv_block_size=args.kv_block_size,
            kv_cache_dtype=args.kv_cache_dtype, kv_scale=args.kv_scale if args.kv_cache_dtype != "auto" else None,
            max_batch=args.max_batch, num_blocks=num_blocks, swap_blocks=swap_blocks,
            gpu_memory_fraction=args.gpu_memory_fraction if not args.num_blocks else None,
            kv_cache_gib=num_blocks * cache_block_bytes(model, args.kv_block_size) / 2**30,
            kv_layout=args.kv_layout, kv_pools=pools, pages_released=stats["pages_released"],
            peak_running=stats["peak_running"],
            warmup_requests=len(warmup),
            prompt_tokens=prompt, generated_tokens=generated, output_digest=_output_digest(requests),
            steps=stats["steps"], wall_s=seconds,
            preemptions=stats["preemptions"], swaps=stats["swaps"], recomputes=stats["recomputes"],
            prefill_steps=stats["prefill_steps"], prefill_s=stats["prefill_seconds"],
            decodes_in_prefill_steps=stats["decodes_in_prefill_steps"],
            prefill_tokens_per_s=_rate(prompt, stats["prefill_seconds"]),
            decode_steps=stats["decode_steps"], decode_s=stats["decode_seconds"],
            decode_tokens=stats["decode_tokens"], decode_tokens_per_s=_rate(stats["decode_tokens"],
                                                                             stats["decode_seconds"]),
            generated_tokens_per_s=_rate(generated, seconds), total_tokens_per_s=_rate(generated + prompt, seconds),
            setup_s=setup_s, capture_s=capture_s, warmup_s=warmup_s,
            max_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            timed="wall_s excludes setup_s (weights, model load), capture_s (KV cache, CUDA graph capture) and "
                  "warmup_s; prefill = steps carrying prompt tokens, decode = decode-only steps")
        def verify(key: str, label: str, run, passed: str) -> int:
            """Runs one correctness check, prints its verdict, records it in result; 1 if it failed."""
            try:
                worst = run()
            except AssertionError as e:
                print(f"{label} FAILED: {e}", file=sys.stderr)
                result[key] = "FAILED"
                return 1
            tol = logit_tol(dtype, args.kv_cache_dtype)
            print(f"{label}: {passed} (max rel err {worst:.1e}, tol {tol:.0e}) OK")
            result.update({key: "ok", f"{key}_max_rel_err": worst})
            return 0

        if args.check:
            status |= verify("check", "check", lambda: check_against_reference(cfg, weights, requests, dtype, **kv),
                             "every token and logit matches the dense-mask reference")
        if args.compare_eager:
            single = model if world == 1 else Phi3SmallTiny(cfg, weights, device=device, dtype=dtype, **kv)
            what = f"tp {world}, CUDA graphs {'on' if cuda_graphs else 'off'}"
            status |= verify("compare_eager", f"compare-eager ({what})",
                             lambda: compare_with_eager(single, requests, args, num_blocks, swap_blocks, longest),
                             "matches one rank with eager decode")
        print("RESULT json " + json.dumps(result), flush=True)
    if world > 1:
        _sync(device)
        dist.barrier()
        dist.destroy_process_group()
    return status


def _describe_cache(engine: Engine, model: Phi3SmallTiny, cfg: Config, longest: int) -> str:
    """A line on the cache: the shared blocks, or how the same bytes were split into per-kv-head pools."""
    def size(n: int) -> str:
        unit = next(u for u in (3, 2, 1, 0) if n >= 2 ** (10 * u) or u == 0)
        return f"{n / 2 ** (10 * unit):.{2 if unit else 0}f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"

    block = cache_block_bytes(model, engine.kvbs)
    shared = (f"{engine.num_blocks} blocks x {size(block)} (all {cfg.num_layers} layers) = "
              f"{size(engine.num_blocks * block)}")
    if engine.kv_layout == "shared":
        return f"KV cache: {shared}, shared pages"
    pools = "; ".join(f"{p.name} (layers {_ranges(p.layers)}, keeps {p.kept_fraction:.1%} of pages at {longest} "
                      f"tokens): {p.num_pages} pages x {size(p.page_bytes)} x {len(p.layers)} layers = "
                      f"{size(p.num_pages * p.page_bytes * len(p.layers))}" for p in engine.pools)
    return f"KV cache: per-kv-head pages, the bytes of {shared} split by layers x kept fraction: {pools}"


def _ranges(layers: list[int]) -> str:
    """'0,2,...,30' for many layers."""
    return ",".join(map(str, layers)) if len(layers) <= 4 else f"{layers[0]},{layers[1]},...,{layers[-1]}"


def _output_digest(requests) -> str:
    """sha1 of every request's generated tokens, in request order: two runs of the same requests (cache
    layouts, cache dtypes, batch sizes) generated the same tokens iff their digests are equal."""
    digest = hashlib.sha1()
    for req in sorted(requests, key=lambda r: r.rid):
        digest.update(f"{req.rid}:{','.join(map(str, req.output))};".encode())
    return digest.hexdigest()[:16]


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _short(layers: str) -> str:
    """'sparse/dense/sparse/dense/...' for many layers."""
    parts = layers.split("/")
    return layers if len(parts) <= 4 else "/".join(parts[:4]) + f"/... ({parts.count('sparse')} sparse)"


if __name__ == "__main__":
    sys.exit(main())
