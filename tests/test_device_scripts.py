"""The device A/B scripts (scripts/device_ab.sh, scripts/device_ab_paged.sh, scripts/device_cycles.sh,
scripts/device_traces.sh) on a fake tree: a setup.py
that writes its NVCC flags into the extension, a benchmark that reports them, and a fake nvidia-smi.
A broken script costs minutes of the scarce device time before it says so; here it costs a second.
Checks: every variant runs its own build (run-time variants share one), each build comes from its
own tree (VARIANT_DIRS, BASE_DIR), a failed build stops the script with the variant named, the
tests of TEST_VARIANT run, and device_cycles.sh's tests and sanitizers run before its profiles."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_SETUP = """\
import os
flags = os.environ.get("NVCC_APPEND_FLAGS", "")
if "FAIL" in flags:
    raise SystemExit("error: the fake build fails on request")
open("blocksparse_attn/_C.fake.so", "w").write(f"{flags}|{os.path.basename(os.getcwd())}")
"""

# bench_prefill.py's interface as device_ab.sh uses it: --out-dir gets the CSV of ms per S.
FAKE_BENCH_PREFILL = """\
import csv, glob, os, sys
out = sys.argv[sys.argv.index("--out-dir") + 1]
flags = open(glob.glob("blocksparse_attn/_C*.so")[0]).read().split("|")[0]
ms = 1.0 + 0.5 * flags.count("-D")  # the variant shows in its time
open(os.path.join(out, "args.txt"), "w").write(" ".join(sys.argv[1:]))
with open(os.path.join(out, "bench_prefill_cuda_bfloat16.csv"), "w") as f:
    w = csv.writer(f)
    w.writerow(["S", "ms", "method"])
    w.writerow([8192, ms, "ours"])
"""

FAKE_BENCH_PAGED = """\
import glob, os
print("extension:", open(glob.glob("blocksparse_attn/_C*.so")[0]).read(), "kernel:", os.environ["BSA_PREFILL_KERNEL"])
"""

FAKE_TEST = """\
import glob
def test_extension_present():
    assert open(glob.glob("blocksparse_attn/_C*.so")[0]).read()
"""


def fake_tree(path: Path) -> Path:
    (path / "blocksparse_attn").mkdir(parents=True)
    (path / "blocksparse_attn" / "__init__.py").write_text("")
    (path / "benchmarks").mkdir()
    (path / "tests").mkdir()
    (path / "scripts").mkdir()
    (path / "setup.py").write_text(FAKE_SETUP)
    (path / "benchmarks" / "bench_prefill.py").write_text(FAKE_BENCH_PREFILL)
    (path / "benchmarks" / "bench_paged_prefill.py").write_text(FAKE_BENCH_PAGED)
    (path / "tests" / "test_prefill_kernels.py").write_text(FAKE_TEST)
    for script in ("device_ab.sh", "device_ab_paged.sh", "device_builds.sh", "device_cycles.sh", "cycles_summary.py",
                   "device_traces.sh", "sm90_trace_summary.py"):
        shutil.copy(ROOT / "scripts" / script, path / "scripts" / script)
    trace_header = Path("csrc") / "cuda" / "kernels" / "prefill_sm90_trace.cuh"  # the summary's event offsets
    (path / trace_header).parent.mkdir(parents=True)
    shutil.copy(ROOT / trace_header, path / trace_header)
    return path


def run_script(tree: Path, script: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'Fake GPU'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    python = bin_dir / "python3"  # the scripts call python3: this interpreter, which has pytest
    if not python.exists():
        python.symlink_to(sys.executable)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", f"scripts/{script}"], cwd=tree, env=full_env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def tree(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    return fake_tree(tmp_path / "tree")


def test_device_ab_builds_each_variant_and_shares_run_time_ones(tree, tmp_path):
    run = run_script(tree, "device_ab.sh", tmp_path, VARIANTS="-DA=1\n-DA=1 -DB=2\n-DA=1",
                     VARIANT_ENVS="\n\nX=1", TEST_VARIANT="1", ROUNDS="2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "variant 1 tests: 1 passed" in run.stdout, run.stdout
    medians = {line.split()[1]: line.split("median ")[1].split()[0]
               for line in run.stdout.splitlines() if line.startswith("variant") and "median" in line}
    assert medians == {"0": "1.500", "1": "2.000", "2": "1.500"}, run.stdout  # variant 2 runs variant 0's build
    built = sorted(p.name for p in (tmp_path / "out").glob("build_*.log"))
    assert built == ["build_0.log", "build_1.log"], built


def test_device_ab_keeps_the_build_without_flags_and_passes_bench_args_to_every_set(tree, tmp_path):
    # An empty line is the build without flags (it was dropped, leaving one variant), and BENCH_ARGS
    # go before each set's arguments (they were ignored once BENCH_SETS was given).
    run = run_script(tree, "device_ab.sh", tmp_path, VARIANTS="\n-DA=1", VARIANT_ENVS="\nX=1",
                     BENCH_ARGS="--no-sanity-check", BENCH_SETS="--set-a\n--set-b", ROUNDS="1")
    assert run.returncode == 0, run.stdout + run.stderr
    medians = {(line.split()[1], line.split()[3]): line.split("median ")[1].split()[0]
               for line in run.stdout.splitlines() if line.startswith("set") and "median" in line}
    assert medians == {("0", "0"): "1.000", ("0", "1"): "1.500", ("1", "0"): "1.000", ("1", "1"): "1.500"}, run.stdout
    for b, name in ((0, "--set-a"), (1, "--set-b")):
        args = (tmp_path / "out" / f"r1_s{b}_v0" / "args.txt").read_text().split()
        assert args[-2:] == ["--no-sanity-check", name], args


def test_device_ab_builds_from_variant_dirs(tree, tmp_path):
    other = fake_tree(tmp_path / "other")
    run = run_script(tree, "device_ab.sh", tmp_path, VARIANTS="-DA=1\n-DA=1", VARIANT_DIRS=f"{other}\n.",
                     ROUNDS="1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("build_*.log")) == ["build_0.log", "build_1.log"]


def test_device_ab_stops_at_a_failed_build(tree, tmp_path):
    run = run_script(tree, "device_ab.sh", tmp_path, VARIANTS="-DA=1\n-DFAIL=1", ROUNDS="1")
    assert run.returncode != 0
    assert "variant 1: build failed" in run.stdout, run.stdout
    assert not list((tmp_path / "out").glob("r1_*")), "no benchmark after a failed build"


def test_device_ab_paged_times_several_new_variants_against_one_base(tree, tmp_path):
    run = run_script(tree, "device_ab_paged.sh", tmp_path, BASE_DIR=".", BASE_NVCC_FLAGS="-DBASE=1",
                     NEW_NVCC_FLAGS="\n-DTURNS=1", ROUNDS="1", TESTS="tests/test_prefill_kernels.py")
    assert run.returncode == 0, run.stdout + run.stderr
    rounds = [line for line in run.stdout.splitlines() if line.startswith("== round")]
    assert rounds == ["== round 1 base", "== round 1 new", "== round 1 new1"], run.stdout
    extensions = [line.split("extension: ")[1] for line in run.stdout.splitlines() if line.startswith("extension:")]
    assert [e.split("|")[0] for e in extensions] == ["-DBASE=1", "", "-DTURNS=1"], extensions
    assert all(e.endswith("kernel: auto") for e in extensions), extensions
    tested = [line for line in run.stdout.splitlines() if line.startswith("== tests")]
    assert tested == ["== tests new", "== tests new1"], run.stdout  # each variant of this tree, not the base
    assert run.stdout.count("1 passed") == 2, run.stdout


def test_device_ab_paged_times_each_kernel(tree, tmp_path):
    run = run_script(tree, "device_ab_paged.sh", tmp_path, BASE_DIR=".", NEW_NVCC_FLAGS="-DNEW=1", ROUNDS="1",
                     KERNELS="sm90 sm80")
    assert run.returncode == 0, run.stdout + run.stderr
    rounds = [line for line in run.stdout.splitlines() if line.startswith("== round")]
    assert rounds == ["== round 1 base sm90", "== round 1 base sm80", "== round 1 new sm90", "== round 1 new sm80"], \
        run.stdout
    ran = [line.split("extension: ")[1] for line in run.stdout.splitlines() if line.startswith("extension:")]
    assert [(e.split("|")[0], e.split("kernel: ")[1]) for e in ran] == \
        [("", "sm90"), ("", "sm80"), ("-DNEW=1", "sm90"), ("-DNEW=1", "sm80")], ran
    assert sorted(p.name for p in (tmp_path / "out").glob("bench_r1_*")) == \
        ["bench_r1_base_sm80.log", "bench_r1_base_sm90.log", "bench_r1_new_sm80.log", "bench_r1_new_sm90.log"]


def test_device_ab_paged_rounds_start_with_the_next_variant(tree, tmp_path):
    """The card warms over a call: no variant may always run first."""
    run = run_script(tree, "device_ab_paged.sh", tmp_path, BASE_DIR=".", NEW_NVCC_FLAGS="-DNEW=1", ROUNDS="2")
    assert run.returncode == 0, run.stdout + run.stderr
    rounds = [line for line in run.stdout.splitlines() if line.startswith("== round")]
    assert rounds == ["== round 1 base", "== round 1 new", "== round 2 new", "== round 2 base"], run.stdout


# ncu as device_cycles.sh calls it (--csv --print-units base): the profiled build's flags and the
# environment show in the cycles.
FAKE_NCU = """\
import glob, os, sys
flags = open(glob.glob("blocksparse_attn/_C*.so")[0]).read().split("|")[0]
cycles = 1_000_000 + 10_000 * flags.count("-D") + 20_000 * (os.environ.get("X") == "1")
print("==PROF== Connected to process 1")
print('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"')
for name, unit, value in (("gpc__cycles_elapsed.max", "cycle", cycles), ("sm__cycles_active.avg", "cycle", cycles * 0.99),
                          ("sm__cycles_active.min", "cycle", cycles * 0.98), ("sm__cycles_active.max", "cycle", cycles),
                          ("smsp__inst_executed.sum", "inst", 5e9), ("gpu__time_duration.sum", "nsecond", cycles / 1.5)):
    print(f'"0","prefill_sm90_kernel","{name}","{unit}","{value:,.0f}"')
"""


@pytest.fixture
def fake_ncu(tmp_path):
    """An ncu on the PATH (run_script's bin folder) that reports cycles from the extension's flags."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ncu = bin_dir / "ncu"
    ncu.write_text(f"#!{sys.executable}\n" + FAKE_NCU)
    ncu.chmod(ncu.stat().st_mode | stat.S_IEXEC)


def test_device_cycles_profiles_each_set_on_its_build_and_environment(tree, tmp_path, fake_ncu):
    args = "--seq-len 16384 --batch 2"
    run = run_script(tree, "device_cycles.sh", tmp_path, BUILDS="\n-DA=1", ROUNDS="2",
                     CYCLE_SETS=f"d16-0|0||{args}\nd16-1|1||{args}\nd16-env|0|X=1|{args}\np8-1|1||{args}")
    assert run.returncode == 0, run.stdout + run.stderr
    medians = {line.split(":")[0]: line.split("median ")[1] for line in run.stdout.splitlines() if "median" in line}
    assert medians == {"d16-0": "1,000,000 cycles (+0.00 % against d16-0)",
                       "d16-1": "1,010,000 cycles (+1.00 % against d16-0)",
                       "d16-env": "1,020,000 cycles (+2.00 % against d16-0)",
                       "p8-1": "1,010,000 cycles (+0.00 % against p8-1)"}, run.stdout
    assert " 1.00 " in run.stdout  # the idle share: 1 - 0.99
    assert sorted(p.name for p in (tmp_path / "out").glob("build_*.log")) == ["build_0.log", "build_1.log"]


def test_device_cycles_builds_a_line_from_another_tree(tree, tmp_path, fake_ncu):
    """A build line "@DIR flags" builds the tree DIR (a branch's checkout) with those flags."""
    other = fake_tree(tree / "ab" / "other")  # its setup.py adds a flag of its own: it shows in the cycles
    (other / "setup.py").write_text(FAKE_SETUP.replace('os.environ.get("NVCC_APPEND_FLAGS", "")',
                                                       '"-DOTHER=1 " + os.environ.get("NVCC_APPEND_FLAGS", "")'))
    run = run_script(tree, "device_cycles.sh", tmp_path, BUILDS="\n@ab/other -DA=1\n@ab/other", ROUNDS="1",
                     CYCLE_SETS="d-0|0||\nd-1|1||\nd-2|2||")
    assert run.returncode == 0, run.stdout + run.stderr
    medians = {line.split(":")[0]: line.split("median ")[1] for line in run.stdout.splitlines() if "median" in line}
    assert medians == {"d-0": "1,000,000 cycles (+0.00 % against d-0)",
                       "d-1": "1,020,000 cycles (+2.00 % against d-0)",
                       "d-2": "1,010,000 cycles (+1.00 % against d-0)"}, run.stdout
    missing = run_script(tree, "device_cycles.sh", tmp_path, BUILDS="@ab/none", CYCLE_SETS="d-0|0||")
    assert missing.returncode != 0 and "no source tree at ab/none" in missing.stdout


def test_device_cycles_tests_builds_first_and_skips_the_sets_of_a_failing_one(tree, tmp_path, fake_ncu):
    """TEST_BUILDS: the prefill tests run on those builds before any profile; a failing build is not profiled."""
    (tree / "tests" / "test_prefill_kernels.py").write_text(FAKE_TEST + """
def test_not_the_broken_build():
    assert "-DBROKEN" not in open(glob.glob("blocksparse_attn/_C*.so")[0]).read()
""")
    run = run_script(tree, "device_cycles.sh", tmp_path, BUILDS="\n-DA=1\n-DBROKEN=1", ROUNDS="1",
                     TEST_BUILDS="1 2", CYCLE_SETS="d-0|0||\nd-1|1||\nd-2|2||")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "build 1 tests: 2 passed" in run.stdout and "build 2 tests: 1 failed, 1 passed" in run.stdout, run.stdout
    assert run.stdout.index("build 2 tests") < run.stdout.index("d-0")  # tests before the profiles
    medians = {line.split(":")[0]: line.split("median ")[1] for line in run.stdout.splitlines() if "median" in line}
    assert medians == {"d-0": "1,000,000 cycles (+0.00 % against d-0)",
                       "d-1": "1,010,000 cycles (+1.00 % against d-0)"}, run.stdout
    assert not list((tmp_path / "out").glob("d-2_r*.csv"))


def test_device_cycles_times_wall_builds_after_the_profiles(tree, tmp_path, fake_ncu):
    """WALL_BUILDS: each named build runs WALL_ARGS after the profiles; a build whose tests failed does not."""
    (tree / "tests" / "test_prefill_kernels.py").write_text(FAKE_TEST + """
def test_not_the_broken_build():
    assert "-DBROKEN" not in open(glob.glob("blocksparse_attn/_C*.so")[0]).read()
""")
    run = run_script(tree, "device_cycles.sh", tmp_path, BUILDS="\n-DA=1\n-DBROKEN=1", ROUNDS="1",
                     TEST_BUILDS="2", CYCLE_SETS="d-0|0||", WALL_BUILDS="1 0 2", BSA_PREFILL_KERNEL="auto",
                     WALL_ARGS="benchmarks/bench_paged_prefill.py --seq-lens 8192")
    assert run.returncode == 0, run.stdout + run.stderr
    walls = [line.split("extension: ")[1].split("|")[0] for line in run.stdout.splitlines()
             if line.startswith("extension:")]
    assert walls == ["-DA=1", ""], run.stdout  # build 1, then build 0, each its own extension
    assert run.stdout.index("d-0: median") < run.stdout.index("== build 1 wall"), run.stdout
    assert "build 2 wall: skipped (its tests failed)" in run.stdout, run.stdout
    assert (tmp_path / "out" / "builds_dir").read_text().strip(), "the builds' directory is written"


# compute-sanitizer as device_builds.sh's sanitize_build calls it: runs the command after its options
# and reports one error for racecheck on a build made with -DRACY (exit code 99, as asked).
FAKE_SANITIZER = """\
import glob, subprocess, sys
args = sys.argv[1:]
tool = args[args.index("--tool") + 1]
command = args[args.index("--print-limit") + 2:]
code = subprocess.run(command).returncode
racy = tool == "racecheck" and "-DRACY" in open(glob.glob("blocksparse_attn/_C*.so")[0]).read()
print(f"========= ERROR SUMMARY: {int(racy)} error{'' if racy else 's'}")
sys.exit(99 if racy else code)
"""


def test_device_cycles_sanitizes_tested_builds_and_skips_the_sets_of_a_flagged_one(tree, tmp_path, fake_ncu):
    """SANITIZE: each tool runs the tests of each TEST_BUILDS build; a reported error keeps it from the profiles."""
    sanitizer = tmp_path / "bin" / "compute-sanitizer"
    sanitizer.write_text(f"#!{sys.executable}\n" + FAKE_SANITIZER)
    sanitizer.chmod(sanitizer.stat().st_mode | stat.S_IEXEC)
    run = run_script(tree, "device_cycles.sh", tmp_path, BUILDS="\n-DA=1\n-DRACY=1", ROUNDS="1", TEST_BUILDS="1 2",
                     SANITIZE="synccheck racecheck", CYCLE_SETS="d-0|0||\nd-1|1||\nd-2|2||")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = {line.split(":")[0]: line for line in run.stdout.splitlines() if line.startswith("build ")}
    assert "1 passed" in lines["build 1 racecheck"] and "SUMMARY: 0 errors" in lines["build 1 racecheck"], run.stdout
    assert "SUMMARY: 0 errors" in lines["build 2 synccheck"], run.stdout
    assert "SUMMARY: 1 error" in lines["build 2 racecheck"], run.stdout
    assert run.stdout.index("build 2 racecheck") < run.stdout.index("d-0")  # before the profiles
    medians = {line.split(":")[0] for line in run.stdout.splitlines() if "median" in line}
    assert medians == {"d-0", "d-1"}, run.stdout
    assert (tmp_path / "out" / "sanitize_1_synccheck.log").exists()


# profile_prefill.py under a BSA_SM90_TRACE build: the trace lines on stderr, one fill landing every
# 2,000 cycles, or 3,000 on a build made with -DSLOW; the arguments it got go to stdout.
FAKE_PROFILE_TRACE = """\
import glob, sys
sys.path.insert(0, "scripts")
from sm90_trace_summary import EVENTS as E
flags = open(glob.glob("blocksparse_attn/_C*.so")[0]).read().split("|")[0]
assert "-DBSA_SM90_TRACE=2" in flags, flags
period = 3000 if "-DSLOW" in flags else 2000
print("args", *sys.argv[1:])
for n in range(20):
    e, t = [0] * (max(E.values()) + 4), 1000 + period * n
    for w in range(4):
        e[E["SlotWait"] + w], e[E["SlotFree"] + w], e[E["Issued"] + w] = t, t + 100, t + 300
    e[E["FillWait"]], e[E["FillLanded"]] = t + 200, t + 900
    print("sm90_trace", n, *e, file=sys.stderr)
"""


def test_device_traces_traces_each_set_on_its_trace_build(tree, tmp_path):
    (tree / "benchmarks" / "profile_prefill.py").write_text(FAKE_PROFILE_TRACE)
    run = run_script(tree, "device_traces.sh", tmp_path, BUILDS="\n-DSLOW=1", TEST_BUILDS="1", FILLS="3:5",
                     TRACE_SETS="fast|0|4|--paged --chunk 2048\nslow|1|1|--chunk 2048")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "build 1 tests: 1 passed" in run.stdout, run.stdout
    periods = [line.split()[1] for line in run.stdout.splitlines() if line.strip().startswith("period")]
    assert periods == ["2000", "3000"], run.stdout
    assert "fast.trace: 20 fills traced, 4 producer warp(s)" in run.stdout
    assert "slow.trace: 20 fills traced, 1 producer warp(s)" in run.stdout
    assert run.stdout.count("(0,-,-,200)") == 2 * 4 + 2, run.stdout  # fills 3 and 4: four warps, then one
    assert run.stdout.count("g0 100,800") == 4, run.stdout  # from the first slot release
    assert (tmp_path / "out" / "traces.log").read_text() in run.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("*.trace")) == ["fast.trace", "slow.trace"]
    flags = [p.read_text() for p in sorted((tmp_path / "out").glob("build_*.log"))]
    assert len(flags) == 2
