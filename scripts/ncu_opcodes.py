#!/usr/bin/env python3
"""Two profiled kernels side by side, by SASS opcode: warp instructions executed and stall samples,
in all and by stall reason. Reads ncu's source page CSV (scripts/device_ncu_prefill.sh writes it as
source.csv.gz) and needs no source lines, so a peer's kernel (FlashAttention-4's, profiled with
NCU_KERNEL='[Ff]lash' and benchmarks/profile_prefill.py --method fa4) compares with ours. Both
profiles must sample at the same rate (ncu picks it; compare total samples per elapsed cycle).

    python3 scripts/ncu_opcodes.py ours/source.csv.gz fa4/source.csv.gz [--top 30] [--reasons wait,barrier,long_sb]
        [--range-a 0x3f10:0x7450] [--range-b 0x6100:0x7e40]

--range-a / --range-b keep the instructions at those offsets from each kernel's first instruction
(e.g. the consumers' main loop; scripts/ncu_digest.py finds it by source line in ours).
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import sys

from ncu_digest import opcode, read_text  # this script's folder


def read_rows(path: str):
    """[(offset from the first instruction, opcode, executed, samples, {reason: samples})]"""
    rows = list(csv.reader(io.StringIO(read_text(path))))
    head = next((i for i, r in enumerate(rows) if any("Address" in c for c in r) and any("Source" in c for c in r)),
                None)
    if head is None:
        sys.exit(f"{path}: no header row with 'Address' and 'Source' columns")
    names = [c.strip().strip("#").strip() for c in rows[head]]
    at = {c: i for i, c in enumerate(names)}
    reasons = [c for c in names if c.startswith("stall_") and "Not Issued" not in c]

    def number(r, name):
        i = at.get(name)
        try:
            return int(float(r[i].replace(",", "") or 0)) if i is not None and i < len(r) else 0
        except ValueError:
            return 0

    out, base = [], None
    for r in rows[head + 1:]:
        try:
            address = int(r[at["Address"]], 16)
        except (IndexError, ValueError):
            continue
        base = address if base is None else base
        out.append((address - base, opcode(r[at["Source"]]), number(r, "Instructions Executed"),
                    number(r, "Warp Stall Sampling (All Samples)"), {c[6:]: number(r, c) for c in reasons}))
    return out


def totals(rows, span):
    lo, hi = span
    by_op = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for offset, op, executed, samples, reasons in rows:
        if lo <= offset <= hi:
            entry = by_op[op]
            entry[0] += executed
            entry[1] += samples
            entry[2].update(reasons)
    return by_op


def span(text):
    if not text:
        return (0, 1 << 62)
    lo, hi = text.split(":")
    return int(lo, 16), int(hi, 16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--reasons", default="wait,barrier,long_sb,short_sb,dispatch,selected")
    ap.add_argument("--range-a", default="")
    ap.add_argument("--range-b", default="")
    args = ap.parse_args()
    a, b = totals(read_rows(args.a), span(args.range_a)), totals(read_rows(args.b), span(args.range_b))
    reasons = args.reasons.split(",")
    sum_a, sum_b = sum(v[1] for v in a.values()), sum(v[1] for v in b.values())
    print(f"samples: A {sum_a}, B {sum_b}; instructions: A {sum(v[0] for v in a.values()):.4g}, "
          f"B {sum(v[0] for v in b.values()):.4g}")
    for reason in reasons:
        print(f"  {reason}: A {sum(v[2][reason] for v in a.values())}, B {sum(v[2][reason] for v in b.values())}")
    print(f"{'opcode':26s} {'samples A':>10s} {'B':>8s} {'A-B':>8s} {'instr A':>10s} {'B':>10s}  "
          + " ".join(f"{r + ' A/B':>15s}" for r in reasons))
    empty = [0, 0, collections.Counter()]
    ops = sorted(set(a) | set(b), key=lambda op: -abs(a.get(op, empty)[1] - b.get(op, empty)[1]))
    for op in ops[:args.top]:
        x, y = a.get(op, empty), b.get(op, empty)
        print(f"{op:26s} {x[1]:10d} {y[1]:8d} {x[1] - y[1]:+8d} {x[0]:10.3g} {y[0]:10.3g}  "
              + " ".join(f"{x[2][r]:>7d}/{y[2][r]:<7d}" for r in reasons))


if __name__ == "__main__":
    main()
