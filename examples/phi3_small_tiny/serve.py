"""Serve random requests with a Phi-3-small-shaped model on blocksparse_attn; optionally check them.

    python -m examples.phi3_small_tiny.serve --chunk-size 48 --check           # one process, CPU or GPU
    torchrun --nproc-per-node 2 -m examples.phi3_small_tiny.serve --check      # tensor parallel, 2 ranks

(run from the repository root). Requests get random prompts of different lengths and arrive a few
engine steps apart; prompts are prefilled in chunks of --chunk-size tokens, then decoded in batches,
greedily. A progress bar goes to stderr, a tokens/s line to stdout. --check recomputes every request
with the dense-mask float32 reference model (no cache, full recompute per generated token, the
served tokens fed back) and fails unless each logit vector and each greedy token agrees.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from .engine import Engine, Request
from .model import Config, Phi3SmallTiny, ReferencePhi3Small, init_weights

# Error allowed between the served logits and the float32 reference, relative to the largest |logit| of
# the vector. float32: the kernels and the reference sum in different orders (observed ~1e-6); half
# precision: a few times the rounding of a residual stream carried through 4 layers in that dtype.
# Observed on the CPU with the defaults: float32 1.1e-6, float16 3.0e-3, bfloat16 2.5e-2.
LOGIT_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_requests(cfg: Config, num: int, min_prompt: int, max_prompt: int, max_new_tokens: int,
                  arrival_every: int, seed: int) -> list[Request]:
    g = torch.Generator().manual_seed(seed + 1)
    lens = torch.randint(min_prompt, max_prompt + 1, (num,), generator=g).tolist()
    return [Request(rid=i, prompt=torch.randint(cfg.vocab_size, (n,), generator=g).tolist(),
                    max_new_tokens=max_new_tokens, arrival_step=i * arrival_every) for i, n in enumerate(lens)]


def check_against_reference(cfg: Config, weights: dict, requests: list[Request], dtype: torch.dtype,
                            sparse: bool = True, per_step: bool = True) -> float:
    """Asserts every served logit vector matches the reference's within LOGIT_TOL[dtype] (relative to the
    vector's largest |logit|) and every greedy token equals the reference's argmax unless the reference's
    top two are closer than the tolerance (a tie the two summation orders may break differently).
    per_step: each generated token is a full recompute over prompt + the served tokens before it (as a
    cacheless engine would); otherwise one forward over prompt + all served tokens gives them all (the
    same numbers: the model is causal, so row p depends only on tokens 0..p). Returns the largest
    relative error seen."""
    ref = ReferencePhi3Small(cfg, weights, sparse=sparse)
    threads = torch.get_num_threads()
    # One thread: the reference's many small ops gain nothing from more, and on a busy 2-core machine
    # lose many times over to threads waiting on each other.
    torch.set_num_threads(1)
    try:
        return _check(ref, requests, LOGIT_TOL[dtype], per_step)
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
            scale = want.abs().max().item()
            err = (got.float() - want).abs().max().item() / scale
            worst = max(worst, err)
            assert err <= tol, (f"request {req.rid} (prompt {len(req.prompt)}) token {t}: logits differ from the "
                                f"reference by {err:.2e} of max |logit| (tolerance {tol:.0e})")
            top2 = want.topk(2).values
            assert tok == int(want.argmax()) or (top2[0] - top2[1]).item() <= tol * scale, (
                f"request {req.rid} token {t}: served {tok}, reference argmax {int(want.argmax())}")
    return worst


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.phi3_small_tiny.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "phi3-small"), default="tiny",
                   help="tiny: 8 q / 2 kv heads, D=64, 4 layers (CPU-sized); phi3-small: the real shape (GPU)")
    p.add_argument("--num-requests", type=int, default=6)
    p.add_argument("--min-prompt", type=int, default=40)
    p.add_argument("--max-prompt", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--arrival-every", type=int, default=2, help="engine steps between request arrivals")
    p.add_argument("--chunk-size", type=int, default=64, help="prompt tokens per engine step (chunked prefill)")
    p.add_argument("--kv-block-size", type=int, default=16, help="tokens per paged KV-cache block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache blocks (default: enough for all)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences running at once")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA too")
    p.add_argument("--preempt-every", type=int, default=0, metavar="N",
                   help="every N steps swap a decoding sequence out to a CPU cache and back (swap_blocks)")
    p.add_argument("--pad-decode", action="store_true",
                   help="decode-only steps through the CUDA-graph path's padded buffers, without capture")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--check", action="store_true", help="compare with the dense-mask float32 reference")
    args = p.parse_args(argv)
    if args.chunk_size < 1 or args.num_requests < 1 or not 1 <= args.min_prompt <= args.max_prompt:
        p.error("need --chunk-size >= 1, --num-requests >= 1 and 1 <= --min-prompt <= --max-prompt")
    return args


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
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = Config.tiny() if args.model == "tiny" else Config.phi3_small()
    weights = init_weights(cfg, args.seed)
    model = Phi3SmallTiny(cfg, weights, tp_size=world, tp_rank=rank, device=device, dtype=dtype)
    requests = make_requests(cfg, args.num_requests, args.min_prompt, args.max_prompt, args.max_new_tokens,
                             args.arrival_every, args.seed)
    need = sum(-(-(len(r.prompt) + r.max_new_tokens) // args.kv_block_size) for r in requests)
    engine = Engine(model, args.num_blocks or need, args.kv_block_size, args.chunk_size, args.max_batch,
                    use_cuda_graph=device.type == "cuda" and not args.no_cuda_graph, pad_decode=args.pad_decode,
                    preempt_every=args.preempt_every,
                    keep_logits=args.check,
                    seed=args.seed)
    lead = rank == 0
    if lead:
        print(f"model: {args.model}, {cfg.num_layers} layers ({'/'.join('dense' if cfg.is_dense(i) else 'sparse' for i in range(cfg.num_layers))}), "
              f"q heads {cfg.num_heads}, kv heads {cfg.num_kv_heads}, head dim {cfg.head_dim}; "
              f"tp {world}, device {device} (torch threads per rank: {torch.get_num_threads()}), "
              f"{str(dtype).removeprefix('torch.')}, CUDA graphs "
              f"{'on' if engine.graphs else 'off'}")
        print(f"requests: {len(requests)}, prompt lengths {[len(r.prompt) for r in requests]}, "
              f"{args.max_new_tokens} new tokens each, chunk {args.chunk_size}")
    stats = engine.run(requests, progress=lead and not args.no_progress)
    status = 0
    if lead:
        print(f"{stats['generated_tokens']} tokens generated ({stats['prompt_tokens']} prompt tokens) in "
              f"{stats['steps']} steps ({stats['swaps']} swaps), {stats['seconds']:.2f} s: "
              f"{stats['generated_tokens'] / stats['seconds']:.1f} generated tokens/s, "
              f"{(stats['generated_tokens'] + stats['prompt_tokens']) / stats['seconds']:.1f} tokens/s in all")
        if args.check:
            try:
                worst = check_against_reference(cfg, weights, requests, dtype)
                print(f"check: every token and logit matches the dense-mask reference "
                      f"(max rel err {worst:.1e}, tol {LOGIT_TOL[dtype]:.0e}) OK")
            except AssertionError as e:
                print(f"check FAILED: {e}", file=sys.stderr)
                status = 1
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
