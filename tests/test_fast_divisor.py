"""FastDivisor (csrc/common/pattern.h), the multiply-and-shift division the kernels' pattern walks and
work-unit lookups use, against the hardware division: tests/cpp/fast_divisor_check.cpp, built with
the host's C++ compiler and run (about 8 million divisor / dividend pairs, well under a second).
Every pattern test then runs the walk through it (test_pattern_walk.py and the kernels' tests)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fast_divisor_matches_division(tmp_path):
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    binary = tmp_path / "fast_divisor_check"
    subprocess.run([compiler, "-O2", "-std=c++17", f"-I{ROOT / 'csrc'}", str(ROOT / "tests/cpp/fast_divisor_check.cpp"),
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.endswith(" checks\n") and int(run.stdout.split()[0]) > 1_000_000, run.stdout
