"""benchmarks/bench_modes.py on the CPU: every (input set, output buffer) pair of ours and every input set
of the dense peer timed in every round, at a size the CPU runs quickly."""
from __future__ import annotations

from _helpers import load_benchmark


def test_cpu_run_times_every_pair(capsys):
    bench = load_benchmark("bench_modes")
    times = bench.main(["--device", "cpu", "--seq-len", "64", "--batch", "2", "--sets", "2", "--outs", "3",
                        "--rounds", "2", "--warmup", "0", "--repeats", "1"])
    ours = [name for name in times if name.startswith("ours")]
    assert len(ours) == 6 and {f"sdpa set {i}" for i in range(2)} <= set(times), times
    assert all(len(ms) == 2 and min(ms) > 0 for ms in times.values()), times
    assert "out 2: at" in capsys.readouterr().out
