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

--stalls adds ptxas's own schedule: each instruction's stall count (the cycles its warp waits before
it issues the next one, from the control bits in the instruction's second 64-bit word), summed as
static cycles over the loop's basic blocks and along one path through the loop, its shortest from
top to back branch (a steady fill's: the mask, the rescale and a wait's retry are the longer arms),
or the loop less the --skip ranges (hex offsets a-b, b excluded), cut at the turn's landmarks (the loop's top, BAR.SYNC, the first HGMMA, BAR.ARV,
the S wait `DEPBAR.LE gsb0, 0x1`, the P.V wait `0x0`, the loop's end). Waits on variable-latency
results (shared loads, shuffles, MUFU, wgmma, barriers) are not in the counts: static cycles are a
floor of a warp's time, for comparing two loops' issue schedules segment by segment, not a timing.
FlashAttention-4's loop (scripts/fa4_sass.sh's listing) takes --function kernel --which 2.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from typing import NamedTuple

INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
CONTROL_WORD = re.compile(r"^\s*/\* 0x([0-9a-f]{16}) \*/\s*$")  # an instruction's second (high) word
BRANCH = re.compile(r"BRA\s+(?:`?\(?[!U]?P\w+\)?,\s*)*0x([0-9a-f]+)")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")
LANDMARKS = (("BAR.SYNC", None), ("first HGMMA", r"HGMMA"), ("BAR.ARV", r"BAR\.ARV"),
             ("S wait", r"DEPBAR\.LE gsb0, 0x1"), ("P.V wait", r"DEPBAR\.LE gsb0, 0x0"))


class Instruction(NamedTuple):
    offset: int
    text: str
    stall: int | None  # None: the listing has no control word for it


def stall_count(high_word: int) -> int:
    """The stall field of the control bits (Volta and later): bits 105-108 of the 128-bit
    instruction, 41-44 of its high word. Then yield, write and read barriers, wait mask, reuse."""
    return (high_word >> 41) & 0xF


def listing(path: str) -> dict[str, list[Instruction]]:
    """Function name -> its instructions, from a cuobjdump -sass listing."""
    if path.endswith((".o", ".cubin")):
        tool = os.environ.get("CUOBJDUMP", "cuobjdump")
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    else:
        with open(path) as f:
            text = f.read()
    functions: dict[str, list[Instruction]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            functions[name] = []
            continue
        if name is None:
            continue
        m = INSTRUCTION.match(line)
        if m:
            functions[name].append(Instruction(int(m.group(1), 16), m.group(2), None))
            continue
        m = CONTROL_WORD.match(line)
        if m and functions[name] and functions[name][-1].stall is None:
            functions[name][-1] = functions[name][-1]._replace(stall=stall_count(int(m.group(1), 16)))
    return functions


def opcode(text: str) -> str:
    return PREDICATE.sub("", text).split()[0].split(".")[0]


def fill_loop(code: list[Instruction], anchor: str, which: int):
    """The innermost loop (a backward branch's span) around the which-th anchor, or None."""
    anchors = [i.offset for i in code if re.search(anchor, i.text)]
    if len(anchors) <= which:
        return None
    at = anchors[which]
    best = None
    for i in code:
        m = BRANCH.search(i.text)
        if m and int(m.group(1), 16) <= at <= i.offset:
            span = (int(m.group(1), 16), i.offset)
            if best is None or span[1] - span[0] < best[1] - best[0]:
                best = span
    if best is None:
        return None
    return at, [i for i in code if best[0] <= i.offset <= best[1]]


def turn(body: list[Instruction], at: int):
    """Instructions from the turn's BAR.SYNC to the first HGMMA and to BAR.ARV."""
    after = [i.text for i in body if i.offset > at]
    first = next((k for k, t in enumerate(after) if "HGMMA" in t), None)
    arrive = next((k for k, t in enumerate(after) if "BAR.ARV" in t), None)
    return first, arrive


def static_cycles(instructions: list[Instruction]) -> int:
    return sum(i.stall or 0 for i in instructions)


def basic_blocks(body: list[Instruction]) -> list[list[Instruction]]:
    """The loop cut before each branch target and after each branch."""
    targets = {int(m.group(1), 16) for i in body if (m := BRANCH.search(i.text))}
    blocks: list[list[Instruction]] = []
    for i in body:
        if not blocks or i.offset in targets or BRANCH.search(blocks[-1][-1].text):
            blocks.append([])
        blocks[-1].append(i)
    return blocks


def parse_ranges(text: str) -> list[tuple[int, int]]:
    ranges = []
    for part in filter(None, text.split(",")):
        a, b = part.split("-")
        ranges.append((int(a, 16), int(b, 16)))
    return ranges


def shortest_path(body: list[Instruction]) -> list[Instruction]:
    """The loop's shortest path in static cycles from its top to its back branch: from each block on
    to the next one unless it ends in an unpredicated branch, and to a branch's target further on in
    the loop. A steady fill takes it where the arms it skips (mask, rescale, a wait's retry) are the
    longer ways; a branch out of the loop (a unit's end) leads nowhere."""
    blocks = basic_blocks(body)
    start = {block[0].offset: k for k, block in enumerate(blocks)}
    end = len(blocks)  # past the last block, whose back branch ends the path
    best: dict[int, tuple[int, list[int]]] = {0: (0, [])}  # block -> (cycles before it, route to it)
    for k, block in enumerate(blocks):
        if k not in best:
            continue
        cycles, route = best[k][0] + static_cycles(block), best[k][1] + [k]
        m = BRANCH.search(block[-1].text)
        successors = [end] if k + 1 == end else []
        if m and start.get(int(m.group(1), 16), -1) > k:
            successors.append(start[int(m.group(1), 16)])
        if (not m or PREDICATE.match(block[-1].text)) and k + 1 < end:
            successors.append(k + 1)
        for n in successors:
            if n not in best or best[n][0] > cycles:
                best[n] = (cycles, route)
    return [i for k in best[end][1] for i in blocks[k]] if end in best else []


def path_segments(body: list[Instruction], at: int, skip: list[tuple[int, int]]):
    """(segment name, instructions, static cycles) along the loop less the skipped ranges (without
    any: its shortest path), cut at the landmarks found in order after the anchor; the first
    segment is the loop's top to the anchor."""
    path = [i for i in body if not any(a <= i.offset < b for a, b in skip)] if skip else shortest_path(body)
    if not path:
        return path, []
    cuts = [("loop top", path[0].offset), ("BAR.SYNC", at)]
    for name, pattern in LANDMARKS[1:]:
        hit = next((i.offset for i in path if i.offset > cuts[-1][1] and re.search(pattern, i.text)), None)
        if hit is not None:
            cuts.append((name, hit))
    cuts.append(("loop end", path[-1].offset + 1))
    segments = []
    for (name, start), (next_name, end) in zip(cuts, cuts[1:]):
        part = [i for i in path if start <= i.offset < end]
        segments.append((f"{name} -> {next_name}", len(part), static_cycles(part)))
    return path, segments


def report_stalls(body: list[Instruction], at: int, args) -> None:
    if any(i.stall is None for i in body):
        print("   --stalls: the listing has no control words (cuobjdump -sass prints them)")
        return
    print(f"   static cycles of the whole loop: {static_cycles(body)}")
    if args.blocks:
        for block in basic_blocks(body):
            ops = collections.Counter(opcode(i.text) for i in block)
            print(f"     block {block[0].offset:#07x}-{block[-1].offset:#07x}: {len(block):4d} instructions, "
                  f"{static_cycles(block):5d} cycles; " + ", ".join(f"{k} {v}" for k, v in ops.most_common(4)))
    path, segments = path_segments(body, at, parse_ranges(args.skip))
    print(f"   path ({len(path)} instructions, {static_cycles(path)} static cycles"
          + (f", skipping {args.skip}" if args.skip else "") + "):")
    for name, count, cycles in segments:
        print(f"     {name}: {count} instructions, {cycles} cycles")


def report(path: str, args) -> dict[str, list[Instruction]]:
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
        print(f"   fill loop {body[0].offset:#x}-{body[-1].offset:#x}: {len(body)} instructions; "
              f"anchor to the first HGMMA {first}, to BAR.ARV {arrive}")
        counts = collections.Counter(opcode(i.text) for i in body)
        print("   " + ", ".join(f"{k} {v}" for k, v in counts.most_common(args.top)))
        if args.stalls:
            report_stalls(body, at, args)
    return functions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sass", help="an object, a cubin or a cuobjdump -sass listing")
    parser.add_argument("--against", help="a second build's object or listing")
    parser.add_argument("--function", default="prefill_sm90_kernel", help="keep functions whose name contains this")
    parser.add_argument("--anchor", default=r"BAR\.SYNC.*0x100", help="regex of the instruction the loop holds")
    parser.add_argument("--which", type=int, default=1, help="the anchor's index in the function")
    parser.add_argument("--top", type=int, default=16, help="opcodes listed per loop")
    parser.add_argument("--stalls", action="store_true", help="static cycles from ptxas's stall counts")
    parser.add_argument("--blocks", action="store_true", help="with --stalls: each basic block's static cycles")
    parser.add_argument("--skip", default="", help="with --stalls: the path is the loop less these hex ranges a-b,c-d")
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
        ta, tb = [i.text for i in a[name]], [i.text for i in b[name]]
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
