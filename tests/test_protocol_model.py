"""scripts/sm90_protocol_model.py, the model of the Hopper prefill kernel's producer/consumer barrier
protocol: every configuration main builds (and each experiment knob's) runs 2,000 random unit
sequences without a deadlock, parity alias, overwrite, phase mix or unbalanced turn, and the model's
self-tests (broken protocols it must catch) pass. About 15 s on one core."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_protocol_model_finds_main_clean_and_catches_broken_protocols():
    run = subprocess.run([sys.executable, str(ROOT / "scripts/sm90_protocol_model.py")], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr  # the self-tests assert
    with_fix = [line for line in run.stdout.splitlines() if line.startswith("fix=True")]
    assert len(with_fix) >= 8, run.stdout
    for line in with_fix:
        results = ast.literal_eval(line[line.index("{"):])
        assert results == {"ok": 2000}, line
