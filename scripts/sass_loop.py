#!/usr/bin/env python3
"""The Hopper prefill's fill loop in SASS, without a GPU: per kernel function, its instruction count,
the consumers' fill loop (the innermost loop around a turn's BAR.SYNC, or around --anchor) with its
length and opcodes, and the turn (BAR.SYNC to the first HGMMA and to BAR.ARV). With --against, the
same for a second build and, per function, whether the two are identical, identical up to register
names, or different. The SASS-first step before any device call (benchmarks/RESULTS.md).

    nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr -Icsrc \\
      -DBSA_HEAD_DIM_PAD_128=1 [-D...] -c csrc/cuda/generated/prefill_sm90_bf16_hd128_k128.cu -o a.o
    python3 scripts/sass_loop.py a.o [--against b.o] [--function Li32EE] [--anchor 'DEPBAR.LE gsb0, 0x1']

An object (.o / .cubin) goes through cuobjdump (CUOBJDUMP, or the one on the PATH); a text file is
read as cuobjdump -sass output. --which k picks the k-th anchor in the function (default 1: the
first is the unit's first fill, outside the loop).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"BRA\s+(?:`?\(?[!U]?P\w+\)?,\s*)*0x([0-9a-f]+)")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")


def listing(path: str) -> dict[str, list[tuple[int, str]]]:
    """Function name -> [(offset, instruction text)] of a cuobjdump -sass listing."""
    if path.endswith((".o", ".cubin")):
        tool = os.environ.get("CUOBJDUMP", "cuobjdump")
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    else:
        with open(path) as f:
            text = f.read()
    functions: dict[str, list[tuple[int, str]]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            functions[name] = []
            continue
        m = INSTRUCTION.match(line)
        if name and m:
            functions[name].append((int(m.group(1), 16), m.group(2)))
    return functions


def opcode(text: str) -> str:
    return PREDICATE.sub("", text).split()[0].split(".")[0]


def fill_loop(code: list[tuple[int, str]], anchor: str, which: int):
    """The innermost loop (a backward branch's span) around the which-th anchor, or None."""
    anchors = [a for a, t in code if re.search(anchor, t)]
    if len(anchors) <= which:
        return None
    at = anchors[which]
    best = None
    for a, t in code:
        m = BRANCH.search(t)
        if m and int(m.group(1), 16) <= at <= a:
            span = (int(m.group(1), 16), a)
            if best is None or span[1] - span[0] < best[1] - best[0]:
                best = span
    if best is None:
        return None
    return at, [(a, t) for a, t in code if best[0] <= a <= best[1]]


def turn(body: list[tuple[int, str]], at: int):
    """Instructions from the turn's BAR.SYNC to the first HGMMA and to BAR.ARV."""
    after = [t for a, t in body if a > at]
    first = next((i for i, t in enumerate(after) if "HGMMA" in t), None)
    arrive = next((i for i, t in enumerate(after) if "BAR.ARV" in t), None)
    return first, arrive


def report(path: str, args) -> dict[str, list[tuple[int, str]]]:
    functions = {n: c for n, c in listing(path).items() if args.function in n}
    print(f"== {path}")
    for name, code in functions.items():
        print(f"{name[-60:]}: {len(code)} instructions")
        found = fill_loop(code, args.anchor, args.which)
        if found is None:
            print(f"   no loop around anchor {args.which} ({args.anchor!r})")
            continue
        at, body = found
        first, arrive = turn(body, at)
        print(f"   fill loop {body[0][0]:#x}-{body[-1][0]:#x}: {len(body)} instructions; "
              f"anchor to the first HGMMA {first}, to BAR.ARV {arrive}")
        counts = collections.Counter(opcode(t) for _, t in body)
        print("   " + ", ".join(f"{k} {v}" for k, v in counts.most_common(args.top)))
    return functions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sass", help="an object, a cubin or a cuobjdump -sass listing")
    parser.add_argument("--against", help="a second build's object or listing")
    parser.add_argument("--function", default="prefill_sm90_kernel", help="keep functions whose name contains this")
    parser.add_argument("--anchor", default=r"BAR\.SYNC.*0x100", help="regex of the instruction the loop holds")
    parser.add_argument("--which", type=int, default=1, help="the anchor's index in the function")
    parser.add_argument("--top", type=int, default=16, help="opcodes listed per loop")
    args = parser.parse_args()
    a = report(args.sass, args)
    if not args.against:
        return 0
    b = report(args.against, args)
    print("== the two builds, function by function")
    registers = re.compile(r"\bU?R\d+\b")
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name[-60:]}: only in {'the first' if name in a else 'the second'}")
            continue
        ta, tb = [t for _, t in a[name]], [t for _, t in b[name]]
        if ta == tb:
            verdict = "identical"
        elif [registers.sub("R", t) for t in ta] == [registers.sub("R", t) for t in tb]:
            verdict = "identical up to register names"
        else:
            verdict = f"different ({len(ta)} against {len(tb)} instructions)"
        print(f"{name[-60:]}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
