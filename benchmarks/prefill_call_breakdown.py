"""Where a prefill call's time goes: the CUDA-event time of a whole `varlen_prefill` call against the
device time of each kernel it launches (torch.profiler) and the gaps between them, the host's time to
issue one call (no synchronisation: where it exceeds the device time, the events time the host), and
the call replayed from a CUDA graph (device time only, when the call can be captured). Phi-3-small's
layer (32 q / 8 kv heads, D = 128, bf16), its pattern or dense causal (--dense-pattern, as in
bench_prefill.py).

    PYTHONPATH=$PWD python3 benchmarks/prefill_call_breakdown.py [--shapes 128x256,512x64] [--dense-pattern]
"""
import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from blocksparse_attn import ops
from bench_decode import graphed  # this script's folder
from bench_prefill import layer_pattern, time_cuda

CALLS = 20


def graph_ms(call):
    """Median event time (ms) of one captured call replayed (inputs alternating as in the other
    timings), or the reason it cannot be captured."""
    try:
        replays = [graphed(lambda: call(0)), graphed(lambda: call(1))]
    except RuntimeError as error:
        return f"not capturable ({str(error).splitlines()[0][:100]})"
    return f"{time_cuda(replays, 10, CALLS) * 1000:.1f} us"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x4,32768x1", help="comma-separated SEQ_LENxBATCH")
    ap.add_argument("--dense-pattern", action="store_true", help="dense causal: every causal block visible")
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        seq_len, batch = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        tokens = seq_len * batch
        inputs = []
        for _ in range(2):  # alternate two input sets, as the benchmark does
            k = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16)
            inputs.append((torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16), k, torch.randn_like(k)))
        cu = torch.arange(0, tokens + 1, seq_len, device="cuda", dtype=torch.int32)
        pattern = layer_pattern(args.dense_pattern)
        out = torch.empty_like(inputs[0][0])  # as bench_prefill.py calls it

        def call(i):
            ops.varlen_prefill(*inputs[i % 2], cu, cu, 1 / 128, pattern, out=out)

        call_ms = time_cuda([lambda: call(0), lambda: call(1)], 10, CALLS)
        host = []
        for i in range(CALLS):  # issue only: the queue ahead of the device absorbs it
            t0 = time.perf_counter()
            call(i)
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(CALLS):
                call(i)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name = {}
        for e in kernels:
            by_name.setdefault(e.name.split("(")[0][:70], []).append(e.time_range.end - e.time_range.start)
        print(f"S={seq_len} x {batch}: one call {call_ms * 1000:.1f} us (CUDA events, median of {CALLS}); "
              f"host issue {statistics.median(host) * 1e6:.1f} us; from a CUDA graph {graph_ms(call)}")
        for name, times in by_name.items():
            print(f"  {name}: {statistics.median(times):.1f} us (median of {len(times)})")
        spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
        print(f"  gaps between kernels: median {statistics.median(gaps):.1f} us")


if __name__ == "__main__":
    main()
