"""Is a prefill's speed a property of the process or of where its buffers lie?

Dense causal 8k x 4 (Phi-3-small layer, bf16) runs at two speeds by process on the H100: ours 3.39-3.46
or 3.62-3.76 ms, cuDNN 3.33-3.34 or 3.59-3.85 ms in the same six processes, the two not slow together
(2026-12-05). A dense bar against a peer timed in one process then reads whichever mode each got.
This script allocates --sets input sets (q, k, v) and --outs output buffers up front, then, in
--rounds interleaved rounds within one process, times ours on every (input set, output buffer) pair
and the dense peers (cuDNN's SDPA on CUDA, FA4 where installed; plain SDPA on the CPU) on every input
set, and prints each buffer's address. Unlike bench_prefill.py, each timing repeats one input set
(each set is far larger than the L2).

- One input set or output buffer slow in every round: where the data lies decides (compare processes
  by buffer, not by method).
- Every pair alike within the process, but processes differ: the process, or the card's state, does.
- Rounds drifting together: the card's clock.

    python benchmarks/bench_modes.py --sets 3 --outs 3            # run it in a few fresh processes
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prefill as bp  # noqa: E402  (the benchmarks are scripts, not a package)

from blocksparse_attn import ops  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pattern", action="store_true", help="Phi-3-small's pattern instead of dense causal")
    ap.add_argument("--sets", type=int, default=3, help="input sets (q, k, v), each timed on its own")
    ap.add_argument("--outs", type=int, default=3, help="output buffers of ours")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if min(args.sets, args.outs, args.rounds, args.repeats) < 1:
        ap.error("--sets, --outs, --rounds and --repeats take at least 1")
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = bp.time_cuda if cuda else bp.time_cpu
    pattern = bp.layer_pattern(dense=not args.pattern)
    scale = 1.0 / bp.HEAD_DIM
    inputs = [bp.make_inputs(args.batch, args.seq_len, dtype, args.device, seed) for seed in range(args.sets)]
    outs = [torch.empty_like(inputs[0]["q"]) for _ in range(args.outs)]

    def ours(x, out):
        return lambda: ops.varlen_prefill(x["q"], x["k"], x["v"], x["cu"], x["cu"], scale, pattern, out=out)

    calls = {f"ours set {i} out {j}": ours(x, out) for i, x in enumerate(inputs) for j, out in enumerate(outs)}
    if not args.pattern:  # the dense peers, each skipped with a note where it does not run here
        sdpa = "sdpa-cudnn" if cuda else "sdpa"
        backend = torch.nn.attention.SDPBackend.CUDNN_ATTENTION if cuda else None
        peers = {sdpa: bp.first_call_or_note(sdpa, [bp.sdpa_fn(x, scale, backend) for x in inputs])}
        if cuda:
            peers["fa4"] = bp.first_call_or_note("fa4", bp.fa4_fns(inputs, scale))
        for peer, fns in peers.items():
            calls.update({f"{peer} set {i}": fn for i, fn in enumerate(fns or [])})
    times = {name: [] for name in calls}
    for r in range(args.rounds):
        names = list(calls)
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts one further on
            times[name].append(timer([calls[name]], args.warmup, args.repeats))

    at = lambda t: f"{t.data_ptr():#x}"  # noqa: E731
    layout = "the pattern" if args.pattern else "dense causal"
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, {dtype}, {layout}, {args.seq_len} x {args.batch}, "
          f"{args.rounds} rounds of {args.repeats} calls (ms: median over rounds, then each round)")
    for i, x in enumerate(inputs):  # ours and FA4 read q, k, v; SDPA its [B, H, S, D] copies
        print(f"  set {i}: q at {at(x['q'])}, k at {at(x['k'])}, v at {at(x['v'])}; "
              f"SDPA's q at {at(x['q4'])}, k at {at(x['k4'])}, v at {at(x['v4'])}")
    for j, out in enumerate(outs):
        print(f"  out {j}: at {at(out)}")
    for name, ms in times.items():
        print(f"  {name:>22}  {statistics.median(ms):8.3f}   " + " ".join(f"{t:.3f}" for t in ms))
    return times


if __name__ == "__main__":
    main()
