"""scripts/sass_loop.py reads cuobjdump listings: the innermost loop around a turn's BAR.SYNC, the
turn's distances to the first HGMMA and to BAR.ARV, whether two builds' functions are identical,
identical up to register names, or different, and (--stalls) ptxas's stall counts summed along the
loop's segments."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sass_loop.py"


def listing(path, name, body, stalls=None):
    """A cuobjdump -sass style listing of one function; body: instruction texts, 16 bytes apart;
    stalls: each instruction's stall count, written into its control word (none: no control words)."""
    lines = ["", f"\tFunction : {name}", "\t.headerflags\t@\"EF_CUDA_SM90\""]
    for i, text in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {text} ;  /* 0x0000000000000000 */")
        if stalls is not None:  # the stall in bits 41-44 of the high word, the yield and barrier bits above it set
            lines.append(f"                                                 /* 0x{(0x7f0 | stalls[i]) << 41:016x} */")
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


# Stall counts for BODY: the loop (0x20-0xa0) has top 0x20-0x30 (3 + 5), the turn's barrier to the
# HGMMA 0x40-0x50 (1 + 2), the HGMMA to BAR.ARV (4), then 0x70-0xa0 (6 + 8 + 8 + 5).
STALLS = [1, 2, 3, 5, 1, 2, 4, 6, 8, 8, 5, 7]


def test_static_cycles_along_the_turns_landmarks(tmp_path):
    out = run(listing(tmp_path / "a.sass", "prefill_sm90_kernel_one", BODY, STALLS), "--stalls", "--blocks")
    assert "static cycles of the whole loop: 42" in out
    assert "block 0x00020-0x00030:    2 instructions,     8 cycles" in out
    assert "path (9 instructions, 42 static cycles):" in out
    assert "loop top -> BAR.SYNC: 2 instructions, 8 cycles" in out
    assert "BAR.SYNC -> first HGMMA: 2 instructions, 3 cycles" in out
    assert "first HGMMA -> BAR.ARV: 1 instructions, 4 cycles" in out
    assert "BAR.ARV -> loop end: 4 instructions, 27 cycles" in out


def test_skipped_ranges_leave_the_path(tmp_path):
    out = run(listing(tmp_path / "a.sass", "prefill_sm90_kernel_one", BODY, STALLS), "--stalls", "--skip", "80-a0")
    assert "path (7 instructions, 26 static cycles, skipping 80-a0):" in out
    assert "BAR.ARV -> loop end: 2 instructions, 11 cycles" in out


def test_stalls_need_control_words(tmp_path):
    out = run(listing(tmp_path / "a.sass", "prefill_sm90_kernel_one", BODY), "--stalls")
    assert "the listing has no control words" in out


def test_the_default_path_is_the_loops_shortest(tmp_path):
    # A fill loop (0x10-0x90) whose arm 0x60-0x70 (two MUFUs) a predicated branch skips.
    body = ["BAR.SYNC.DEFER_BLOCKING R0, 0x100", "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR16], R15",
            "BAR.SYNC.DEFER_BLOCKING R0, 0x100", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], RZ, !UPT",
            "BAR.ARV R19, 0x100", "@P1 BRA 0x80", "MUFU.EX2 R3, R3", "MUFU.EX2 R4, R4", "FADD R5, R3, R4",
            "@P0 BRA 0x10"]
    stalls = [1, 2, 1, 4, 6, 5, 8, 8, 1, 5]
    out = run(listing(tmp_path / "a.sass", "prefill_sm90_kernel_one", body, stalls), "--stalls")
    assert "static cycles of the whole loop: 40" in out
    assert "path (7 instructions, 24 static cycles):" in out
    assert "BAR.ARV -> loop end: 4 instructions, 17 cycles" in out
