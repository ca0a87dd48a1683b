"""scripts/sass_loop.py reads cuobjdump listings: the innermost loop around a turn's BAR.SYNC, the
turn's distances to the first HGMMA and to BAR.ARV, and whether two builds' functions are identical,
identical up to register names, or different."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sass_loop.py"


def listing(path, name, body):
    """A cuobjdump -sass style listing of one function; body: instruction texts, 16 bytes apart."""
    lines = ["", f"\tFunction : {name}", "\t.headerflags\t@\"EF_CUDA_SM90\""]
    lines += [f"        /*{16 * i:04x}*/                   {text} ;  /* 0x0 */" for i, text in enumerate(body)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# A unit loop (0x0000-0x00b0) around a fill loop (0x0020-0x00a0) with the turn at 0x0040; the first
# BAR.SYNC (0x0010) is the unit's first fill, outside the fill loop.
BODY = [
    "UIADD3 UR4, UR4, 0x1, URZ",                       # 0x00
    "BAR.SYNC.DEFER_BLOCKING R0, 0x100",               # 0x10
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR16], R15",  # 0x20
    "@!P1 BRA 0x20",                                   # 0x30: a wait loop, not around the turn
    "BAR.SYNC.DEFER_BLOCKING R0, 0x100",               # 0x40
    "UMOV UR17, 0x40000040",                           # 0x50
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], RZ, !UPT",  # 0x60
    "BAR.ARV R19, 0x100",                              # 0x70
    "MUFU.EX2 R3, R3",                                 # 0x80
    "MUFU.EX2 R4, R4",                                 # 0x90
    "@P0 BRA 0x20",                                    # 0xa0: the fill loop
    "@P2 BRA 0x0",                                     # 0xb0: the unit loop
]


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True).stdout


def test_the_innermost_loop_around_the_turn(tmp_path):
    out = run(listing(tmp_path / "a.sass", "prefill_sm90_kernel_one", BODY))
    assert "prefill_sm90_kernel_one: 12 instructions" in out
    assert "fill loop 0x20-0xa0: 9 instructions; anchor to the first HGMMA 1, to BAR.ARV 2" in out
    assert "MUFU 2" in out


def test_a_missing_anchor_is_reported(tmp_path):
    out = run(listing(tmp_path / "a.sass", "prefill_sm90_kernel_one", BODY), "--which", "2")
    assert "no loop around anchor 2" in out


def test_two_builds_compared(tmp_path):
    renamed = [t.replace("R3, R3", "R5, R5") for t in BODY]
    changed = BODY[:5] + ["UMOV UR17, 0x40000080"] + BODY[6:]
    a = listing(tmp_path / "a.sass", "prefill_sm90_kernel_one", BODY)
    for other, verdict in ((BODY, "identical"), (renamed, "identical up to register names"),
                           (changed, "different (12 against 12 instructions)")):
        b = listing(tmp_path / "b.sass", "prefill_sm90_kernel_one", other)
        out = run(a, "--against", b)
        assert out.splitlines()[-1] == f"prefill_sm90_kernel_one: {verdict}"
