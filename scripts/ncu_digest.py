#!/usr/bin/env python3
"""Where a profiled kernel's instructions and stalls come from, by source line.

ncu's source page (scripts/device_ncu_prefill.sh writes it as source.csv.gz: one row per SASS
instruction with its address, executed count and stall samples) does not say which source line an
instruction came from; `nvdisasm -c -gi` listings of the same build (the script's sass/*.sass.gz) do,
inlining included. This joins the two by address, after picking the listing function whose opcodes
match the profiled instructions, and prints per source line: warp instructions executed, stall
samples and the commonest opcodes.

    python3 scripts/ncu_digest.py out/paged16/source.csv.gz out/sass/*.sass.gz [--file prefill_sm90.cuh] [--top 40]

--file attributes each instruction to the innermost line of that file in its inlining chain (so a
helper's instructions count for the kernel line that called it: the producer's fill loop, the
consumer's softmax); default: the file most instructions come from (innermost).
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import re
import sys

LOC = re.compile(r'## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNC = re.compile(r"^\.text\.(\S+):")


def opcode(text: str) -> str:
    words = text.replace("{", " ").split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else "?"


def read_text(path: str) -> str:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return f.read()


def read_listings(paths):
    """{function: {address: (opcode, inline chain [(file, line)], innermost first)}}

    nvdisasm -gi writes a location as consecutive lines, innermost first: `File A, line a inlined at
    File B, line b`, then `File B, line b inlined at ...`, down to the kernel's own line."""
    functions = {}
    for path in paths:
        name, chain, pending = None, [], []
        for line in read_text(path).splitlines():
            m = FUNC.match(line)
            if m:
                name = m.group(1)
                functions[name] = {}
                continue
            m = LOC.search(line)
            if m:
                if not pending:
                    pending.append((m.group(1).rsplit("/", 1)[-1], int(m.group(2))))
                if m.group(3):
                    pending.append((m.group(3).rsplit("/", 1)[-1], int(m.group(4))))
                continue
            m = INSTR.match(line)
            if m and name is not None:
                if pending:
                    chain, pending = pending, []
                functions[name][int(m.group(1), 16)] = (opcode(m.group(2)), chain)
    return functions


def read_profile(path: str):
    """[(address, opcode, executed, stall samples)] from ncu's source page CSV (SASS rows)."""
    rows = list(csv.reader(io.StringIO(read_text(path))))
    head = next((i for i, r in enumerate(rows) if any("Address" in c for c in r) and any("Source" in c for c in r)), None)
    if head is None:
        sys.exit(f"{path}: no header row with 'Address' and 'Source' columns")
    cols = rows[head]

    def col(*names):
        for n in names:
            for i, c in enumerate(cols):
                if c.strip().strip("#").strip() == n:
                    return i
        return None

    ia, isrc = col("Address"), col("Source")
    iexec = col("Instructions Executed", "Warp Instructions Executed")
    istall = col("Warp Stall Sampling (All Samples)", "Warp Stall Sampling (All Cycles)")
    if None in (ia, isrc):
        sys.exit(f"{path}: columns not found in {cols}")

    def number(r, i):
        if i is None or i >= len(r):
            return 0.0
        try:
            return float(r[i].replace(",", "") or 0)
        except ValueError:
            return 0.0

    out = []
    for r in rows[head + 1:]:
        if len(r) <= max(ia, isrc):
            continue
        try:
            address = int(r[ia], 16)
        except ValueError:
            continue
        out.append((address, opcode(r[isrc]), number(r, iexec), number(r, istall)))
    # ncu gives absolute addresses; the listing gives offsets from the function's start, which is the
    # lowest profiled address (the source page lists every instruction of the kernel).
    base = min((a for a, *_ in out), default=0)
    out = [(a - base, *rest) for a, *rest in out]
    if iexec is None or istall is None:
        print(f"note: executed column {'found' if iexec is not None else 'MISSING'}, stall column "
              f"{'found' if istall is not None else 'MISSING'}; columns: {cols}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    ap.add_argument("listings", nargs="+")
    ap.add_argument("--file", default=None)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    profile = read_profile(args.profile)
    functions = read_listings(args.listings)

    def agreement(fn):
        code = functions[fn]
        return sum(1 for a, op, _, _ in profile if a in code and code[a][0] == op)

    best = max(functions, key=agreement)
    matched = agreement(best)
    print(f"function {best}: {matched} of {len(profile)} profiled instructions match its listing")
    if matched < 0.9 * len(profile):
        print("warning: under 90 % match; the listing is not of the profiled build")
    code = functions[best]
    files = collections.Counter(code[a][1][0][0] for a, *_ in profile if a in code and code[a][1])
    focus = args.file or (files.most_common(1)[0][0] if files else None)

    by_line = collections.defaultdict(lambda: [0.0, 0.0, collections.Counter()])
    total_exec = total_stall = 0.0
    for address, op, executed, stall in sorted(profile):
        total_exec += executed
        total_stall += stall
        chain = code[address][1] if address in code else []
        line = next((l for f, l in chain if f == focus), None)  # the innermost line of the focus file
        key = f"{focus}:{line}" if line is not None else (f"{chain[0][0]}:{chain[0][1]}" if chain else "?")
        by_line[key][0] += executed
        by_line[key][1] += stall
        by_line[key][2][op] += executed
    print(f"totals: {total_exec:.4g} warp instructions executed, {total_stall:.4g} stall samples; "
          f"by the innermost line of {focus} each instruction came through\n")
    print(f"{'line':>26} {'executed':>10} {'%':>5} {'stalls':>9} {'%':>5}  opcodes (by executed)")
    ranked = sorted(by_line.items(), key=lambda kv: -(kv[1][0] / max(total_exec, 1) + kv[1][1] / max(total_stall, 1)))
    for key, (executed, stall, ops) in ranked[:args.top]:
        mix = " ".join(f"{o}:{n / max(executed, 1):.0%}" for o, n in ops.most_common(4))
        print(f"{key:>26} {executed:>10.4g} {100 * executed / max(total_exec, 1):>5.1f} {stall:>9.4g} "
              f"{100 * stall / max(total_stall, 1):>5.1f}  {mix}")


if __name__ == "__main__":
    main()
