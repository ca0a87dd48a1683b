#!/usr/bin/env bash
# A/B timing of build variants with the drift cancelled: the H100 runs this kernel at its power cap,
# and its clock drifts as it warms up, so variants benchmarked one after the other favour the first
# (about 2 % at 8k). Builds each variant of VARIANTS (lines of NVCC flags, read through
# NVCC_APPEND_FLAGS) once, all builds at the same time in copies of their trees, then runs the
# benchmark ROUNDS times over all variants in turn (each round starting with the next variant), each
# round in a fresh process with that variant's extension in place; prints every time and each
# variant's median. TEST_VARIANT="i j ..." runs TEST_FILE (TEST_K) on those variants first. VARIANT_DIRS (lines,
# one per variant, default .) builds each variant from its own source tree, e.g. another branch
# exported with `mkdir -p ab/main && git archive main | tar -x -C ab/main` (untracked plain files
# travel to the device; a nested git worktree would not); the
# benchmark always runs this tree's Python package with the variant's extension. VARIANT_ENVS (lines,
# one per variant, default none) sets environment variables for that variant's tests and benchmark,
# e.g. $'\nBSA_SM90_STAGE_KEYS=128' to time a run-time choice. BENCH_ARGS go to every benchmark run, e.g.
# "--dense-pattern --methods ours,sdpa-cudnn" (a later --methods wins): baselines are reported per variant.
# BENCH_SETS (lines of benchmark arguments, each after BENCH_ARGS; default one set, BENCH_ARGS alone)
# runs every set in every round, e.g. the sparse and the dense pattern from the same builds.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
ext=$(mktemp -d)
# Empty lines kept in all three: an empty line of VARIANTS is the build without flags (dropping it
# made $'\n-DX=1' one variant, and shifted VARIANT_ENVS against the variants), of VARIANT_DIRS this tree.
mapfile -t variants < <(printf '%s\n' "${VARIANTS?lines of NVCC flags}")
mapfile -t dirs < <(printf '%s\n' "${VARIANT_DIRS:-}")
mapfile -t envs < <(printf '%s\n' "${VARIANT_ENVS:-}")  # empty lines kept: a variant without variables
root=$PWD
source "$(dirname "$0")/device_builds.sh"
# Every distinct (source dir, flags) builds once, all at the same time, each in its own copy of its
# source dir (one build after another took ~40 s a variant of device time); run-time variants share
# a build.
declare -A built  # source dir + flags -> the variant whose build it is
builds=()
for i in "${!variants[@]}"; do
  key="${dirs[$i]:-.}|${variants[$i]}"
  [[ -n "${built[$key]:-}" ]] && continue
  built[$key]=$i
  builds+=("$i")
  start_build "$i" "${dirs[$i]:-.}" "${variants[$i]}" "${BSA_HEAD_DIMS:-64,128}" "$ext/$i"
done
wait
for i in "${builds[@]}"; do check_build "$i" "variant $i" || exit 1; done
for i in "${!variants[@]}"; do
  dir=${dirs[$i]:-.}
  mkdir -p "$ext/$i"
  first=${built["$dir|${variants[$i]}"]}
  [[ "$first" == "$i" ]] || cp "$ext/$first"/_C*.so "$ext/$i/"
  if [[ " ${TEST_VARIANT:-} " == *" $i "* ]]; then
    # shellcheck disable=SC2086
    test_build "$ext/$i" "$dir" "$OUT/test_$i.log" ${envs[$i]:-}
    echo "variant $i tests: $(tail -1 "$OUT/test_$i.log")"
  fi
done
cd "$root"
mapfile -t sets < <(printf '%s\n' "${BENCH_SETS:-}")  # one set (BENCH_ARGS alone) if none
nv=${#variants[@]}
for r in $(seq 1 ${ROUNDS:-3}); do
  for b in "${!sets[@]}"; do
    for j in $(seq 0 $((nv - 1))); do
      i=$(( (j + r - 1) % nv ))  # each round starts with the next variant: no variant always runs first
      cp "$ext/$i/"_C*.so blocksparse_attn/
      run="$OUT/r${r}_s${b}_v$i"
      mkdir -p "$run"
      env ${envs[$i]:-} timeout ${BENCH_TIMEOUT:-120} python3 benchmarks/bench_prefill.py --device cuda --seq-lens ${SEQ_LENS:-8192} \
        --methods ours --out-dir "$run" ${BENCH_ARGS:-} ${sets[$b]} > "$run/bench.log" 2>&1 \
        || { echo "round $r set $b variant $i: benchmark failed"; tail -2 "$run/bench.log"; }
    done
  done
done
python3 - "$OUT" "${#variants[@]}" "${ROUNDS:-3}" "${#sets[@]}" <<'PY'
import csv, statistics, sys
out, nv, rounds, nsets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
times = {}
for r in range(1, rounds + 1):
    for b in range(nsets):
        for i in range(nv):
            try:
                for row in csv.DictReader(open(f"{out}/r{r}_s{b}_v{i}/bench_prefill_cuda_bfloat16.csv")):
                    times.setdefault((b, int(row["S"]), i, row.get("method", "ours")), []).append(float(row["ms"]))
            except FileNotFoundError:
                pass
for (b, s, i, method), ts in sorted(times.items()):
    label = "" if method == "ours" else f" {method}"
    set_label = f"set {b} " if nsets > 1 else ""
    print(f"{set_label}variant {i}{label} S={s:>6}: median {statistics.median(ts):.3f} ms  [" + " ".join(f"{t:.3f}" for t in ts) + "]")
PY
