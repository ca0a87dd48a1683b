"""Test configuration: which devices the suite runs on, and a seeded generator per test case.

DEVICES is ["cpu"] plus "cuda" where a GPU is visible. `DEVICE=cuda pytest` (or `DEVICE=cpu`, or a
comma-separated list) runs the device-parametrised tests on those devices only; a CUDA case on a
machine without a GPU is skipped, never failed.

Every test that takes a `device` argument is parametrised over DEVICES here, so a test file only
lists the axes that are its own (head dims, dtypes, block sizes, ...).
"""
from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # lets the test files import _helpers

HAS_CUDA = torch.cuda.is_available()

_requested = os.environ.get("DEVICE", "").strip()
DEVICES = [d.strip() for d in _requested.split(",") if d.strip()] if _requested else \
    ["cpu"] + (["cuda"] if HAS_CUDA else [])

_NO_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")


def device_param(device: str):
    """A pytest.param for `device` that skips cleanly where that device is missing."""
    return pytest.param(device, marks=_NO_CUDA, id=device) if device.startswith("cuda") else \
        pytest.param(device, id=device)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames and not _already_parametrized(metafunc, "device"):
        metafunc.parametrize("device", [device_param(d) for d in DEVICES])


def _already_parametrized(metafunc, name: str) -> bool:
    return any(name in m.args[0] if isinstance(m.args[0], (list, tuple)) else
               name in [a.strip() for a in m.args[0].split(",")]
               for m in metafunc.definition.iter_markers("parametrize"))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
