"""Where a prefill call's time goes on the GPU: the CUDA-event time of a whole `varlen_prefill`
call against the device time of each kernel it launches (torch.profiler), and the gaps between
them. Phi-3-small's layer (32 q / 8 kv heads, D = 128, bf16), 32k tokens a batch.

    PYTHONPATH=$PWD python3 benchmarks/prefill_call_breakdown.py
"""
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from blocksparse_attn import ops
from blocksparse_attn.layout import SparsePattern

CALLS = 20


def main():
    for seq_len, batch in ((8192, 4), (32768, 1)):
        torch.manual_seed(0)
        tokens = seq_len * batch
        inputs = []
        for _ in range(2):  # alternate two input sets, as the benchmark does
            k = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16)
            inputs.append((torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16), k, torch.randn_like(k)))
        cu = torch.arange(0, tokens + 1, seq_len, device="cuda", dtype=torch.int32)
        pattern = SparsePattern.phi3_small(32)

        def call(i):
            ops.varlen_prefill(*inputs[i % 2], cu, cu, 1 / 128, pattern)

        for i in range(10):
            call(i)
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(CALLS)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(CALLS)]
        for i in range(CALLS):
            starts[i].record()
            call(i)
            ends[i].record()
        torch.cuda.synchronize()
        event_ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(CALLS):
                call(i)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name = {}
        for e in kernels:
            by_name.setdefault(e.name.split("(")[0][:70], []).append(e.time_range.end - e.time_range.start)
        print(f"S={seq_len} x {batch}: one call {event_ms * 1000:.1f} us (CUDA events, median of {CALLS})")
        for name, times in by_name.items():
            print(f"  {name}: {statistics.median(times):.1f} us (median of {len(times)})")
        spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
        print(f"  gaps between kernels: median {statistics.median(gaps):.1f} us")


if __name__ == "__main__":
    main()
