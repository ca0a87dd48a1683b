"""Where a prefill call's time goes: the CUDA-event time of a whole call against the device time of
each kernel it launches (torch.profiler) and the gaps between them, the host's time to issue one call
(no synchronisation: where it exceeds the device time, the events time the host), and the call
replayed from a CUDA graph (device time only, when the call can be captured). Phi-3-small's layer
(32 q / 8 kv heads, D = 128, bf16), its pattern or dense causal (--dense-pattern, as in
bench_prefill.py), our `varlen_prefill` and cuDNN's SDPA on the same inputs.

    PYTHONPATH=$PWD python3 benchmarks/prefill_call_breakdown.py [--shapes 128x256,512x64] [--dense-pattern]
        [--methods ours,sdpa-cudnn]
"""
import argparse
import statistics
import time

import torch
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

from bench_decode import graphed  # this script's folder
from bench_prefill import layer_pattern, make_inputs, ours_fn, sdpa_fn, time_cuda

CALLS = 20


def graph_ms(fns):
    """Median event time of one captured call replayed (inputs alternating as in the other timings),
    or the reason it cannot be captured."""
    try:
        replays = [graphed(fn) for fn in fns]
    except RuntimeError as error:
        return f"not capturable ({str(error).splitlines()[0][:100]})"
    return f"{time_cuda(replays, 10, CALLS) * 1000:.1f} us"


def breakdown(label, fns):
    call_us = time_cuda(fns, 10, CALLS) * 1000
    host = []
    for i in range(CALLS):  # issue only: the queue ahead of the device absorbs it
        t0 = time.perf_counter()
        fns[i % 2]()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(CALLS):
            fns[i % 2]()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = {}
    for e in kernels:
        by_name.setdefault(e.name.split("(")[0][:70], []).append(e.time_range.end - e.time_range.start)
    print(f"  {label}: one call {call_us:.1f} us (CUDA events, median of {CALLS}); "
          f"host issue {statistics.median(host) * 1e6:.1f} us; from a CUDA graph {graph_ms(fns)}")
    for name, times in by_name.items():
        print(f"    {name}: {statistics.median(times):.1f} us (median of {len(times)})")
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    if gaps:
        print(f"    gaps between kernels: median {statistics.median(gaps):.1f} us")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x4,32768x1", help="comma-separated SEQ_LENxBATCH")
    ap.add_argument("--dense-pattern", action="store_true", help="dense causal: every causal block visible")
    ap.add_argument("--methods", default="ours,sdpa-cudnn", help="comma-separated subset of ours,sdpa-cudnn")
    args = ap.parse_args()
    methods = args.methods.split(",")
    pattern = layer_pattern(args.dense_pattern)
    for shape in args.shapes.split(","):
        seq_len, batch = (int(x) for x in shape.split("x"))
        inputs = [make_inputs(batch, seq_len, torch.bfloat16, "cuda", seed=1000 * seq_len + i) for i in range(2)]
        print(f"S={seq_len} x {batch}:")
        if "ours" in methods:
            breakdown("ours", [ours_fn(x, 1 / 128, pattern) for x in inputs])
        if "sdpa-cudnn" in methods:
            breakdown("sdpa-cudnn", [sdpa_fn(x, 1 / 128, SDPBackend.CUDNN_ATTENTION) for x in inputs])


if __name__ == "__main__":
    main()
