"""Why a prefill's wall time moves between processes: each method's median time beside the SM clock,
power and temperature the card ran at while it ran, for several placements of the inputs in memory.

Dense 8k x 4 took 3.3 to 3.9 ms by process with the same build (benchmarks/RESULTS.md) while
FlashAttention-4 in the same processes held 3.43-3.44 ms. Either the card's clock differs while ours
runs (power or heat), or our kernel is sensitive to where its inputs lie (L2 slices, DRAM channels).
Each placement allocates a pad of random size first, then fresh inputs; every method then runs BLOCK
calls, timed by CUDA events, while nvidia-smi samples the card every 20 ms.

    python3 benchmarks/probe_clocks.py [--seq-len 8192 --batch 4] [--placements 4] [--methods ours,fa4]
"""
import argparse
import csv
import io
import random
import statistics
import subprocess
import time

import torch

from bench_prefill import fa4_fns, layer_pattern, make_inputs, ours_fn  # this script's folder

FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,{}"


def smi_fields():
    """The query fields, with the clock-limit reasons under the name this driver knows."""
    for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={reasons}", "--format=csv,noheader"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return FIELDS.format(reasons)
    return FIELDS.format("pstate")


def smi_windows(text, windows):
    """Mean SM MHz, watts and degrees of the samples inside each (start, end) wall-time window."""
    rows = []
    for r in csv.reader(io.StringIO(text)):
        if len(r) < 5 or not r[1].strip()[:1].isdigit():
            continue
        stamp = time.mktime(time.strptime(r[0].strip()[:19], "%Y/%m/%d %H:%M:%S")) + float("0" + r[0].strip()[19:])
        rows.append((stamp, float(r[1].split()[0]), float(r[2].split()[0]), float(r[3]), r[4].strip()))
    out = []
    for start, end in windows:
        inside = [row for row in rows if start <= row[0] <= end]
        if not inside:
            out.append(None)
            continue
        reasons = sorted({row[4] for row in inside})
        out.append((statistics.mean(r[1] for r in inside), statistics.mean(r[2] for r in inside),
                    statistics.mean(r[3] for r in inside), len(inside), ",".join(reasons)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--placements", type=int, default=4)
    ap.add_argument("--block", type=int, default=150, help="calls a method runs at a time")
    ap.add_argument("--methods", default="ours,fa4")
    args = ap.parse_args()
    dev = torch.device("cuda")
    pattern = layer_pattern(dense=True)
    scale = 128 ** -0.5
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={smi_fields()}", "--format=csv,noheader", "-lms", "20"],
                           stdout=subprocess.PIPE, text=True)
    rng = random.Random(0)
    results, windows = [], []
    keep = []
    for placement in range(args.placements):
        keep.clear()
        torch.cuda.empty_cache()
        pad_mb = 0 if placement == 0 else rng.randrange(1, 4096)
        keep.append(torch.empty(pad_mb << 20, dtype=torch.uint8, device=dev))
        x = make_inputs(args.batch, args.seq_len, torch.bfloat16, dev, seed=placement)
        keep.append(x)
        fns = {"ours": ours_fn(x, scale, pattern)}
        if "fa4" in args.methods:
            peer = fa4_fns([x], scale)
            if peer is None:
                print("fa4: skipped (not installed; see ../shared/peers/fa4.sh)")
            else:
                fns["fa4"] = peer[0]
        for rnd in range(2):
            for name in args.methods.split(","):
                if name not in fns:
                    continue
                fn = fns[name]
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(args.block)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(args.block)]
                t0 = time.time()
                for i in range(args.block):
                    starts[i].record()
                    fn()
                    ends[i].record()
                torch.cuda.synchronize()
                t1 = time.time()
                ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
                results.append((placement, pad_mb, rnd, name, ms))
                windows.append((t0 + 0.1 * (t1 - t0), t1))  # past the first calls' ramp
    time.sleep(0.1)
    smi.terminate()
    text = smi.communicate()[0]
    print(f"{torch.cuda.get_device_name(dev)}, dense causal {args.seq_len} x {args.batch}, {args.block} calls a block")
    print(f"{'placement':>9} {'pad MB':>6} {'round':>5} {'method':>6} {'ms':>7} {'SM MHz':>7} {'W':>6} {'C':>4} {'n':>4}  reasons")
    for (placement, pad_mb, rnd, name, ms), w in zip(results, smi_windows(text, windows)):
        mhz, watts, deg, n, reasons = w if w else (float("nan"),) * 4 + ("",)
        print(f"{placement:>9} {pad_mb:>6} {rnd:>5} {name:>6} {ms:>7.3f} {mhz:>7.0f} {watts:>6.0f} {deg:>4.0f} {n:>4}  {reasons}")


if __name__ == "__main__":
    main()
