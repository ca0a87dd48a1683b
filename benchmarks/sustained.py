"""Workloads run back to back for a few seconds each, so a sampler (scripts/device_power.sh runs
nvidia-smi) can read the SM clock and the power draw each one settles at. On a card held at its power
cap two kernels can differ in clock (energy per unit of work) or in cycles per call (schedule);
time per call times the clock separates the two.

Workloads, comma-separated: `matmul` (bf16 8192^3), or METHOD:LAYOUT:S with METHOD one of ours, fa4,
flex-flash, sdpa-cudnn (bench_prefill.py's closures), LAYOUT `pattern` (Phi-3-small) or `dense`
(causal), S the prompt length (batch 32768 // S).

    python3 benchmarks/sustained.py --workloads matmul,ours:dense:8192,fa4:dense:8192 --json phases.json
"""
import argparse
import json
import time

import torch

from bench_prefill import (HEAD_DIM, fa4_fns, first_call_or_note, flex_fns, layer_pattern,  # this folder
                           make_inputs, ours_fn, sdpa_fn)


def workload(spec: str):
    """The closures of one workload, or None (with a note) where its method is not installed."""
    if spec == "matmul":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn_like(a)
        return [lambda: a @ b]
    parts = spec.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise SystemExit(f"workload {spec!r}: expected matmul or METHOD:LAYOUT:S")
    method, layout, seq_len = parts[0], parts[1], int(parts[2])
    if layout not in ("pattern", "dense"):
        raise SystemExit(f"workload {spec!r}: layout must be pattern or dense, got {layout!r}")
    if method not in ("ours", "flex-flash") and not (method in ("fa4", "sdpa-cudnn") and layout == "dense"):
        raise SystemExit(f"workload {spec!r}: methods are ours, flex-flash, and fa4 or sdpa-cudnn (dense only)")
    pattern = layer_pattern(layout == "dense")
    inputs = [make_inputs(max(1, 32768 // seq_len), seq_len, torch.bfloat16, "cuda", seed=i) for i in range(2)]
    scale = 1.0 / HEAD_DIM
    if method == "ours":
        return [ours_fn(x, scale, pattern) for x in inputs]
    if method == "sdpa-cudnn":
        from torch.nn.attention import SDPBackend
        return [sdpa_fn(x, scale, SDPBackend.CUDNN_ATTENTION) for x in inputs]
    if method == "fa4":
        return first_call_or_note(spec, fa4_fns(inputs, scale))
    return first_call_or_note(spec, flex_fns(inputs, scale, pattern, seq_len, "cuda", "FLASH"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="matmul,ours:pattern:8192")
    ap.add_argument("--seconds", type=float, default=4.0, help="each workload's time")
    ap.add_argument("--pause", type=float, default=1.0, help="idle seconds between workloads")
    ap.add_argument("--json", default=None, help="where the phases go (name, start, end, ms per call)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sustained.py samples a GPU's clock: it needs CUDA")
    phases = []
    for spec in args.workloads.split(","):
        fns = workload(spec)
        if fns is None:
            continue
        for f in fns:
            f()
        torch.cuda.synchronize()
        start, calls = time.time(), 0
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        while time.time() - start < args.seconds:
            for i in range(20):
                fns[i % len(fns)]()
            calls += 20
            torch.cuda.synchronize()
        t1.record()
        torch.cuda.synchronize()
        phases.append(dict(name=spec, start=start, end=time.time(), ms=t0.elapsed_time(t1) / calls))
        print(f"{spec}: {phases[-1]['ms']:.3f} ms a call, {calls} calls", flush=True)
        del fns
        torch.cuda.empty_cache()
        time.sleep(args.pause)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(phases, f)


if __name__ == "__main__":
    main()
