"""scripts/ncu_digest.py joins ncu's per-instruction counts with an nvdisasm -gi listing: an inlined
helper's instructions count for the kernel line that called it, and the listing function is the one
whose opcodes match the profiled addresses."""
from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ncu_digest.py"

LISTING = """\
.text._Z5otherv:
        /*0000*/                   EXIT ;
.text._Z6kernelv:
\t//## File "/src/kernel.cuh", line 10
        /*0000*/                   S2R R0, SR_TID.X ;
\t//## File "/src/ptx.cuh", line 3 inlined at "/src/softmax.cuh", line 7
\t//## File "/src/softmax.cuh", line 7 inlined at "/src/kernel.cuh", line 20
\t//## File "/src/kernel.cuh", line 20 inlined at "/src/kernel.cuh", line 99
        /*0010*/                   MUFU.EX2 R1, R0 ;
        /*0020*/                   FADD R2, R1, R1 ;
\t//## File "/src/kernel.cuh", line 30 inlined at "/src/kernel.cuh", line 99
        /*0030*/              @!P0 BRA `(.L_x_1) ;
"""


def run(tmp_path, rows):
    listing = tmp_path / "k.sass.gz"
    with gzip.open(listing, "wt") as f:
        f.write(LISTING)
    profile = tmp_path / "source.csv"
    with open(profile, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["# Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"])
        w.writerows(rows)
    return subprocess.run([sys.executable, str(SCRIPT), str(profile), str(listing), "--file", "kernel.cuh"],
                          capture_output=True, text=True, check=True).stdout


def test_inlined_instructions_count_for_the_calling_line(tmp_path):
    out = run(tmp_path, [["0x0000", "S2R R0, SR_TID.X", "1", "5"], ["0x0010", "MUFU.EX2 R1, R0", "7", "1,000"],
                         ["0x0020", "FADD R2, R1, R1", "2", "1,000"], ["0x0030", "@!P0 BRA `(.L_x_1)", "0", "3"]])
    assert "_Z6kernelv: 4 of 4" in out
    lines = {l.split()[0]: l.split() for l in out.splitlines() if l.strip().startswith("kernel.cuh:")}
    assert lines["kernel.cuh:20"][1] == "2000"  # MUFU and FADD, inlined from softmax.cuh / ptx.cuh
    assert lines["kernel.cuh:20"][3] == "9"
    assert lines["kernel.cuh:10"][1] == "5"
    assert lines["kernel.cuh:30"][1] == "3"


def test_a_listing_of_another_build_is_flagged(tmp_path):
    out = run(tmp_path, [["0x0000", "IMAD R0, R1, R2, R3", "1", "5"], ["0x0010", "LDG.E R1, [R2]", "1", "5"]])
    assert "warning: under 90 % match" in out
