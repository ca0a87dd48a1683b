#!/usr/bin/env bash
# A/B of the paged prefill in one device call: the extension built from BASE_DIR (another tree, e.g.
# `mkdir -p ab/main && git archive main | tar -x -C ab/main` here first: untracked plain files travel)
# against this tree's, each benchmark in a fresh process, ROUNDS rounds (each starting with the next
# variant) of bench_paged_prefill.py (BENCH_ARGS), this tree's TESTS (-k TEST_K) first, on each variant
# of this tree. The benchmark always runs this tree's Python package with the variant's extension.
# BASE_NVCC_FLAGS / NEW_NVCC_FLAGS build either with extra NVCC flags (e.g.
# NEW_NVCC_FLAGS=-DBSA_SM90_STAGES=5 with BASE_DIR=. compares a build knob on one tree: the base is
# built in a copy); NEW_NVCC_FLAGS of several lines builds one variant a line (new, new1, new2, ...).
# Every build has BSA_HEAD_DIMS=$BASE_HEAD_DIMS (default 128), so TESTS of other head sizes fail as
# "not compiled". KERNELS="sm90 sm80" times each variant on each prefill kernel (BSA_PREFILL_KERNEL),
# so both kernels' paged ratios come from one call's builds. Logs in $OUT (default ./out).
#   BASE_DIR=ab/main TESTS="tests/test_prefill_kernels.py tests/test_fp8_cache.py" TEST_K="fp8 or bad_page" \
#     bash scripts/device_ab_paged.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
base=${BASE_DIR:?a source tree to compare with}
source "$(dirname "$0")/device_builds.sh"
# NEW_NVCC_FLAGS may hold several lines: one variant of this tree each, "new", "new1", "new2", ...,
# so several build knobs are timed against one base in one call.
mapfile -t new_flags < <(printf '%s\n' "${NEW_NVCC_FLAGS:-}")
names=(base new); dirs=("$base" .); flags=("${BASE_NVCC_FLAGS:-}" "${new_flags[0]:-}")
for ((i = 1; i < ${#new_flags[@]}; ++i)); do
  [ -n "${new_flags[$i]}" ] || continue
  names+=("new$i"); dirs+=(.); flags+=("${new_flags[$i]}")
done
# EXTRA_DIRS: more trees timed as variants (named by their folder), built as the base is; not tested.
for d in ${EXTRA_DIRS:-}; do names+=("$(basename "$d")"); dirs+=("$d"); flags+=(""); done
nvidia-smi --query-gpu=name --format=csv,noheader
so=$(mktemp -d)
for i in "${!names[@]}"; do
  echo "${names[$i]}: ${dirs[$i]} ${flags[$i]}"
  start_build "${names[$i]}" "${dirs[$i]}" "${flags[$i]}" "${BASE_HEAD_DIMS:-128}" "$so/${names[$i]}"
done
wait
for v in "${names[@]}"; do check_build "$v" "$v" || exit 1; done
if [ -n "${TESTS:-}" ]; then  # every variant of this tree: a knob's first run is its tests' first run
  for i in "${!names[@]}"; do
    [ "$i" -gt 0 ] && [ "${dirs[$i]}" = . ] || continue
    v=${names[$i]}
    cp "$so/$v"/_C*.so blocksparse_attn/
    echo "== tests $v"
    DEVICE=cuda timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider $TESTS ${TEST_K:+-k "$TEST_K"} 2>&1 | tail -4
  done
fi
read -ra kernels <<< "${KERNELS:-auto}"
nv=${#names[@]}
for r in $(seq 1 ${ROUNDS:-3}); do
  # Each round starts with the next variant: in a fixed order the card's warming would fall on the
  # later ones (the H100 drifted ~10 % over one benchmark process, 2026-12-05).
  for j in $(seq 0 $((nv - 1))); do
    v=${names[$(( (j + r - 1) % nv ))]}
    cp "$so/$v"/_C*.so blocksparse_attn/
    for k in "${kernels[@]}"; do
      label=$v${KERNELS:+ $k}
      BSA_PREFILL_KERNEL=$k python3 benchmarks/bench_paged_prefill.py \
        ${BENCH_ARGS:---seq-lens 8192,32768 --fp8 e4m3,e5m2} > "$OUT/bench_r${r}_${label// /_}.log" 2>&1
      echo "== round $r $label"; tail -3 "$OUT/bench_r${r}_${label// /_}.log"
    done
  done
done
cp "$so/new"/_C*.so blocksparse_attn/
