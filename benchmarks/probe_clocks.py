"""Why a prefill's wall time moves between processes: each method's median time beside the SM clock
and power the card ran at while it ran, for several placements of the inputs in memory.

Dense 8k x 4 took 3.3 to 3.9 ms by process with the same build (benchmarks/RESULTS.md). Each
placement allocates a pad of random size first, then fresh inputs; every method then runs --block
calls as one block (bench_prefill's --timing blocks), timed by CUDA events, twice, while nvidia-smi
samples the card (bench_paged_prefill.ClockSampler). What it showed on an H100 (2026-12-06): the card
sat at its power cap (nvidia-smi's clock-limit reason 0x4, software power cap; ~700 W), the clock of a
block moved 1330-1560 MHz, and the placement changed nothing. Ours ran most blocks at 1474-1549 MHz and
FA4 at 1323-1370, but one round in each process the other way round: whether a kernel's own power
draw or its place in the sequence sets its clock, the run does not settle.

    python3 benchmarks/probe_clocks.py [--seq-len 8192 --batch 4] [--placements 4] [--methods ours,fa4]
"""
import argparse
import random
import time

import torch

from bench_paged_prefill import ClockSampler  # this script's folder
from bench_prefill import HEAD_DIM, fa4_fns, layer_pattern, make_inputs, ours_fn, time_cuda  # this script's folder


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
    scale = 1.0 / HEAD_DIM  # Phi-3-small's, as bench_prefill's
    sampler = ClockSampler()
    rng = random.Random(0)
    rows = []
    for placement in range(args.placements):
        pad_mb = 0 if placement == 0 else rng.randrange(1, 4096)
        pad = torch.empty(pad_mb << 20, dtype=torch.uint8, device=dev)
        x = make_inputs(args.batch, args.seq_len, torch.bfloat16, dev, seed=placement)
        fns = {"ours": ours_fn(x, scale, pattern)}
        if "fa4" in args.methods:
            peer = fa4_fns([x], scale)
            if peer is None:
                print("fa4: skipped (not installed; see ../shared/peers/fa4.sh)")
            else:
                fns["fa4"] = peer[0]
        for rnd in range(2):
            for name in (m for m in args.methods.split(",") if m in fns):
                start = time.time()
                ms = time_cuda([fns[name]], 5, args.block)
                window = (start + 0.1 * (time.time() - start), time.time())  # past the first calls' ramp
                rows.append((placement, pad_mb, rnd, name, ms, window))
        del pad, x, fns
        torch.cuda.empty_cache()
    sampler.close()
    print(f"{torch.cuda.get_device_name(dev)}, dense causal {args.seq_len} x {args.batch}, {args.block} calls a block")
    print(f"{'placement':>9} {'pad MB':>6} {'round':>5} {'method':>6} {'ms':>7} {'SM MHz':>7} {'W':>6} {'n':>4}")
    for placement, pad_mb, rnd, name, ms, window in rows:
        mhz, watts, n = sampler.means([window])
        print(f"{placement:>9} {pad_mb:>6} {rnd:>5} {name:>6} {ms:>7.3f} {mhz:>7.0f} {watts:>6.0f} {n:>4}")


if __name__ == "__main__":
    main()
