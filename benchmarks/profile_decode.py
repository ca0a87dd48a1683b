"""Warm paged_decode calls at a benchmark shape (bench_decode.py's inputs), for profilers (ncu,
compute-sanitizer).

    ncu --kernel-name regex:decode --launch-skip 2 --launch-count 2 python3 benchmarks/profile_decode.py \
        --batch 64 --context 16384 --cache-dtype e4m3
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import HEAD_DIM, NUM_HEADS, make_inputs  # noqa: E402

from blocksparse_attn import ops  # noqa: E402
from blocksparse_attn.layout import SparsePattern  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--context", type=int, default=16384)
ap.add_argument("--cache-dtype", choices=["auto", "e4m3", "e5m2"], default="auto")
ap.add_argument("--calls", type=int, default=3)
args = ap.parse_args()
cache_dtype = {"auto": None, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[args.cache_dtype]
gen = torch.Generator(device="cuda").manual_seed(0)
x = make_inputs(args.batch, args.context, torch.bfloat16, "cuda", gen, dense=False, cache_dtype=cache_dtype)
out = torch.empty_like(x["q"])
for _ in range(args.calls):
    ops.paged_decode(x["q"], x["key_cache"], x["value_cache"], x["block_tables"], x["seq_lens"], 1 / HEAD_DIM,
                     SparsePattern.phi3_small(NUM_HEADS), out=out, k_scale=x["scale"], v_scale=x["scale"])
torch.cuda.synchronize()
print("done")
