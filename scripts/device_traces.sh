#!/usr/bin/env bash
# Fill-by-fill traces of the Hopper prefill (BSA_SM90_TRACE, csrc/cuda/kernels/prefill_sm90_trace.cuh)
# in one device call: where a fill's time goes between its slots' release and its landing, which
# Nsight Compute's averaged samples could not separate (the paged producer, 2026-12-06).
#
# BUILDS: lines of NVCC flags, one build each, every one with -DBSA_SM90_TRACE=2 added (the second
# launch of a process is traced: profile_prefill.py's warm call); a line "@DIR flags" builds the tree
# DIR instead, as in device_cycles.sh. TRACE_SETS: lines "<label>|<build index>|<producer warps>|
# <profile_prefill.py arguments>" (producer warps: 4 over pages, fp8 or without the TMA, 1 over
# contiguous K/V through the TMA by default). TEST_BUILDS / TEST_K / TEST_FILE: tests first, as in
# device_cycles.sh (the sets of a build whose tests fail are not traced). FILLS="a:b": the summary
# also lists fills a..b-1 warp by warp. Each set's stderr lands in $OUT/<label>.trace; the summary
# of all sets is printed and kept in $OUT/traces.log (only a few files come back from a call).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a PYTHONPATH=$PWD
source "$(dirname "$0")/device_builds.sh"
build_lines "-DBSA_SM90_TRACE=2" || exit 1
failed=" "
for i in ${TEST_BUILDS:-}; do
  test_build "$ext/$i" . "$OUT/test_$i.log" || failed+="$i "
  echo "build $i tests: $(tail -1 "$OUT/test_$i.log")"
done
mapfile -t sets < <(printf '%s\n' "${TRACE_SETS:?lines of label|build|producer warps|arguments}" | sed '/^$/d')
logs=() warps=()
for line in "${sets[@]}"; do
  IFS='|' read -r label build nwarps args <<< "$line"
  [[ $failed == *" ${build:-0} "* ]] && continue  # its tests failed
  cp "$ext/${build:-0}"/_C*.so blocksparse_attn/ || { echo "$label: no build ${build:-0}"; exit 1; }
  # shellcheck disable=SC2086
  timeout "${TRACE_TIMEOUT:-120}" python3 benchmarks/profile_prefill.py $args > /dev/null 2> "$OUT/$label.trace" \
    || echo "$label: profile_prefill.py failed ($(grep -v '^sm90_trace' "$OUT/$label.trace" | tail -1))"
  logs+=("$OUT/$label.trace") warps+=("${nwarps:-4}")
done
[[ ${#logs[@]} -gt 0 ]] || { echo "nothing traced"; exit 1; }
python3 "$(dirname "$0")/sm90_trace_summary.py" "${logs[@]}" --warps "${warps[@]}" ${FILLS:+--fills "$FILLS"} \
  | tee "$OUT/traces.log"
