"""scripts/claims_model.py: the model of the persistent prefill's claims that put the end of a
kv-head-major work list at 1.4 % of dense 16k x 2's SM time idle (Nsight Compute measured 1.5 % on an
H100) and the tile-by-tile tail at 0.1 % (measured 0.15 %)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("claims_model", Path(__file__).resolve().parents[1] / "scripts/claims_model.py")
claims_model = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(claims_model)


def idle(*args):
    return claims_model.main(["--seq-len", "16384", "--batch", "2", *args])


def test_the_tail_ends_the_list_on_short_units():
    assert idle("--order", "kv", "--tail-tiles", "0") > 0.01
    assert idle("--order", "kv", "--tail-tiles", "50") < 0.002
    assert idle("--order", "tile") < 0.002


def test_claiming_ahead_is_what_idles_the_end():
    assert idle("--order", "kv", "--tail-tiles", "0", "--ahead", "0") < 0.001


def test_every_unit_is_listed_once():
    for order, tail in (("tile", 0), ("kv", 0), ("kv", 50), ("kv", 1000)):
        units = claims_model.work_list(16384, 2, order, tail, 1, 32, 8, False, 0.0)
        assert len(units) == 2 * 128 * 32
        assert sorted(units) == sorted(claims_model.work_list(16384, 2, "tile", 0, 1, 32, 8, False, 0.0))
