"""Decode benchmark: our block-sparse paged_decode (Phi-3-small pattern) against dense decode.

Device-agnostic. For every (batch, context) it times, in this one process:
  ours   blocksparse_attn paged_decode: one query per sequence against the paged cache
         (kv block size 16, block tables shuffled), Phi-3-small's pattern
  sdpa   torch.nn.functional.scaled_dot_product_attention over contiguous K/V [B, Hkv, ctx, D],
         enable_gqa=True (a dense decode: every key is read)
  flex   FlexAttention (torch.compile) over the same contiguous K/V with a BlockMask of the pattern

Bandwidth is reported over the bytes that MUST be read: for each sequence and kv head, the keys and
values of the union of key blocks that the group's q heads can see (read once), plus q and out.
For Phi-3-small at 16k that is about 53 % of the dense K/V. The same byte count divides every
method's time, so the GB/s column ranks methods exactly as time does; compare it with the card's
copy bandwidth (H100: about 3.0 TB/s, read + write).

    python benchmarks/bench_decode.py                       # CUDA if present, else a small CPU run
    python benchmarks/bench_decode.py --batches 1,16,64,256 --contexts 2048,8192,16384,32768
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from blocksparse_attn import ops
from blocksparse_attn.layout import SparsePattern

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, KV_BLOCK = 32, 8, 128, 16  # Phi-3-small, vLLM's default kv block


def must_read_bytes(pattern: SparsePattern, batch: int, context: int, elem: int, cache_elem: int) -> int:
    """K/V bytes (cache_elem each) of the key blocks some q head of each kv group sees, plus q and out."""
    b = pattern.block_size
    n = -(-context // b)
    last_row = pattern.block_mask(NUM_HEADS, n, NUM_KV_HEADS)[:, n - 1]  # [Hq, n]: the query's block row
    group = NUM_HEADS // NUM_KV_HEADS
    union = last_row.view(NUM_KV_HEADS, group, n).any(1)  # [Hkv, n]
    rows = torch.full((n,), b)
    rows[-1] = context - (n - 1) * b
    tokens = int((union.long() * rows).sum())
    return batch * (2 * tokens * HEAD_DIM * cache_elem + 2 * NUM_HEADS * HEAD_DIM * elem)


def make_inputs(batch: int, context: int, dtype, device, gen, dense: bool, shuffled: bool = True,
                cache_dtype=None):
    """Inputs drawn on the device (a 256 x 32k cache is 34 GB: the CPU cannot fill it in time). With an
    fp8 cache_dtype the cache holds N(0, 1) values quantized with scale 1 (k_scale / v_scale of 1)."""
    blocks_per_seq = -(-context // KV_BLOCK)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, NUM_KV_HEADS, KV_BLOCK, HEAD_DIM)
    key_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype).to(cache_dtype or dtype)
    value_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype).to(cache_dtype or dtype)
    order = torch.randperm(num_blocks, generator=gen, device=device) if shuffled else torch.arange(num_blocks, device=device)
    block_tables = order.view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen, device=device, dtype=dtype)
    one = torch.ones(1, device=device) if cache_dtype is not None else None
    x = dict(q=q, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables, seq_lens=seq_lens,
             q4=q.view(batch, NUM_HEADS, 1, HEAD_DIM), scale=one)
    if dense:  # dense decode's contiguous K/V [B, Hkv, ctx, D] (SDPA cannot read a paged cache)
        x["k4"] = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, generator=gen, device=device, dtype=dtype)
        x["v4"] = torch.randn_like(x["k4"])
    return x


def make_per_kv_head_inputs(pattern: SparsePattern, batch: int, context: int, dtype, device, gen,
                            cache_dtype=None):
    """The same decode over per-kv-head pages (block_tables [B, Hkv, blocks]): every page the rule
    releases for the query at context - 1 is -1, the cache holds only the kept pages, shuffled."""
    blocks_per_seq = -(-context // KV_BLOCK)
    kept = pattern.pages_read_later(NUM_HEADS, NUM_KV_HEADS, context - 1, KV_BLOCK, blocks_per_seq).to(device)
    kept = kept.expand(batch, -1, -1)
    num_pages = int(kept.sum())
    shape = (num_pages, 1, KV_BLOCK, HEAD_DIM)
    key_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype).to(cache_dtype or dtype)
    value_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype).to(cache_dtype or dtype)
    tables = torch.full(kept.shape, -1, dtype=torch.int32, device=device)
    tables[kept] = torch.randperm(num_pages, generator=gen, device=device).to(torch.int32)
    return dict(key_cache=key_cache, value_cache=value_cache, block_tables=tables)


def copy_bandwidth_gbs(device: str) -> float:
    """The card's copy rate (bytes read + written per second) on a 1 GiB tensor: the ceiling we quote."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device, 3, 20)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def flex_decode(pattern: SparsePattern, batch: int, context: int, device: str, scale: float):
    """FlexAttention decode (one query at position context - 1) with a BlockMask of the same pattern,
    or None where this torch has no FlexAttention for the device."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    b, local, vert = pattern.block_size, pattern.local_blocks, pattern.vert_stride
    offsets = pattern.vertical_offsets(NUM_HEADS, NUM_KV_HEADS).to(device)
    query_block = (context - 1) // b

    def mask_mod(batch_idx, head, q_idx, kv_idx):
        key_block = kv_idx // b
        local_ok = query_block - key_block < local
        vertical_ok = (key_block + offsets[head]) % vert == 0
        return (kv_idx < context) & (local_ok | vertical_ok)

    block_mask = create_block_mask(mask_mod, None, NUM_HEADS, 1, context, device=device, BLOCK_SIZE=(128, b))
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q4, k4, v4: compiled(q4, k4, v4, block_mask=block_mask, scale=scale, enable_gqa=True)


def graphed(fn, calls: int = 1):
    """fn captured `calls` times back to back in one CUDA graph (after a warm-up on a side stream);
    returns its replay, which timed_ms charges per call. With calls > 1 a call pays what it pays inside
    a serving step's graph (the gap to its neighbour kernels), not the replay's own launch."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()

    def replay():
        graph.replay()
    replay.calls = calls
    return replay


def timed_ms(fn, device: str, warmup: int, repeats: int) -> float:
    """Median ms of one call of fn (of one captured call where fn replays several, see graphed)."""
    calls = getattr(fn, "calls", 1)
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
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / calls
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
    ap.add_argument("--sequential-blocks", action="store_true",
                    help="each sequence's cache blocks in order (default: shuffled, as after allocator churn)")
    ap.add_argument("--cache-dtype", choices=["auto", "e4m3", "e5m2"], default="auto",
                    help="the paged cache's dtype: the model's (auto) or fp8 (scales of 1)")
    ap.add_argument("--graph", action="store_true",
                    help="time ours and SDPA replayed from CUDA graphs (GPU time only, no launch overhead)")
    ap.add_argument("--graph-calls", type=int, default=1,
                    help="with --graph: capture this many calls back to back in each graph and report the time "
                         "per call (1: each replay is one call, timed with its launch)")
    ap.add_argument("--per-kv-head", action="store_true",
                    help="also time ours over per-kv-head pages with the released ones gone (issue 17)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time ours and SDPA this many times, alternating, and report each one's median round "
                         "(small graph-replayed decodes vary by a few us from one timing to the next)")
    ap.add_argument("--splits", default="",
                    help="also time ours with these forced split counts (BSA_DECODE_SPLITS), e.g. 8,16,32")
    ap.add_argument("--flex-at", default="64x16384,16x8192,1x32768",
                    help="BATCHxCONTEXT pairs that also time FlexAttention (each compiles: seconds); '' for none")
    args = ap.parse_args()
    if args.splits and not args.graph:
        ap.error("--splits needs --graph (the split count is read when a call is captured)")
    if args.graph_calls < 1 or (args.graph_calls > 1 and not args.graph):
        ap.error(f"--graph-calls must be at least 1 and needs --graph, got {args.graph_calls}")
    on_cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    batches = [int(x) for x in (args.batches or ("1,16,64,256" if on_cuda else "1,4")).split(",")]
    contexts = [int(x) for x in (args.contexts or ("2048,8192,32768" if on_cuda else "2048,8192")).split(",")]
    warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 1)
    repeats = args.repeats if args.repeats is not None else (50 if on_cuda else 3)
    pattern = SparsePattern.phi3_small(NUM_HEADS)
    cache_dtype = {"auto": None, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[args.cache_dtype]
    name = torch.cuda.get_device_name() if on_cuda else "CPU"
    print(f"device {args.device} ({name}), torch {torch.__version__}, dtype {str(dtype)[6:]}, "
          f"Hq={NUM_HEADS}, Hkv={NUM_KV_HEADS}, D={HEAD_DIM}, kv block {KV_BLOCK}, cache {args.cache_dtype}, "
          f"{f'CUDA graphs of {args.graph_calls} call(s)' if args.graph else 'eager'}, {pattern}")
    copy_gbs = copy_bandwidth_gbs(args.device) if on_cuda else float("nan")
    if on_cuda:
        print(f"copy bandwidth (read + write, 1 GiB): {copy_gbs:.0f} GB/s")
    gen = torch.Generator(device=args.device).manual_seed(0)
    scale = 1.0 / HEAD_DIM
    rows = []
    for context in contexts:
        for batch in batches:
            cache_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * torch.finfo(dtype).bits // 8
            free = torch.cuda.mem_get_info()[0] if on_cuda else 1 << 62
            dense = 2.2 * cache_bytes < free  # room for SDPA's own contiguous copy of K/V
            if 1.1 * cache_bytes > free:
                print(f"skip batch {batch} x {context}: the cache does not fit")
                continue
            x = make_inputs(batch, context, dtype, args.device, gen, dense, not args.sequential_blocks, cache_dtype)
            out = torch.empty_like(x["q"])
            ours = lambda: ops.paged_decode(x["q"], x["key_cache"], x["value_cache"], x["block_tables"],  # noqa: E731
                                            x["seq_lens"], scale, pattern, out=out, k_scale=x["scale"],
                                            v_scale=x["scale"])
            if args.graph:
                ours = graphed(ours, args.graph_calls)
            forced = {}  # split count -> ours with that many splits, captured while the variable is set
            for n in [n for n in args.splits.split(",") if n]:
                old_env = os.environ.get("BSA_DECODE_SPLITS")
                os.environ["BSA_DECODE_SPLITS"] = n
                forced[n] = graphed(lambda: ops.paged_decode(x["q"], x["key_cache"], x["value_cache"],
                                                             x["block_tables"], x["seq_lens"], scale, pattern,
                                                             out=out, k_scale=x["scale"], v_scale=x["scale"]),
                                    args.graph_calls)
                if old_env is None:
                    del os.environ["BSA_DECODE_SPLITS"]
                else:
                    os.environ["BSA_DECODE_SPLITS"] = old_env
            ours_ms = timed_ms(ours, args.device, warmup, repeats)
            per_head_ms = float("nan")
            if args.per_kv_head:
                ph = make_per_kv_head_inputs(pattern, batch, context, dtype, args.device, gen, cache_dtype)
                per_head = lambda: ops.paged_decode(x["q"], ph["key_cache"], ph["value_cache"],  # noqa: E731
                                                    ph["block_tables"], x["seq_lens"], scale, pattern, out=out,
                                                    k_scale=x["scale"], v_scale=x["scale"])
                if args.graph:
                    per_head = graphed(per_head, args.graph_calls)
                per_head_ms = timed_ms(per_head, args.device, warmup, repeats)
                del ph
            dense_ms = flex_ms = float("nan")
            sdpa = None
            if dense:
                sdpa = lambda: F.scaled_dot_product_attention(x["q4"], x["k4"], x["v4"], scale=scale,  # noqa: E731
                                                              enable_gqa=True)
                if args.graph:
                    sdpa = graphed(sdpa, args.graph_calls)
                dense_ms = timed_ms(sdpa, args.device, warmup, repeats)
            # Each method timed `rounds` times, alternating; the median round of each is reported.
            timings = {"ours": [ours_ms], "sdpa": [dense_ms], **{n: [] for n in forced}}
            for r in range(max(args.rounds, 1)):
                if r:
                    timings["ours"].append(timed_ms(ours, args.device, warmup, repeats))
                    if sdpa is not None:
                        timings["sdpa"].append(timed_ms(sdpa, args.device, warmup, repeats))
                for n, fn in forced.items():
                    timings[n].append(timed_ms(fn, args.device, warmup, repeats))
            ours_ms, dense_ms = statistics.median(timings["ours"]), statistics.median(timings["sdpa"])
            forced = {n: statistics.median(timings[n]) for n in forced}
            if forced:
                print(f"batch {batch} x {context}: ours {1e3 * ours_ms:.1f} us (auto splits), "
                      + ", ".join(f"{n} splits {1e3 * t:.1f} us" for n, t in forced.items())
                      + (f"; sdpa {1e3 * dense_ms:.1f} us" if dense else ""))
                if on_cuda and f"{batch}x{context}" in args.flex_at.split(","):
                    try:
                        flex = flex_decode(pattern, batch, context, args.device, scale)
                        if flex is not None:
                            flex_ms = timed_ms(lambda: flex(x["q4"], x["k4"], x["v4"]), args.device, 3, repeats)
                    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                        print(f"flex decode failed at batch {batch} x {context}: {type(e).__name__}: {str(e)[:200]}")
            nbytes = must_read_bytes(pattern, batch, context, x["q"].element_size(), x["key_cache"].element_size())
            rows.append((batch, context, nbytes, ours_ms, dense_ms, flex_ms, per_head_ms))
            del x
            if on_cuda:
                torch.cuda.empty_cache()
    print(f"\n{'batch':>6} {'context':>8} {'must read MB':>13} {'ours us':>9} {'sdpa us':>9} {'flex us':>9} "
          f"{'ours GB/s':>10} {'% copy':>7} {'x sdpa':>7} {'x flex':>7}"
          + (f" {'per-kv-head us':>15} {'/ ours':>7}" if args.per_kv_head else ""))
    for batch, context, nbytes, ours_ms, dense_ms, flex_ms, per_head_ms in rows:
        gbs = nbytes / ours_ms / 1e6
        print(f"{batch:>6} {context:>8} {nbytes / 1e6:>13.1f} {1e3 * ours_ms:>9.1f} {1e3 * dense_ms:>9.1f} "
              f"{1e3 * flex_ms:>9.1f} {gbs:>10.0f} {100 * gbs / copy_gbs:>6.0f}% {dense_ms / ours_ms:>6.2f}x "
              f"{flex_ms / ours_ms:>6.2f}x"
              + (f" {1e3 * per_head_ms:>15.1f} {per_head_ms / ours_ms:>6.3f}" if args.per_kv_head else ""))
    print("(GB/s: the bytes that must be read (visible K/V blocks, once per kv head, plus q and out) / time;"
          " % copy: of the card's copy bandwidth measured above; per-kv-head: the same decode over pages of one"
          " kv head with the released pages gone)")


if __name__ == "__main__":
    main()
