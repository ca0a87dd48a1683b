"""benchmarks/sustained.py (the workloads scripts/device_power.sh samples): a malformed workload is
refused with a message that names it before any tensor is made, so a typo in WORKLOADS costs no GPU time."""
from __future__ import annotations

import pathlib

import pytest

from _helpers import load_benchmark


@pytest.fixture(scope="module")
def sustained():
    with pytest.MonkeyPatch.context() as mp:  # it imports bench_prefill from its own folder
        mp.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
        yield load_benchmark("sustained")


@pytest.mark.parametrize("spec, message", [
    ("ours:diagonal:8192", "layout must be pattern or dense"),
    ("fa4:pattern:8192", "fa4 or sdpa-cudnn \\(dense only\\)"),
    ("fa5:dense:8192", "methods are"),
    ("ours:dense", "expected matmul or METHOD:LAYOUT:S"),
    ("ours:dense:8k", "expected matmul or METHOD:LAYOUT:S"),
])
def test_bad_workload_is_refused(sustained, spec, message):
    with pytest.raises(SystemExit, match=message) as e:
        sustained.workload(spec)
    assert spec in str(e.value)
