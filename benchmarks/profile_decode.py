"""Warm paged_decode calls at a benchmark shape (bench_decode.py's inputs), for profilers (ncu,
compute-sanitizer).

    ncu --kernel-name regex:decode --launch-skip 2 --launch-count 2 python3 benchmarks/profile_decode.py \
        --batch 64 --context 16384 --cache-dtype e4m3

With --graph-calls N the calls (and with --sdpa dense SDPA's, after them) are replayed from CUDA graphs of
N calls each, as bench_decode.py --graph times them: a timeline profiler (nsys) then shows each kernel's
time and the gaps between them inside a graph.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import HEAD_DIM, NUM_HEADS, graphed, make_inputs  # noqa: E402

from blocksparse_attn import ops  # noqa: E402
from blocksparse_attn.layout import SparsePattern  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--context", type=int, default=16384)
ap.add_argument("--cache-dtype", choices=["auto", "e4m3", "e5m2"], default="auto")
ap.add_argument("--calls", type=int, default=3)
ap.add_argument("--graph-calls", type=int, default=0, help="replay the calls from CUDA graphs of this many calls")
ap.add_argument("--sdpa", action="store_true", help="also run dense SDPA on the same shape (after ours)")
args = ap.parse_args()
cache_dtype = {"auto": None, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[args.cache_dtype]
gen = torch.Generator(device="cuda").manual_seed(0)
x = make_inputs(args.batch, args.context, torch.bfloat16, "cuda", gen, dense=args.sdpa, cache_dtype=cache_dtype)
out = torch.empty_like(x["q"])
pattern = SparsePattern.phi3_small(NUM_HEADS)
methods = [lambda: ops.paged_decode(x["q"], x["key_cache"], x["value_cache"], x["block_tables"], x["seq_lens"],
                                    1 / HEAD_DIM, pattern, out=out, k_scale=x["scale"], v_scale=x["scale"])]
if args.sdpa:
    methods.append(lambda: torch.nn.functional.scaled_dot_product_attention(
        x["q4"], x["k4"], x["v4"], scale=1 / HEAD_DIM, enable_gqa=True))
for fn in methods:
    if args.graph_calls:
        fn = graphed(fn, args.graph_calls)
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()
print("done")
