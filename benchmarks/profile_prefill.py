"""One warm prefill call at a benchmark shape, for profilers (ncu, compute-sanitizer).

Contiguous K/V (varlen_prefill) by default; --paged reads them from a paged cache (kv block
--kv-block, shuffled block tables as in bench_paged_prefill.py, --cache-dtype auto|e4m3|e5m2), and
--chunk N makes the call the last N queries of each prompt against the cached context (a chunked
prefill). Phi-3-small layer and pattern, bf16.

    ncu --kernel-name regex:prefill_sm90 --launch-skip 1 --launch-count 1 python3 benchmarks/profile_prefill.py
    ncu ... python3 benchmarks/profile_prefill.py --paged --kv-block 16 --cache-dtype e4m3 --chunk 2048
"""
import argparse

import torch

from blocksparse_attn import ops
from blocksparse_attn.layout import SparsePattern

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}

ap = argparse.ArgumentParser()
ap.add_argument("--seq-len", type=int, default=8192)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--calls", type=int, default=2)
ap.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
ap.add_argument("--paged", action="store_true", help="K/V from a paged cache (paged_prefill)")
ap.add_argument("--kv-block", type=int, default=16)
ap.add_argument("--cache-dtype", choices=["auto", *FP8], default="auto")
ap.add_argument("--chunk", type=int, default=0, help="paged only: the last CHUNK queries of each prompt")
args = ap.parse_args()
dev = args.device
if (args.cache_dtype != "auto" or args.chunk) and not args.paged:
    ap.error("--cache-dtype and --chunk need --paged")
torch.manual_seed(0)
seq_len, batch = args.seq_len, args.batch
tokens = seq_len * batch
pattern = SparsePattern.phi3_small(32)
q = torch.randn(tokens, 32, 128, device=dev, dtype=torch.bfloat16)
k = torch.randn(tokens, 8, 128, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
cu = torch.arange(0, tokens + 1, seq_len, device=dev, dtype=torch.int32)
if not args.paged:
    call = lambda: ops.varlen_prefill(q, k, v, cu, cu, 1 / 128, pattern)
else:
    pages = -(-seq_len // args.kv_block)
    tables = torch.randperm(batch * pages, device=dev).view(batch, pages).to(torch.int32)
    slots = (tables.long()[:, :, None] * args.kv_block + torch.arange(args.kv_block, device=dev)).view(batch, -1)
    slots = slots[:, :seq_len].reshape(-1)
    cache_dtype = FP8.get(args.cache_dtype, torch.bfloat16)
    scale = None if args.cache_dtype == "auto" else torch.tensor(
        [k.abs().max().item() / torch.finfo(cache_dtype).max], device=dev)
    key_cache = torch.empty(batch * pages, 8, args.kv_block, 128, dtype=cache_dtype, device=dev)
    value_cache = torch.empty_like(key_cache)
    ops.write_kv_cache(k, v, key_cache, value_cache, slots, k_scale=scale, v_scale=scale)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=dev)
    chunk = min(args.chunk or seq_len, seq_len)
    rows = torch.cat([torch.arange(r * seq_len + seq_len - chunk, (r + 1) * seq_len, device=dev)
                      for r in range(batch)])
    q = q[rows].contiguous()
    cu_q = torch.arange(0, batch * chunk + 1, chunk, device=dev, dtype=torch.int32)
    call = lambda: ops.paged_prefill(q, key_cache, value_cache, tables, cu_q, seq_lens, 1 / 128, pattern,
                                     k_scale=scale, v_scale=scale)
for _ in range(args.calls):
    call()
if dev == "cuda":
    torch.cuda.synchronize()
print("done")
