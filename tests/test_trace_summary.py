"""scripts/sm90_trace_summary.py reads a BSA_SM90_TRACE build's stderr (one line per fill of CTA 0,
csrc/cuda/kernels/prefill_sm90_trace.cuh's events) and reports, fill by fill, the producer's slot
wait and issue, the spread of its warps, the consumers' wait, the copies' landing, the slot's wake,
the fills' period and the consumer groups' loop: checked on synthetic traces whose intervals are known."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sm90_trace_summary.py"
sys.path.insert(0, str(SCRIPT.parent))
from sm90_trace_summary import EVENTS as E  # noqa: E402  (the kernel's event offsets)

EVENTS = max(E.values()) + 4  # the last event has one per producer warp


def trace_line(fill, t, warps, slow_warp_extra):
    e = [0] * EVENTS
    for w in range(warps):
        e[E["SlotWait"] + w] = t
        e[E["SlotFree"] + w] = t + 100
        e[E["Issued"] + w] = t + 300 + (slow_warp_extra if w == warps - 1 else 0)
        e[E["PageKnown"] + w] = t + 150 if warps > 1 else 0  # TMA pages only
        e[E["LookupStart"] + w] = t + 120 if warps > 1 else 0
        e[E["BoxesIssued"] + w] = t + 250
        e[E["FirstTileIssued"] + w] = t + 180
    for g, (wait, landed, released) in enumerate([(200, 900, 1500), (210, 905, 1600)]):
        e[E["FillWait"] + g], e[E["FillLanded"] + g], e[E["KeyReleased"] + g] = t + wait, t + landed, t + released
    return f"sm90_trace {fill} " + " ".join(map(str, e))


def run(tmp_path, lines, *args):
    log = tmp_path / "trace.log"
    log.write_text("unrelated output\nsm90_trace fills 1024 events %d\n" % EVENTS + "\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, str(SCRIPT), str(log), *args], capture_output=True, text=True,
                         check=True).stdout
    rows = [l.split() for l in out.splitlines()[1:]]  # name words, median, mean, p90, (n=...)
    return {" ".join(r[:-1]) if r[-1] == "-" else " ".join(r[:-4]): None if r[-1] == "-" else
            [float(x) for x in r[-4:-1]] for r in rows}, out


def test_intervals_of_a_known_trace(tmp_path):
    lines = [trace_line(n, 1000 + 2000 * n, 4, 40) for n in range(50)]
    stats, out = run(tmp_path, lines)
    assert "50 fills traced, 4 producer warp(s)" in out
    assert stats["slot wait"] == [100, 100, 100]
    assert stats["issue"] == [240, 240, 240]          # the slowest warp's issue
    assert stats["warp spread"] == [40, 40, 40]              # spread
    assert stats["fill wait g0"] == [700, 700, 700]
    assert stats["fill wait g1"] == [695, 695, 695]
    assert stats["landing"] == [560, 560, 560]        # landed - last warp's arrival
    assert stats["wake"] == [2500, 2500, 2500]        # free(n) - release(n - 2): 4000 + 100 - 1600
    assert stats["period"] == [2000, 2000, 2000]
    assert stats["lookup start"] == [20, 20, 20]
    assert stats["page wait"] == [50, 50, 50]
    assert stats["box issue"] == [100, 100, 100]      # from the page id
    assert stats["first tile"] == [30, 30, 30]
    assert stats["after boxes"] == [90, 90, 90]       # the slow warp: 340 - 250


def test_one_warp_and_unrecorded_fills(tmp_path):
    lines = [trace_line(n, 1000 + 2000 * n, 1, 0) for n in range(10)]
    lines.append("sm90_trace 10 " + " ".join(["0"] * EVENTS))  # past the kernel's last fill
    stats, out = run(tmp_path, lines, "--warps", "1", "--key-slots", "3")
    assert "11 fills traced, 1 producer warp(s)" in out
    assert stats["issue"] == [200, 200, 200]
    assert stats["warp spread"] == [0, 0, 0]
    assert stats["wake"] == [4500, 4500, 4500]        # three fills back
    assert stats["page wait"] is None and stats["lookup start"] is None and stats["box issue"] == [150, 150, 150]  # no page ids: from the slots
    assert stats["first tile"] == [80, 80, 80]
    assert "(n=10)" in out and "(n=11)" not in out


def consumer_trace(group1_offset):
    """20 fills, one every 2000 cycles; group 1 takes its turn group1_offset cycles after group 0,
    and each group's steps take known times."""
    lines = []
    for n in range(20):
        t = 1000 + 2000 * n
        e = trace_line(n, t, 1, 0).split()[2:]
        e = [int(x) for x in e]
        for g, offset in enumerate((0, group1_offset)):
            base = t + 900 + offset  # the fill lands at t + 900 (group 0) / t + 905 (group 1)
            e[E["Turn"] + g] = base + 50
            e[E["KeyReleased"] + g] = base + 50 + 400
            e[E["Voted"] + g] = base + 50 + 400 + 220 if n < 15 else 0  # traces before it: none
            e[E["PvDone"] + g] = base + 50 + 400 + 300
            e[E["Ready"] + g] = base + 50 + 400 + 300 + 500
            if n % 2:  # value barriers: the previous fill's values seen 120 cycles into the turn
                e[E["ValuesSeen"] + g] = base + 50 + 120
        lines.append(f"sm90_trace {n} " + " ".join(map(str, e)))
    return lines


def test_consumer_groups_loop(tmp_path):
    """Each group's turn, S done (its key slot's release), previous P.V done and P packed, and the
    hand-overs between the groups, on a trace with known intervals (a fill every 2000 cycles)."""
    stats, out = run(tmp_path, consumer_trace(700), "--warps", "1")  # group 1 700 cycles after group 0
    assert stats["turn wait g0"] == [50, 50, 50]      # turn - landed (t + 900)
    assert stats["turn wait g1"] == [745, 745, 745]   # t + 1650 - (t + 905)
    assert stats["S done g0"] == [400, 400, 400]
    assert stats["value wait g1"] == [120, 120, 120] and "(n=10)" in out  # only the fills that recorded it
    assert stats["to P.V done g1"] == [300, 300, 300]
    assert stats["to vote g1"] == [220, 220, 220] and stats["P.V wait g1"] == [80, 80, 80] and "(n=15)" in out
    assert stats["softmax g0"] == [500, 500, 500]
    assert stats["to next turn g0"] == [800, 800, 800]  # ready t + 2150, next turn t + 2950
    assert stats["turn period g1"] == [2000, 2000, 2000]
    assert stats["hand-over 0->1"] == [700, 700, 700]
    assert stats["hand-over 1->0"] == [1300, 1300, 1300]
    assert stats["softmax overlap"] == [0, 0, 0] and "(n=19)" in out  # windows 700 apart, 500 long; fill 0 has no n - 1
    listing = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "trace.log"), "--warps", "1", "--fills", "3:5"],
                             capture_output=True, text=True, check=True).stdout
    assert " 3 g0 (-50,0,400,700,1200)  g1 (-45,700,1100,1400,1900)" in listing  # from group 0's turn


def test_softmax_overlap(tmp_path):
    """Group 1 300 cycles behind group 0: each group's 500-cycle softmax window overlaps the other's
    by 200 cycles (group 0's of fill n against group 1's of the same fill; fill n - 1's ended 1700
    cycles earlier)."""
    stats, _ = run(tmp_path, consumer_trace(300), "--warps", "1")
    assert stats["softmax overlap"] == [200, 200, 200]
    assert stats["hand-over 0->1"] == [300, 300, 300]
