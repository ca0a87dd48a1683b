"""One warm prefill call at a benchmark shape, for profilers (ncu, compute-sanitizer).

Contiguous K/V (varlen_prefill) by default; --paged reads them from a paged cache (kv block
--kv-block, shuffled block tables as in bench_paged_prefill.py, --cache-dtype auto|e4m3|e5m2), and
--chunk N makes the call the last N queries of each prompt against the whole context (a chunked
prefill; with --paged, the context in the cache, read directly unless --paged-path says otherwise).
Phi-3-small layer and pattern (--dense-pattern: dense causal, as bench_prefill.py's), bf16.

    ncu --kernel-name regex:prefill_sm90 --launch-skip 1 --launch-count 1 python3 benchmarks/profile_prefill.py
    ncu ... python3 benchmarks/profile_prefill.py --paged --kv-block 16 --cache-dtype e4m3 --chunk 2048
    ncu ... python3 benchmarks/profile_prefill.py --head-major   (k/v stored kv head by kv head, as in pages)
    ncu --kernel-name regex:[Ff]lash ... python3 benchmarks/profile_prefill.py --dense-pattern --method fa4
"""
import argparse
import os

import torch

from blocksparse_attn import ops
from bench_prefill import layer_pattern  # this script's folder
from bench_paged_prefill import FP8, block_tables, filled_cache, fp8_scale, head_major, last_rows  # this script's folder

ap = argparse.ArgumentParser()
ap.add_argument("--seq-len", type=int, default=8192)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--calls", type=int, default=2)
ap.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
ap.add_argument("--paged", action="store_true", help="K/V from a paged cache (paged_prefill)")
ap.add_argument("--kv-block", type=int, default=16)
ap.add_argument("--cache-dtype", choices=["auto", *FP8], default="auto")
ap.add_argument("--chunk", type=int, default=0, help="the last CHUNK queries of each prompt")
ap.add_argument("--paged-path", choices=["direct", "gather", "auto"], default="direct",
                help="BSA_PAGED_PREFILL for --paged: the pages read by the prefill (default), or gathered first")
ap.add_argument("--dense-pattern", action="store_true", help="dense causal: every causal block visible")
ap.add_argument("--in-order-tables", action="store_true", help="paged only: block tables in allocation order")
ap.add_argument("--head-major", action="store_true",
                help="contiguous only: k/v stored kv head by kv head ([Hkv, T, D] viewed as [T, Hkv, D])")
ap.add_argument("--method", choices=["ours", "fa4"], default="ours",
                help="fa4: FlashAttention-4 on the same contiguous inputs (dense causal only), for comparison")
args = ap.parse_args()
dev = args.device
if (args.cache_dtype != "auto" or args.in_order_tables) and not args.paged:
    ap.error("--cache-dtype and --in-order-tables need --paged")
os.environ["BSA_PAGED_PREFILL"] = args.paged_path  # read per call
if args.head_major and args.paged:
    ap.error("--head-major is for contiguous k/v (without --paged)")
if args.method == "fa4" and (args.paged or args.head_major or args.chunk or not args.dense_pattern):
    ap.error("--method fa4 computes dense causal attention of whole prompts over contiguous k/v: it needs "
             "--dense-pattern, without --paged, --head-major or --chunk")
torch.manual_seed(0)
seq_len, batch = args.seq_len, args.batch
tokens = seq_len * batch
pattern = layer_pattern(args.dense_pattern)
q = torch.randn(tokens, 32, 128, device=dev, dtype=torch.bfloat16)
k = torch.randn(tokens, 8, 128, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
cu = torch.arange(0, tokens + 1, seq_len, device=dev, dtype=torch.int32)
if not args.paged:
    if args.head_major:
        k, v = head_major(k), head_major(v)
    call = lambda: ops.varlen_prefill(q, k, v, cu, cu, 1 / 128, pattern)
    if args.chunk:
        rows, cu_q = last_rows(batch, seq_len, min(args.chunk, seq_len), dev)
        q = q[rows].contiguous()
        call = lambda: ops.varlen_prefill(q, k, v, cu_q, cu, 1 / 128, pattern)
    if args.method == "fa4":
        from flash_attn.cute import flash_attn_func

        def bshd(x):
            return x.view(batch, seq_len, x.shape[1], x.shape[2])
        call = lambda: flash_attn_func(bshd(q), bshd(k), bshd(v), softmax_scale=1 / 128, causal=True)
else:
    tables, slots = block_tables(batch, seq_len, args.kv_block, dev, in_order=args.in_order_tables)
    cache_dtype = FP8.get(args.cache_dtype, torch.bfloat16)
    scale = None if args.cache_dtype == "auto" else fp8_scale(k, cache_dtype)
    key_cache, value_cache = filled_cache(k, v, tables, slots, args.kv_block, cache_dtype, scale)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=dev)
    rows, cu_q = last_rows(batch, seq_len, min(args.chunk or seq_len, seq_len), dev)
    q = q[rows].contiguous()
    call = lambda: ops.paged_prefill(q, key_cache, value_cache, tables, cu_q, seq_lens, 1 / 128, pattern,
                                     k_scale=scale, v_scale=scale)
for _ in range(args.calls):
    call()
if dev == "cuda":
    torch.cuda.synchronize()
print("done")
