"""Prefill from the paged KV cache: whole prompts and chunked prefill, bf16 and fp8 caches, against the
same prefill over contiguous K/V, in one process on the same inputs.

For each sequence length S (batch = tokens // S, Phi-3-small layer and pattern, kv block 16, block
tables shuffled as after allocator churn, or in allocation order with --in-order-tables) it times:
  varlen         varlen_prefill over contiguous k/v [B*S, Hkv, D] (what a prompt without a cache takes)
  paged          paged_prefill of the whole prompts from a cache in the model dtype
  paged-<fp8>    the same from an fp8 cache (e4m3 / e5m2, per-tensor scales)
  chunk          the last chunk (--chunk tokens) of each prompt as a chunked prefill: its queries
                 against the context already in the cache, model dtype and fp8 caches alike
  varlen-hm      the same over k/v stored kv head by kv head ([Hkv, T, D] viewed as [T, Hkv, D]):
                 each head's rows contiguous, as in a page, without the pages
  chunk-varlen   the same chunk's queries over the contiguous k/v (the chunk's reference)
  paged-<cache>-gather, chunk-<cache>-gather  (--gather) paged and chunk from each cache with
                 BSA_PAGED_PREFILL=gather: the K/V copied out of the pages (fp8 widened) first, then the
                 contiguous path
With --kernel-times, the kernels each of varlen, paged (direct) and paged-gather launches at every
size, and their device time a call (torch.profiler): where a path's time goes (the gather's copy, the
prefill on gathered K/V).
Every method is timed in --rounds rounds (each a median of --repeats calls; the table shows each
method's median over the rounds). Within a round the methods' calls take turns, call by call (`--timing
turns`, the default: bench_prefill.time_cuda_interleaved), so every method sees the same clock of a
power-capped card; `--timing blocks` times each method's --repeats calls as one block, as before
2026-12-06. With --clocks, nvidia-smi samples the SM clock and the power every 50 ms meanwhile, and a
second table gives each method's means over its timing (is a path slower because the card clocks it
lower? With turns every method has the same windows; ask it of blocks). A method's block is only
--repeats calls a round (~35 ms at 8k x 4 with the default 20, two or three samples): use --repeats 400
or so with --clocks; rows of fewer than 10 samples are marked.
The ratio columns are paged / varlen, chunk / chunk-varlen (model-dtype cache; with --gather also
the gather's, each cache) and fp8 / model-dtype cache (1.00 = as fast).

    python benchmarks/bench_paged_prefill.py --seq-lens 8192,32768 --chunk 2048
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import threading
import time
from datetime import datetime

import torch

from blocksparse_attn import ops
from blocksparse_attn.layout import SparsePattern
from bench_prefill import time_cuda, time_cuda_interleaved  # this script's folder

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Phi-3-small
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def kernel_times(fn, runs: int = 5) -> list[tuple[str, float]]:
    """The CUDA kernels one call of fn launches and their device time a call, us (torch.profiler), then
    the CUDA runtime calls that took the host over 5 us a call (an allocation or a synchronisation
    inside a call leaves the GPU idle between its kernels), prefixed "host:"."""
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [(e.key, e.self_device_time_total / runs) for e in events if str(e.device_type).endswith("CUDA")]
    runtime = [(f"host: {e.key} x{e.count // runs}", e.cpu_time_total / runs) for e in events
               if e.key.startswith("cuda") and e.key != "cudaDeviceSynchronize" and e.cpu_time_total / runs > 5]
    # the GPU's idle time between the first kernel and the last, a call (calls back to back, no sync)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if str(e.device_type).endswith("CUDA"))
    idle, reach = 0.0, spans[0][1] if spans else 0.0
    for start, end in spans[1:]:
        idle += max(0.0, start - reach)
        reach = max(reach, end)
    return kernels + runtime + [("GPU idle between kernels", idle / runs)]


class ClockSampler:
    """nvidia-smi's SM clock (MHz) and power draw (W) of the current GPU every 50 ms, in the background,
    stamped with nvidia-smi's own time (its output may reach the pipe in bursts)."""

    def __init__(self):
        query = ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 "-lms", "50", "-i", str(torch.cuda.current_device())]
        self.samples: list[tuple[float, float, float]] = []
        self.proc = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                stamp, clock, power = (field.strip() for field in line.split(","))
                when = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((when, float(clock), float(power)))
            except ValueError:  # a line that is not a sample ([N/A], a header)
                continue

    def means(self, windows: list[tuple[float, float]]) -> tuple[float, float, int]:
        """Mean clock and power of the samples inside any of the (start, end) time.time() windows, and
        their count."""
        inside = [(c, w) for t, c, w in self.samples if any(a <= t <= b for a, b in windows)]
        if not inside:
            return float("nan"), float("nan"), 0
        return statistics.fmean(c for c, _ in inside), statistics.fmean(w for _, w in inside), len(inside)

    def close(self):
        time.sleep(0.2)  # the last window's samples
        self.proc.terminate()
        self.proc.wait()


@contextlib.contextmanager
def paged_prefill_path(path: str):
    """BSA_PAGED_PREFILL for the calls inside (the extension reads it per call)."""
    before = os.environ.get("BSA_PAGED_PREFILL")
    os.environ["BSA_PAGED_PREFILL"] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ["BSA_PAGED_PREFILL"]
        else:
            os.environ["BSA_PAGED_PREFILL"] = before


def head_major(x):
    """Contiguous k or v [T, Hkv, D] stored kv head by kv head: a view of [Hkv, T, D] storage, each
    head's rows contiguous as in a page of the cache."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def block_tables(batch: int, seq_len: int, kv_block: int, device, generator=None, in_order: bool = False):
    """Block tables [batch, pages] over a cache of exactly batch * pages blocks, shuffled (as after
    allocator churn) unless in_order, and each token's slot [batch * seq_len]."""
    pages = -(-seq_len // kv_block)
    order = (torch.arange(batch * pages, device=device) if in_order
             else torch.randperm(batch * pages, generator=generator, device=device))
    tables = order.view(batch, pages).to(torch.int32)
    slots = (tables.long()[:, :, None] * kv_block + torch.arange(kv_block, device=device)).view(batch, -1)
    return tables, slots[:, :seq_len].reshape(-1)


def filled_cache(k, v, tables, slots, kv_block: int, cache_dtype, scale=None):
    """Key and value caches [blocks, Hkv, kv_block, D] in cache_dtype holding k and v at slots."""
    key_cache = torch.empty(tables.numel(), k.shape[1], kv_block, k.shape[2], dtype=cache_dtype, device=k.device)
    value_cache = torch.empty_like(key_cache)
    ops.write_kv_cache(k, v, key_cache, value_cache, slots, k_scale=scale, v_scale=scale)
    return key_cache, value_cache


def fp8_scale(x, fp8_dtype):
    """The per-tensor scale amax / format max, as a float32 [1] tensor."""
    return torch.tensor([x.abs().max().item() / torch.finfo(fp8_dtype).max], device=x.device)


def last_rows(batch: int, seq_len: int, chunk: int, device):
    """The rows of each prompt's last `chunk` queries in a [batch * seq_len] batch, and their cu_seqlens."""
    rows = torch.cat([torch.arange(r * seq_len + seq_len - chunk, (r + 1) * seq_len, device=device)
                      for r in range(batch)])
    return rows, torch.arange(0, batch * chunk + 1, chunk, dtype=torch.int32, device=device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", default="8192,32768")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens a batch (batch = tokens // S)")
    ap.add_argument("--chunk", type=int, default=2048, help="the chunked prefill's last chunk")
    ap.add_argument("--fp8", default="e4m3", help="fp8 cache formats to time, comma-separated ('' for none)")
    ap.add_argument("--kv-block", type=int, default=16, help="tokens per cache block (vLLM's default 16)")
    ap.add_argument("--in-order-tables", action="store_true",
                    help="block tables in allocation order (default: shuffled, as after allocator churn)")
    ap.add_argument("--gather", action="store_true",
                    help="also time each cache with BSA_PAGED_PREFILL=gather (paged-<cache>-gather, "
                         "chunk-<cache>-gather)")
    ap.add_argument("--kernel-times", action="store_true",
                    help="also print the kernels of varlen, paged and paged-gather (bf16 cache) and their "
                         "device time a call (torch.profiler)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over all methods, interleaved (each a median of --repeats calls); each method's "
                         "median over them")
    ap.add_argument("--timing", choices=["turns", "blocks"], default="turns",
                    help="within a round, the methods' calls take turns (default) or each method's calls run as "
                         "one block")
    ap.add_argument("--clocks", action="store_true",
                    help="also each method's mean SM clock and power while it was timed (nvidia-smi, every 50 ms)")
    args = ap.parse_args()
    device, dtype = "cuda", torch.bfloat16
    pattern = SparsePattern.phi3_small(NUM_HEADS)
    scale = 1.0 / HEAD_DIM
    fp8s = [f for f in args.fp8.split(",") if f]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, Hq={NUM_HEADS}, Hkv={NUM_KV_HEADS}, "
          f"D={HEAD_DIM}, kv block {args.kv_block}, {'in-order' if args.in_order_tables else 'shuffled'} tables, {pattern}")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for seq_len in [int(s) for s in args.seq_lens.split(",")]:
        batch = max(1, args.tokens // seq_len)
        tokens = batch * seq_len
        q = torch.randn(tokens, NUM_HEADS, HEAD_DIM, generator=gen, device=device, dtype=dtype)
        k = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=device, dtype=dtype)
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        cu = torch.arange(0, tokens + 1, seq_len, dtype=torch.int32, device=device)
        tables, slots = block_tables(batch, seq_len, args.kv_block, device, gen, args.in_order_tables)
        seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
        caches = {"bf16": (dtype, None)}
        for f in fp8s:
            caches[f] = (FP8[f], fp8_scale(k, FP8[f]))
        chunk_rows, cu_chunk = last_rows(batch, seq_len, min(args.chunk, seq_len), device)
        q_chunk, out_chunk = q[chunk_rows].contiguous(), torch.empty_like(q[chunk_rows])
        k_hm, v_hm = head_major(k), head_major(v)
        # Every method's call, then timed in interleaved rounds: the card's clocks drift by up to ~10 %
        # over a run (H100, 2026-12-05: varlen 1.31 -> 1.47 ms within one process), so a method timed
        # after another in a block was charged the drift in their ratio.
        calls = {"varlen": ("direct", lambda: ops.varlen_prefill(q, k, v, cu, cu, scale, pattern, out=out)),
                 "varlen-hm": ("direct", lambda: ops.varlen_prefill(q, k_hm, v_hm, cu, cu, scale, pattern, out=out)),
                 # the same chunk's queries over contiguous keys: the chunk's reference
                 "chunk-varlen": ("direct", lambda: ops.varlen_prefill(q_chunk, k, v, cu_chunk, cu, scale, pattern,
                                                                       out=out_chunk))}
        filled = {}
        for name, (cache_dtype, s) in caches.items():
            key_cache, value_cache = filled[name] = filled_cache(k, v, tables, slots, args.kv_block, cache_dtype, s)
            for path in ("direct", "gather") if args.gather else ("direct",):
                suffix = "-gather" if path == "gather" else ""
                calls[f"paged-{name}{suffix}"] = (path, functools.partial(
                    ops.paged_prefill, q, key_cache, value_cache, tables, cu, seq_lens, scale, pattern, out=out,
                    k_scale=s, v_scale=s))
                calls[f"chunk-{name}{suffix}"] = (path, functools.partial(
                    ops.paged_prefill, q_chunk, key_cache, value_cache, tables, cu_chunk, seq_lens, scale, pattern,
                    out=out_chunk, k_scale=s, v_scale=s))
        times = {name: [] for name in calls}
        windows = {name: [] for name in calls}  # time.time() around each timing, for --clocks
        sampler = ClockSampler() if args.clocks else None

        def on_path(path, fn):
            def call():
                with paged_prefill_path(path):
                    return fn()
            return [call]
        for _ in range(args.rounds):
            if args.timing == "turns":
                start = time.time()
                round_ms, errors = time_cuda_interleaved(
                    {name: on_path(path, fn) for name, (path, fn) in calls.items()}, args.warmup, args.repeats)
                if errors:
                    raise next(iter(errors.values()))
                for name, ms in round_ms.items():
                    times[name].append(ms)
                    windows[name].append((start, time.time()))
                continue
            for name, (path, fn) in calls.items():
                with paged_prefill_path(path):
                    start = time.time()
                    times[name].append(time_cuda([fn], args.warmup, args.repeats))
                    windows[name].append((start, time.time()))
        t = {name: statistics.median(ms) for name, ms in times.items()}
        if sampler is not None:
            sampler.close()
            print(f"\n{seq_len} x {batch}, while timed (nvidia-smi every 50 ms): SM clock MHz, power W, samples")
            for name, spans in windows.items():
                clock, power, n = sampler.means(spans)
                print(f"  {name:>20}  {clock:7.0f}  {power:6.0f}  {n:4d}{'  (few samples)' if n < 10 else ''}")
        if args.kernel_times:
            print(f"\n{seq_len} x {batch}, kernels a call (us):")
            for label in ("varlen", "paged-bf16", "paged-bf16-gather", *(f"paged-{f}-gather" for f in fp8s)):
                if label not in calls:
                    continue
                path, fn = calls[label]
                with paged_prefill_path(path):
                    for kernel, us in kernel_times(fn):
                        print(f"  {label:>17}  {us:9.1f}  {kernel[:90]}")
        del filled, calls
        rows.append((seq_len, batch, t))
        torch.cuda.empty_cache()
    names = list(rows[0][2])
    gathered = ["bf16", *fp8s] if args.gather else []
    gather = "".join(f" {c + ' g/varlen':>15} {c + ' chunk-g/varlen':>21}" for c in gathered)
    print(f"\n{'S x batch':>12} " + " ".join(f"{n + ' ms':>14}" for n in names) + f" {'paged/varlen':>13}"
          + f" {'chunk/varlen':>13}" + gather + "".join(f" {f + '/bf16 (chunk)':>17}" for f in fp8s))
    for seq_len, batch, t in rows:
        line = f"{f'{seq_len} x {batch}':>12} " + " ".join(f"{t[n]:>14.3f}" for n in names)
        line += f" {t['paged-bf16'] / t['varlen']:>13.2f} {t['chunk-bf16'] / t['chunk-varlen']:>13.2f}"
        for c in gathered:
            line += f" {t[f'paged-{c}-gather'] / t['varlen']:>15.2f} {t[f'chunk-{c}-gather'] / t['chunk-varlen']:>21.2f}"
        line += "".join(f" {t[f'chunk-{f}'] / t['chunk-bf16']:>17.2f}" for f in fp8s)
        print(line)


if __name__ == "__main__":
    main()
