#!/usr/bin/env python3
"""Summarises BSA_SM90_TRACE output (csrc/cuda/kernels/prefill_sm90_trace.cuh): the stderr of a run of
a trace build, one "sm90_trace <fill> <clocks>" line per fill of CTA 0. Prints, in SM clock cycles
(median, mean, 90th percentile over the fills that recorded every event used):
  slot wait    producer warp's wait for the fill's free slots (per warp, then the slowest warp)
  issue        from the slots seen free to the fill issued and arrived on (slowest warp)
  warp spread  the last warp's arrival minus the first's
  fill wait    a consumer group's wait for the fill (group 0, group 1)
  landing      the fill seen landed minus its last producer arrival (the copies' flight, where the
               consumer was already waiting)
  wake         the slots seen free minus both groups' release of the key slot the fill reuses
               (--key-slots fills earlier; the value slot's release is not traced)
  period       consecutive fills seen landed by group 0
  lookup start from the slots seen free to the warp's first page id's lookup (TMA pages)
  page wait    from the slots seen free to the warp's first page id of the fill loaded (TMA pages;
               the slowest warp that recorded it)
  box issue    from then (or from the slots, over contiguous K/V) to the warp's last box issued
  first tile   the part of it up to the warp's boxes of the fill's first tile issued (128-key fills)
  after boxes  from the last box issued to the warp's arrival (records, arrival)
The consumer groups' loop, per group g (fills whose events g recorded):
  turn wait    from the fill seen landed to g's turn taken (the other group's hand-over)
  S done       from g's turn to its S seen done (the S product behind whatever the tensor pipe held)
  value wait   from g's turn to the previous fill's values seen landed (BSA_SM90_VALUE_BARRIERS
               builds: the values' own barrier, waited for between S's issue and P.V's)
  to P.V done  from S done to the previous fill's P.V seen done (row maxima, rescale vote, the wait)
  to vote      the part of it before the wait (traces since the fifty-first session)
  P.V wait     the wait itself: about 0 where the work before it, not the P.V, sets the chain
  softmax      from P.V done to P packed (exponentials, row sums, the pack)
  to next turn from P packed to g's next turn (record, fill wait, turn wait)
  turn period  g's consecutive turns
  hand-over    group 1's turn minus group 0's (same fill), group 0's next turn minus group 1's
  softmax overlap  cycles of group 0's softmax (fill n) during group 1's (fills n - 1 and n): the
               time the two groups' exponentials share a sub-partition's MUFU unit
With --fills a:b, also fills a..b-1 one by one: each warp's (slots free, first page id, last box,
arrival), then group 0's wait and landing and both groups' release of the key slot the fill reuses,
in cycles from the fill's first slot release (-: not recorded).
Usage: python3 scripts/sm90_trace_summary.py LOG [LOG ...] [--key-slots 2] [--warps 4] [--fills a:b]
"""
import argparse
import re
import statistics
from pathlib import Path

# The events' offsets, from the kernel's own list (Sm90TraceEvent).
HEADER = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "kernels" / "prefill_sm90_trace.cuh"
EVENTS = {name: int(value) for name, value in re.findall(r"\bkTrace(\w+) = (\d+)", HEADER.read_text())}
SLOT_WAIT, SLOT_FREE, ISSUED = EVENTS["SlotWait"], EVENTS["SlotFree"], EVENTS["Issued"]
FILL_WAIT, FILL_LANDED, KEY_RELEASED = EVENTS["FillWait"], EVENTS["FillLanded"], EVENTS["KeyReleased"]
PAGE_KNOWN, BOXES_ISSUED, FIRST_TILE = EVENTS["PageKnown"], EVENTS["BoxesIssued"], EVENTS["FirstTileIssued"]
LOOKUP_START = EVENTS["LookupStart"]
TURN, PV_DONE, READY, VALUES_SEEN = EVENTS["Turn"], EVENTS["PvDone"], EVENTS["Ready"], EVENTS["ValuesSeen"]
VOTED = EVENTS["Voted"]


def read(path):
    rows = {}
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[0] == "sm90_trace" and parts[1].isdigit():
                rows[int(parts[1])] = [int(x) for x in parts[2:]]
    return rows


def stats(values):
    if not values:
        return "-"
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return f"{statistics.median(values):8.0f} {statistics.fmean(values):8.0f} {p90:8.0f}   (n={len(values)})"


def summarise(rows, key_slots, warps):
    out = {k: [] for k in ("slot wait", "issue", "warp spread", "fill wait g0", "fill wait g1", "landing", "wake",
                           "period", "lookup start", "page wait", "box issue", "first tile", "after boxes")}
    for n, e in sorted(rows.items()):
        w = range(warps)
        if any(e[SLOT_FREE + i] == 0 or e[ISSUED + i] == 0 or e[SLOT_WAIT + i] == 0 for i in w):
            continue
        out["slot wait"].append(max(e[SLOT_FREE + i] - e[SLOT_WAIT + i] for i in w))
        out["issue"].append(max(e[ISSUED + i] for i in w) - max(e[SLOT_FREE + i] for i in w))
        out["warp spread"].append(max(e[ISSUED + i] for i in w) - min(e[ISSUED + i] for i in w))
        for g in range(2):
            if e[FILL_LANDED + g] and e[FILL_WAIT + g]:
                out[f"fill wait g{g}"].append(e[FILL_LANDED + g] - e[FILL_WAIT + g])
        issued = max(e[ISSUED + i] for i in w)
        if e[FILL_LANDED] and e[FILL_WAIT] and e[FILL_WAIT] < issued:
            out["landing"].append(e[FILL_LANDED] - issued)
        before = rows.get(n - key_slots)
        if before and before[KEY_RELEASED] and before[KEY_RELEASED + 1]:
            out["wake"].append(max(e[SLOT_FREE + i] for i in w) - max(before[KEY_RELEASED], before[KEY_RELEASED + 1]))
        looking = [i for i in w if len(e) > LOOKUP_START + i and e[LOOKUP_START + i]]
        if looking:
            out["lookup start"].append(max(e[LOOKUP_START + i] - e[SLOT_FREE + i] for i in looking))
        known = [i for i in w if len(e) > PAGE_KNOWN + i and e[PAGE_KNOWN + i]]
        if known:
            out["page wait"].append(max(e[PAGE_KNOWN + i] - e[SLOT_FREE + i] for i in known))
        boxes = [i for i in w if len(e) > BOXES_ISSUED + i and e[BOXES_ISSUED + i]]
        if boxes:
            start = {i: e[PAGE_KNOWN + i] if i in known else e[SLOT_FREE + i] for i in boxes}
            out["box issue"].append(max(e[BOXES_ISSUED + i] - start[i] for i in boxes))
            first = [i for i in boxes if len(e) > FIRST_TILE + i and e[FIRST_TILE + i]]
            if first:
                out["first tile"].append(max(e[FIRST_TILE + i] - start[i] for i in first))
            out["after boxes"].append(max(e[ISSUED + i] - e[BOXES_ISSUED + i] for i in boxes))
        prev = rows.get(n - 1)
        if prev and prev[FILL_LANDED] and e[FILL_LANDED]:
            out["period"].append(e[FILL_LANDED] - prev[FILL_LANDED])
    return out


def event(e, index):
    return e[index] if len(e) > index else 0


def summarise_consumers(rows):
    """The consumer groups' loop (events recorded by traces since the thirty-eighth session)."""
    out = {}
    for g in range(2):
        for k in ("turn wait", "S done", "value wait", "to P.V done", "to vote", "P.V wait", "softmax", "to next turn",
                  "turn period"):
            out[f"{k} g{g}"] = []
    out["hand-over 0->1"] = []
    out["hand-over 1->0"] = []
    out["softmax overlap"] = []
    window = lambda e, g: (event(e, PV_DONE + g), event(e, READY + g)) if e else (0, 0)  # noqa: E731
    for n, e in sorted(rows.items()):
        nxt = rows.get(n + 1)
        for g in range(2):
            landed, turn = event(e, FILL_LANDED + g), event(e, TURN + g)
            s_done, pv, ready = event(e, KEY_RELEASED + g), event(e, PV_DONE + g), event(e, READY + g)
            if landed and turn:
                out[f"turn wait g{g}"].append(turn - landed)
            if turn and s_done:
                out[f"S done g{g}"].append(s_done - turn)
            if turn and event(e, VALUES_SEEN + g):
                out[f"value wait g{g}"].append(event(e, VALUES_SEEN + g) - turn)
            if s_done and pv:
                out[f"to P.V done g{g}"].append(pv - s_done)
                voted = event(e, VOTED + g)
                if voted:
                    out[f"to vote g{g}"].append(voted - s_done)
                    out[f"P.V wait g{g}"].append(pv - voted)
            if pv and ready:
                out[f"softmax g{g}"].append(ready - pv)
            if nxt and ready and event(nxt, TURN + g) > ready:
                out[f"to next turn g{g}"].append(event(nxt, TURN + g) - ready)
            if nxt and turn and event(nxt, TURN + g) > turn:
                out[f"turn period g{g}"].append(event(nxt, TURN + g) - turn)
        own, others = window(e, 0), [window(rows.get(n - 1), 1), window(e, 1)]
        if all(own) and all(all(w) for w in others):
            out["softmax overlap"].append(sum(max(0, min(own[1], w[1]) - max(own[0], w[0])) for w in others))
        if event(e, TURN) and event(e, TURN + 1):
            out["hand-over 0->1"].append(event(e, TURN + 1) - event(e, TURN))
            if nxt and event(nxt, TURN):
                out["hand-over 1->0"].append(event(nxt, TURN) - event(e, TURN + 1))
    return {k: v for k, v in out.items() if v}


def consumer_lines(rows, first, last):
    """Fills first..last-1: each group's (landed, turn, S done, P.V done, packed), cycles from group
    0's turn of the fill."""
    lines = []
    for n in range(first, last):
        e = rows.get(n)
        if not e or not event(e, TURN):
            continue
        base = event(e, TURN)
        rel = lambda x: str(x - base) if x else "-"  # noqa: E731
        groups = "  ".join(f"g{g} ({','.join(rel(event(e, i + g)) for i in (FILL_LANDED, TURN, KEY_RELEASED, PV_DONE, READY))})"
                           for g in range(2))
        lines.append(f"  {n:5d} {groups}")
    return lines


def fill_lines(rows, key_slots, warps, first, last):
    """Fills first..last-1 one by one, relative to each fill's first slot release."""
    lines = []
    for n in range(first, last):
        e = rows.get(n)
        frees = [e[SLOT_FREE + i] for i in range(warps) if e and e[SLOT_FREE + i]] if e else []
        if not frees:
            continue
        base = min(frees)
        rel = lambda x: str(x - base) if x else "-"  # noqa: E731
        per_warp = " ".join(f"({rel(e[SLOT_FREE + i])},{rel(e[PAGE_KNOWN + i] if len(e) > PAGE_KNOWN + i else 0)},"
                            f"{rel(e[BOXES_ISSUED + i] if len(e) > BOXES_ISSUED + i else 0)},{rel(e[ISSUED + i])})"
                            for i in range(warps))
        before = rows.get(n - key_slots) or [0] * len(e)
        lines.append(f"  {n:5d} {per_warp}  g0 {rel(e[FILL_WAIT])},{rel(e[FILL_LANDED])}  released "
                     f"{rel(before[KEY_RELEASED])},{rel(before[KEY_RELEASED + 1])}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--key-slots", type=int, default=2, help="key slots of the ring (128-key fills: 2)")
    ap.add_argument("--warps", type=int, nargs="+", default=[4],
                    help="producer warps, one number per log or one for all (the one-warp producer: 1)")
    ap.add_argument("--fills", help="a:b: also list fills a..b-1 one by one")
    args = ap.parse_args()
    warps = args.warps * len(args.logs) if len(args.warps) == 1 else args.warps
    for path, nw in zip(args.logs, warps):
        rows = read(path)
        print(f"== {path}: {len(rows)} fills traced, {nw} producer warp(s); cycles: median, mean, p90")
        for name, values in summarise(rows, args.key_slots, nw).items():
            print(f"  {name:13s} {stats(values)}")
        for name, values in summarise_consumers(rows).items():
            print(f"  {name:16s} {stats(values)}")
        if args.fills:
            first, last = (int(x) for x in args.fills.split(":"))
            print("  fill  per warp (slots free, page id, last box, arrival)  group 0 (wait, landed)  "
                  f"key slot released by groups 0, 1 (fill n - {args.key_slots})")
            print("\n".join(fill_lines(rows, args.key_slots, nw, first, last)))
            print("  fill  per group (landed, turn, S done, P.V done, packed), from group 0's turn")
            print("\n".join(consumer_lines(rows, first, last)))


if __name__ == "__main__":
    main()
