"""Decode benchmark: our block-sparse paged_decode (Phi-3-small pattern) against dense decode.

Device-agnostic. For every (batch, context) it times, in this one process:
  ours   blocksparse_attn paged_decode: one query per sequence against the paged cache
         (kv block size 16, block tables shuffled), Phi-3-small's pattern
  sdpa   torch.nn.functional.scaled_dot_product_attention over contiguous K/V [B, Hkv, ctx, D],
         enable_gqa=True (a dense decode: every key is read)

Bandwidth is reported over the bytes that MUST be read: for each sequence and kv head, the keys and
values of the union of key blocks that the group's q heads can see (read once), plus q and out.
For Phi-3-small at 16k that is about 53 % of the dense K/V. The same byte count divides every
method's time, so the GB/s column ranks methods exactly as time does; compare it with the card's
copy bandwidth (H100: about 3.0 TB/s, read + write).

    python benchmarks/bench_decode.py                       # CUDA if present, else a small CPU run
    python benchmarks/bench_decode.py --batches 1,16,64,256 --contexts 2048,8192,32768
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from blocksparse_attn import ops
from blocksparse_attn.layout import SparsePattern

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, KV_BLOCK = 32, 8, 128, 16  # Phi-3-small, vLLM's default kv block


def must_read_bytes(pattern: SparsePattern, batch: int, context: int, elem: int) -> int:
    """K/V bytes of the key blocks some q head of each kv group sees, plus q and out."""
    b = pattern.block_size
    n = -(-context // b)
    last_row = pattern.block_mask(NUM_HEADS, n, NUM_KV_HEADS)[:, n - 1]  # [Hq, n]: the query's block row
    group = NUM_HEADS // NUM_KV_HEADS
    union = last_row.view(NUM_KV_HEADS, group, n).any(1)  # [Hkv, n]
    rows = torch.full((n,), b)
    rows[-1] = context - (n - 1) * b
    tokens = int((union.long() * rows).sum())
    return batch * (2 * tokens * HEAD_DIM + 2 * NUM_HEADS * HEAD_DIM) * elem


def make_inputs(batch: int, context: int, dtype, device, gen):
    blocks_per_seq = -(-context // KV_BLOCK)
    num_blocks = batch * blocks_per_seq
    key_cache = torch.randn(num_blocks, NUM_KV_HEADS, KV_BLOCK, HEAD_DIM, generator=gen).to(dtype).to(device)
    value_cache = torch.randn_like(key_cache)
    block_tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq).to(torch.int32).to(device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype).to(device)
    # Dense decode's contiguous K/V [B, Hkv, ctx, D] (its own copy: SDPA cannot read a paged cache).
    k4 = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, generator=gen).to(dtype).to(device)
    v4 = torch.randn_like(k4)
    return dict(q=q, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                seq_lens=seq_lens, q4=q.view(batch, NUM_HEADS, 1, HEAD_DIM), k4=k4, v4=v4)


def timed_ms(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="default: bfloat16 (CUDA), float32 (CPU)")
    ap.add_argument("--batches", default=None, help="default: 1,16,64,256 (CUDA), 1,4 (CPU)")
    ap.add_argument("--contexts", default=None, help="default: 2048,8192,32768 (CUDA), 2048,8192 (CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    on_cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    batches = [int(x) for x in (args.batches or ("1,16,64,256" if on_cuda else "1,4")).split(",")]
    contexts = [int(x) for x in (args.contexts or ("2048,8192,32768" if on_cuda else "2048,8192")).split(",")]
    warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 1)
    repeats = args.repeats if args.repeats is not None else (50 if on_cuda else 3)
    pattern = SparsePattern.phi3_small(NUM_HEADS)
    name = torch.cuda.get_device_name() if on_cuda else "CPU"
    print(f"device {args.device} ({name}), torch {torch.__version__}, dtype {str(dtype)[6:]}, "
          f"Hq={NUM_HEADS}, Hkv={NUM_KV_HEADS}, D={HEAD_DIM}, kv block {KV_BLOCK}, {pattern}")
    gen = torch.Generator().manual_seed(0)
    scale = 1.0 / HEAD_DIM
    rows = []
    for context in contexts:
        for batch in batches:
            x = make_inputs(batch, context, dtype, args.device, gen)
            out = torch.empty_like(x["q"])
            ours = lambda: ops.paged_decode(x["q"], x["key_cache"], x["value_cache"], x["block_tables"],  # noqa: E731
                                            x["seq_lens"], scale, pattern, out=out)
            dense = lambda: F.scaled_dot_product_attention(x["q4"], x["k4"], x["v4"], scale=scale,  # noqa: E731
                                                           enable_gqa=True)
            ours_ms = timed_ms(ours, args.device, warmup, repeats)
            dense_ms = timed_ms(dense, args.device, warmup, repeats)
            nbytes = must_read_bytes(pattern, batch, context, x["q"].element_size())
            rows.append((batch, context, nbytes, ours_ms, dense_ms))
            del x
    print(f"\n{'batch':>6} {'context':>8} {'must read MB':>13} {'ours us':>10} {'sdpa us':>10} "
          f"{'ours GB/s':>10} {'sdpa GB/s':>10} {'x vs sdpa':>10}")
    for batch, context, nbytes, ours_ms, dense_ms in rows:
        print(f"{batch:>6} {context:>8} {nbytes / 1e6:>13.1f} {1e3 * ours_ms:>10.1f} {1e3 * dense_ms:>10.1f} "
              f"{nbytes / ours_ms / 1e6:>10.1f} {nbytes / dense_ms / 1e6:>10.1f} {dense_ms / ours_ms:>9.2f}x")
    print("(GB/s: the bytes that must be read (visible K/V blocks, once per kv head) / time, for both methods)")


if __name__ == "__main__":
    main()
