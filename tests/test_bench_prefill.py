"""benchmarks/bench_prefill.py on the CPU: it runs end to end and writes its CSV, and its GPU-only peers
(FlashAttention-4, FlexAttention's FLASH backend) are skipped with a one-line note where they are missing
or fail, instead of stopping the run."""
from __future__ import annotations

import csv

import pytest

from _helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_prefill")


def test_cpu_run_writes_rows(bench, tmp_path, capsys):
    bench.main(["--device", "cpu", "--seq-lens", "128", "--methods", "ours,sdpa,fa4,flex-flash",
                "--out-dir", str(tmp_path), "--ref-max-tokens", "0"])
    rows = list(csv.DictReader(open(tmp_path / "bench_prefill_cpu_float32.csv")))
    assert {r["method"] for r in rows} == {"ours", "sdpa"}, rows  # the CUDA-only peers are not timed here
    assert all(float(r["ms"]) > 0 for r in rows)
    assert "sanity: vs SDPA" in capsys.readouterr().out


def test_unknown_method_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--device", "cpu", "--seq-lens", "128", "--methods", "ours,fa5", "--out-dir", str(tmp_path)])


def test_missing_or_failing_peer_is_a_note(bench, capsys):
    assert bench.first_call_or_note("fa4", None) is None
    assert "fa4: skipped (not installed" in capsys.readouterr().out

    def broken():
        raise RuntimeError("no FLASH backend in this torch")
    assert bench.first_call_or_note("flex-flash", [broken]) is None
    assert "flex-flash: skipped (RuntimeError: no FLASH backend" in capsys.readouterr().out
    calls = []
    fns = [lambda: calls.append(1)]
    assert bench.first_call_or_note("fa4", fns) is fns and calls == [1]


def test_interleaved_timing_takes_turns(bench, monkeypatch):
    """time_cuda_interleaved (CUDA timing, checked here with fake events): call r of every method runs
    before call r + 1 of any, consecutive calls read different input sets, and a method whose warm-up
    raises is reported instead of timed."""
    clock = [0.0]

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = clock[0]

        def elapsed_time(self, end):
            return end.at - self.at

    monkeypatch.setattr(bench.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda *a: None)
    log = []

    def method(name, cost):
        def run(input_set):
            def call():
                log.append((name, input_set))
                clock[0] += cost
            return call
        return [run(0), run(1)]

    def broken():
        raise RuntimeError("refused")
    times, errors = bench.time_cuda_interleaved(
        {"a": method("a", 1.0), "b": method("b", 2.0), "c": method("c", 3.0), "bad": [broken]}, warmup=2, repeats=4)
    assert times == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert list(errors) == ["bad"] and "refused" in str(errors["bad"])
    timed = log[6:]  # after each method's two warm-up calls
    assert [name for name, _ in timed] == ["a", "b", "c"] * 4
    assert all(x[1] != y[1] for x, y in zip(timed, timed[1:])), timed
