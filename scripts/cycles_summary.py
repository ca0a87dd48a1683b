"""The summary of scripts/device_cycles.sh: per profile, the elapsed cycles, the SMs' active cycles
(mean, min, max; 1 - mean / elapsed is the SM time idle at the end), warp instructions, duration and
clock; then each set's median against the first set of its group. Also run by hand on the CSVs a
call brought back, e.g. after the call ran out of time:

    python3 scripts/cycles_summary.py <out>/cyc 2 'd16-0|0||...' 'd16-1|1||...'   (the CYCLE_SETS lines)

A set whose profile is missing prints "(no metrics)". `cycles_summary.py OUT ROUND --row LABEL` prints one
profile's line (device_cycles.sh does after each profile, so that a call cut short shows what it made:
the device tool brings back only a few files of a call's $OUT).
"""
import csv
import io
import os
import statistics
import sys

out, rounds, sets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


def metrics(path):
    if not os.path.exists(path):  # not profiled: the call ran out of time, or ncu failed
        return None
    text = open(path).read()
    start = text.find('"ID"')
    if start < 0:
        return None
    values = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        values[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    return values

HEADER = (f"{'set':>16} {'round':>5} {'elapsed cycles':>15} {'SM active mean':>15} {'min':>12} {'max':>12} "
          f"{'idle %':>7} {'warp instr':>11} {'ms':>7} {'MHz':>6}")


def row(label, r):
    """One profile's line, and its elapsed cycles (None when it has no metrics)."""
    m = metrics(f"{out}/{label}_r{r}.csv")
    if m is None:
        return f"{label:>16} {r:>5} (no metrics)", None
    cycles, active = m["gpc__cycles_elapsed.max"], m["sm__cycles_active.avg"]
    return (f"{label:>16} {r:>5} {cycles:>15,.0f} {active:>15,.0f} {m['sm__cycles_active.min']:>12,.0f} "
            f"{m['sm__cycles_active.max']:>12,.0f} {100 * (1 - active / cycles):>7.2f} "
            f"{m['smsp__inst_executed.sum']:>11.4g} {m['gpu__time_duration.sum'] / 1e6:>7.3f} "
            f"{cycles / m['gpu__time_duration.sum'] * 1e3:>6.0f}"), cycles  # base units: nanoseconds


if sets and sets[0] == "--row":  # device_cycles.sh, after each profile: its line at once (a call that runs
    print(row(sets[1], rounds)[0])  # out of time still shows the profiles it made)
    sys.exit(0)
print(HEADER)
elapsed = {}
for line in sets:
    label = line.split("|", 1)[0]
    for r in range(1, rounds + 1):
        text, cycles = row(label, r)
        print(text)
        if cycles is not None:
            elapsed.setdefault(label, []).append(cycles)
# Each set against the first set of its group: labels "<group>-<variant>" (d16-0, d16-1, ...) group by
# the part before the last "-"; a label without one is its own group.
bases = {}
for label, values in elapsed.items():
    median = statistics.median(values)
    group = label.rsplit("-", 1)[0] if "-" in label else label
    base_label, base = bases.setdefault(group, (label, median))
    print(f"{label}: median {median:,.0f} cycles ({100 * (median / base - 1):+.2f} % against {base_label})")
