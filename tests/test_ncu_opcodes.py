"""scripts/ncu_opcodes.py puts two kernels' ncu source pages side by side by opcode: instructions and
stall samples summed per opcode (predicates and thousands separators read), by stall reason, and
within the offset ranges asked for."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ncu_opcodes.py"
HEADER = ["# Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_wait",
          "stall_barrier", "stall_wait (Not Issued)"]


def write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "k"])
        w.writerow(HEADER)
        w.writerows(rows)
    return str(path)


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True).stdout


def rows_by_opcode(out):
    return {l.split()[0]: l.split() for l in out.splitlines()[4:] if l and not l.startswith("opcode")}


def test_opcodes_are_summed_side_by_side(tmp_path):
    a = write(tmp_path / "a.csv", [
        ["0x1000", "MUFU.EX2 R1, R0", "7", "1,000", "5", "0", "9"],
        ["0x1010", "@!P0 MUFU.EX2 R2, R0", "3", "1,000", "1", "0", "9"],
        ["0x1020", "FADD R2, R1, R1", "2", "500", "2", "0", "0"],
        ["0x1030", "BAR.SYNC.DEFER_BLOCKING 0x1", "4", "10", "0", "4", "0"]])
    b = write(tmp_path / "b.csv", [
        ["0x2000", "MUFU.EX2 R1, R0", "4", "2,000", "3", "0", "0"],
        ["0x2010", "FMUL R2, R1, R1", "6", "2,000", "0", "0", "0"]])
    out = run(a, b, "--reasons", "wait,barrier")
    assert out.splitlines()[0] == "samples: A 16, B 10; instructions: A 2510, B 4000"
    assert "  wait: A 8, B 3" in out and "  barrier: A 4, B 0" in out
    ops = rows_by_opcode(out)
    assert ops["MUFU.EX2"][1:4] == ["10", "4", "+6"]  # the predicated one counts
    assert ops["MUFU.EX2"][6:] == ["6/3", "0/0"]  # "Not Issued" columns are not reasons of their own
    assert ops["FMUL"][1:4] == ["0", "6", "-6"]
    assert ops["BAR.SYNC.DEFER_BLOCKING"][7] == "4/0"


def test_ranges_keep_offsets_from_each_kernels_first_instruction(tmp_path):
    a = write(tmp_path / "a.csv", [["0x1000", "FADD R1, R1, R1", "1", "1", "0", "0", "0"],
                                   ["0x1010", "MUFU.EX2 R1, R0", "5", "1", "0", "0", "0"]])
    b = write(tmp_path / "b.csv", [["0x2000", "MUFU.EX2 R1, R0", "9", "1", "0", "0", "0"]])
    out = run(a, b, "--range-a", "0x10:0x10", "--range-b", "0x0:0x0")
    assert out.splitlines()[0] == "samples: A 5, B 9; instructions: A 1, B 1"
    assert "FADD" not in rows_by_opcode(out)
