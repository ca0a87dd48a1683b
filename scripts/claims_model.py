#!/usr/bin/env python3
"""How much of the persistent Hopper prefill's SM time idles at the end of its work list: a model.

The kernel runs one CTA an SM; each CTA's producer claims the next unit from a counter two units ahead
of the unit it starts (prefill_sm90.cuh, sm90_producer). This replays those claims over the work list
in the kernels' order (plan.cuh's list, load_prefill_item's numbering: sequence by sequence, tile by
tile from the last tile, or kv head by kv head with the first tiles as a tile-by-tile tail), each unit
costing its 128-key fills plus a fixed overhead, and prints the share of SM time idle at the end
(1 - mean busy / makespan) and the spread of the CTAs' finishing times.

Nsight Compute measured the same quantities for dense causal 16k x 2 (Phi-3-small, H100, 2026-12-05):
1.5 % idle without the tail (the model: 1.4 %), 0.15 % with it (the model: 0.1 %).

    python3 scripts/claims_model.py --seq-len 16384 --batch 2 --order kv --tail-tiles 0
"""
from __future__ import annotations

import argparse
import heapq


def unit_fills(tile: int, pattern: bool, local_blocks: int = 16, vert_stride: int = 8) -> float:
    """128-key fills of 128-row tile `tile` (two 64-token query blocks): causal, or roughly
    Phi-3-small's pattern (a band of local_blocks blocks, then every vert_stride-th block)."""
    if not pattern:
        return tile + 1
    last_block = 2 * tile + 1
    blocks = min(last_block + 1, local_blocks + 1) + max(0, last_block - local_blocks) // vert_stride
    return blocks / 2


def work_list(seq_len: int, batch: int, order: str, tail_tiles: int, group: int, q_heads: int, kv_heads: int,
              pattern: bool, overhead: float) -> list[float]:
    """Unit costs in claim order, sequence by sequence."""
    tiles = seq_len // 128
    per_kv = q_heads // kv_heads
    cost = [unit_fills(t, pattern) + overhead for t in range(tiles)]
    units: list[float] = []
    for _ in range(batch):
        if order == "tile":
            units += [cost[t] for t in reversed(range(tiles)) for _ in range(q_heads)]
            continue
        tail = min(tail_tiles, tiles)
        for _ in range(kv_heads // group):  # kv_major_unit: groups of kv heads, each from its last tile
            units += [cost[t] for t in reversed(range(tail, tiles)) for _ in range(group * per_kv)]
        units += [cost[t] for t in reversed(range(tail)) for _ in range(q_heads)]  # the tail, tile by tile
    return units


def replay(units: list[float], ctas: int, ahead: int) -> tuple[float, float]:
    """(idle share at the end, spread of the finishing times / makespan): each CTA holds `ahead`
    claimed units and claims the next one when it starts a unit (ahead = 0: a CTA claims when free)."""
    claims = iter(units)
    queues: list[list[float]] = [[] for _ in range(ctas)]
    for _ in range(ahead):
        for queue in queues:
            unit = next(claims, None)
            if unit is not None:
                queue.append(unit)
    ready = [(0.0, c) for c in range(ctas)]
    finished = [0.0] * ctas
    while ready:
        now, c = heapq.heappop(ready)
        unit = queues[c].pop(0) if queues[c] else next(claims, None)  # ahead = 0: claimed when free
        if unit is None:
            finished[c] = now
            continue
        claimed = next(claims, None) if ahead > 0 else None
        if claimed is not None:
            queues[c].append(claimed)
        heapq.heappush(ready, (now + unit, c))
    makespan = max(finished)
    return 1 - sum(units) / ctas / makespan, (makespan - min(finished)) / makespan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--order", choices=("tile", "kv"), default="kv")
    ap.add_argument("--tail-tiles", type=int, default=50, help="kv order: the first tiles numbered last, tile by tile")
    ap.add_argument("--group", type=int, default=1, help="kv order: kv heads a group")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--pattern", action="store_true", help="Phi-3-small's pattern instead of dense causal")
    ap.add_argument("--overhead", type=float, default=1.5, help="a unit's fixed cost, in fills")
    ap.add_argument("--ctas", type=int, default=132)
    ap.add_argument("--ahead", type=int, default=2, help="units claimed ahead of the one started")
    args = ap.parse_args(argv)
    if args.kv_heads % args.group or args.q_heads % args.kv_heads:
        ap.error("--group must divide --kv-heads, which must divide --q-heads")
    units = work_list(args.seq_len, args.batch, args.order, args.tail_tiles, args.group, args.q_heads,
                      args.kv_heads, args.pattern, args.overhead)
    idle, spread = replay(units, args.ctas, args.ahead)
    print(f"{len(units)} units over {args.ctas} CTAs, {args.ahead} ahead: idle at the end {100 * idle:.2f} %, "
          f"finishing spread {100 * spread:.2f} %")
    return idle


if __name__ == "__main__":
    main()
