"""benchmarks/bench_decode.py's timing of graph-replayed decodes: a graph of N captured calls replays all
N, and the time is charged per call; --graph-calls is refused without --graph."""
from __future__ import annotations

import sys

import pytest
import torch

from _helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_decode")


def test_graph_calls_without_graph_is_refused(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--device", "cpu", "--graph-calls", "4"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--graph-calls" in capsys.readouterr().err


def test_graph_of_several_calls_replays_each(bench):
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    counter = torch.zeros(1, device="cuda")
    replay = bench.graphed(lambda: counter.add_(1), calls=5)
    before = counter.item()
    replay()
    torch.cuda.synchronize()
    assert counter.item() - before == 5
    assert replay.calls == 5
    assert bench.timed_ms(replay, "cuda", 1, 3) > 0
