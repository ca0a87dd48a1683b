"""Host-side checks of the kernels' torch-free integer helpers, built with the host's C++ compiler and run
(each well under a few seconds), with AddressSanitizer and UBSan where the compiler has them:

- tests/cpp/fast_divisor_check.cpp: FastDivisor (csrc/common/pattern.h), the multiply-and-shift division
  the kernels' pattern walks and work-unit lookups use, against the hardware division (about 8 million
  divisor / dividend pairs). Every pattern test then runs the walk through it.
- tests/cpp/paged_rows_check.cpp: PagedRows (csrc/cuda/kernels/params.h), the paged K/V row addressing
  of the kernels' cp.async copies, against the table read row by row (which rows read, their offsets, one
  table read per page, no read past the live rows' entries).
- tests/cpp/unit_numbering_check.cpp: kv_major_unit and kv_group_size (csrc/cuda/kernels/params.h), the
  kv-head-major numbering of a long sequence's work units in groups of kv heads (BSA_PREFILL_KV_GROUP),
  its first tiles last and tile by tile (BSA_PREFILL_KV_TAIL): every (q head, tile) once, in the order
  the kernels rely on.
- tests/cpp/key_tiles_check.cpp: BlockKeyTiles (csrc/common/pattern.h), the prefill kernels' key tiles
  and the rows that see them, against block_visible."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def _sanitizers_work(compiler: str, tmp: str) -> bool:
    probe = Path(tmp) / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    built = subprocess.run([compiler, *SANITIZE, str(probe), "-o", str(Path(tmp) / "probe")], capture_output=True)
    return built.returncode == 0 and subprocess.run([str(Path(tmp) / "probe")], capture_output=True).returncode == 0


@pytest.mark.parametrize("check, least", [("fast_divisor_check", 1_000_000), ("paged_rows_check", 1_000_000),
                                          ("unit_numbering_check", 1_000_000), ("key_tiles_check", 1_000_000)])
def test_cpp_check(check, least, tmp_path):
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    flags = SANITIZE if _sanitizers_work(compiler, str(tmp_path)) else []
    binary = tmp_path / check
    subprocess.run([compiler, "-O2", "-std=c++17", *flags, f"-I{ROOT / 'csrc'}", str(ROOT / f"tests/cpp/{check}.cpp"),
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.endswith(" checks\n") and int(run.stdout.split()[0]) >= least, run.stdout
