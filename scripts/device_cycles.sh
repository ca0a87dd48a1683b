#!/usr/bin/env bash
# Clock cycles of one warm prefill call under Nsight Compute, whose locked clock takes the card's
# clock and power state out of an A/B that wall time cannot settle (the H100's medians moved 2-5 %
# between rounds of one variant in 2026-12-05's runs; the two profiles of dense 16k x 2 before and after
# the kv-major tail differed by 1.35 % in cycles, as the model predicted). Per profile: elapsed cycles,
# the SMs' active cycles (mean, min, max; 1 - mean / elapsed is the SM time idle at the end), warp
# instructions, duration and the clock (cycles / duration). A handful of metrics: one pass, seconds a profile.
#
# BUILDS: lines of NVCC flags, one build each (default: one build, no flags), all at the same time in
# copies of this tree; a line "@DIR flags" builds a copy of the tree DIR instead (e.g. a branch's
# checkout at ab/<name>, git-ignored: carried to the device with the run's carry). CYCLE_SETS: lines
# "<label>|<build index>|<environment>|<profile_prefill.py arguments>", e.g.
#   $'tail|0||--seq-len 16384 --batch 2 --dense-pattern\nno-tail|0|BSA_PREFILL_KV_TAIL=off|--seq-len 16384 --batch 2 --dense-pattern'
# ROUNDS (default 2): every set profiled once a round, in turn. Each set's median is compared with the
# first set of its group (labels "<group>-<variant>", e.g. d16-0, d16-1). NCU_KERNEL: the kernel name regex
# (default prefill_sm90). BSA_HEAD_DIMS: the builds' head dims (default 128). Everything lands in
# $OUT/cycles.log and $OUT/<label>_r<round>.csv. TEST_BUILDS="i j ...": before any profile, TEST_FILE
# (default tests/test_prefill_kernels.py, -k TEST_K, default "not D256") runs on those builds, and
# the sets of a build whose tests fail are not profiled (an untested build's cycles mean nothing).
# SANITIZE="racecheck synccheck memcheck": then each tool runs those tests (-k SANITIZE_K, default
# TEST_K) on each tested build (SANITIZE_BUILDS: only those) under compute-sanitizer; a reported error
# fails the build like a test.
# WALL_BUILDS="i j ..." with WALL_ARGS (a script and its arguments, e.g. "benchmarks/bench_paged_prefill.py
# --seq-lens 8192 --fp8= --kv-block 16"): after the profiles, each of those builds (not a failed one)
# runs it once, into $OUT/wall_<i>.log, its last WALL_TAIL lines (default 4) printed: wall time in the
# same call, build by build. The builds stay in the directory $OUT/builds_dir names (<index>/_C*.so).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a PYTHONPATH=$PWD
source "$(dirname "$0")/device_builds.sh"
build_lines "" || exit 1
echo "$ext" > "$OUT/builds_dir"
mapfile -t sets < <(printf '%s\n' "${CYCLE_SETS:?lines of label|build|environment|arguments}" | sed '/^$/d')
failed=" "
for i in ${TEST_BUILDS:-}; do
  test_build "$ext/$i" . "$OUT/test_$i.log" || failed+="$i "
  echo "build $i tests: $(tail -1 "$OUT/test_$i.log")"
  for tool in ${SANITIZE:-}; do  # after tests that passed
    [[ $failed == *" $i "* ]] && break
    [[ -n ${SANITIZE_BUILDS:-} && " $SANITIZE_BUILDS " != *" $i "* ]] && break
    sanitize_build "$tool" "$ext/$i" . "$OUT/sanitize_${i}_$tool.log" || failed+="$i "
    echo "build $i $tool: $(grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitize_${i}_$tool.log" | tail -2 | tr '\n' ' ')"
  done
done
metrics=gpc__cycles_elapsed.max,sm__cycles_active.avg,sm__cycles_active.min,sm__cycles_active.max
metrics=$metrics,smsp__inst_executed.sum,gpu__time_duration.sum
for r in $(seq 1 "${ROUNDS:-2}"); do
  for line in "${sets[@]}"; do
    IFS='|' read -r label build envs args <<< "$line"
    [[ $failed == *" ${build:-0} "* ]] && continue  # its tests failed
    cp "$ext/${build:-0}"/_C*.so blocksparse_attn/ || { echo "$label: no build ${build:-0}"; exit 1; }
    # shellcheck disable=SC2086
    env $envs timeout "${NCU_TIMEOUT:-120}" ncu --kernel-name "regex:${NCU_KERNEL:-prefill_sm90}" --launch-skip 1 \
      --launch-count 1 --metrics "$metrics" --csv --print-units base python3 benchmarks/profile_prefill.py $args \
      > "$OUT/${label}_r$r.csv" 2> "$OUT/${label}_r$r.err" || echo "$label round $r: ncu failed ($(tail -1 "$OUT/${label}_r$r.err"))"
    python3 "$(dirname "$0")/cycles_summary.py" "$OUT" "$r" --row "$label"
  done
done
python3 "$(dirname "$0")/cycles_summary.py" "$OUT" "${ROUNDS:-2}" "${sets[@]}" | tee "$OUT/cycles.log"
for i in ${WALL_BUILDS:-}; do
  [[ $failed == *" $i "* ]] && { echo "build $i wall: skipped (its tests failed)"; continue; }
  cp "$ext/$i"/_C*.so blocksparse_attn/ || { echo "build $i wall: no build $i"; continue; }
  # shellcheck disable=SC2086
  timeout "${WALL_TIMEOUT:-180}" python3 ${WALL_ARGS:?a script and its arguments} > "$OUT/wall_$i.log" 2>&1 ||
    echo "build $i wall: failed ($(tail -1 "$OUT/wall_$i.log"))"
  echo "== build $i wall"; tail -n "${WALL_TAIL:-4}" "$OUT/wall_$i.log"
done
