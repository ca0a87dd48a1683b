"""One warm varlen_prefill call at a benchmark shape, for profilers (ncu, compute-sanitizer).

    ncu --kernel-name regex:prefill_sm80 --launch-skip 1 --launch-count 1 python3 benchmarks/profile_prefill.py
"""
import argparse

import torch

from blocksparse_attn import ops
from blocksparse_attn.layout import SparsePattern

ap = argparse.ArgumentParser()
ap.add_argument("--seq-len", type=int, default=8192)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--calls", type=int, default=2)
args = ap.parse_args()
torch.manual_seed(0)
tokens = args.seq_len * args.batch
q = torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
cu = torch.arange(0, tokens + 1, args.seq_len, device="cuda", dtype=torch.int32)
for _ in range(args.calls):
    ops.varlen_prefill(q, k, v, cu, cu, 1 / 128, SparsePattern.phi3_small(32))
torch.cuda.synchronize()
print("done")
