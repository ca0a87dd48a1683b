#!/usr/bin/env bash
# A/B of the decode kernels in one device call: the extension built from each tree of VARIANT_DIRS
# (lines; e.g. `mkdir -p ab/main && git archive main | tar -x -C ab/main` here first: untracked plain
# files travel), each benchmark in a fresh process, ROUNDS alternated rounds of bench_decode.py
# (BENCH_ARGS) per cache dtype of CACHE_DTYPES, this tree's Python package with the variant's
# extension. A tree that already holds a built extension (an earlier call on a warm machine, or
# scripts/device_ab.sh) is not rebuilt. TEST_VARIANT="i j ..." runs TEST_FILE (-k TEST_K) on those
# variants first. VARIANT_ENVS (lines, one per variant, default none) sets environment variables for
# that variant's tests and benchmark; a tree may appear on several lines to time run-time choices
# (e.g. $'\nBSA_DECODE_SPLITS=16'). Logs in $OUT (default ./out).
#   VARIANT_DIRS=$'ab/main\nab/next' TEST_VARIANT=1 bash scripts/device_ab_decode.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
mapfile -t dirs < <(printf '%s\n' "${VARIANT_DIRS:?lines of source trees}" | sed '/^$/d')
mapfile -t envs < <(printf '%s\n' "${VARIANT_ENVS:-}")  # empty lines kept: a variant without variables
root=$PWD
for i in "${!dirs[@]}"; do
  dir=${dirs[$i]}
  if ! ls "$dir"/blocksparse_attn/_C*.so > /dev/null 2>&1; then
    (cd "$dir" && BSA_HEAD_DIMS=${BSA_HEAD_DIMS:-64,128} python3 setup.py build_ext --inplace) > "$OUT/build_$i.log" 2>&1 ||
      { echo "variant $i ($dir): build failed"; grep error "$OUT/build_$i.log" | head; exit 1; }
  fi
  if [[ " ${TEST_VARIANT:-} " == *" $i "* ]]; then
    (cd "$dir" && env ${envs[$i]:-} DEVICE=cuda PYTHONPATH=$PWD timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider \
      ${TEST_FILE:-tests/test_attention_ops.py tests/test_fp8_cache.py} -k "${TEST_K:-decode}") > "$OUT/test_$i.log" 2>&1
    echo "variant $i ($dir) tests: $(tail -1 "$OUT/test_$i.log")"
  fi
done
so=$(mktemp -d)
for i in "${!dirs[@]}"; do mkdir -p "$so/$i" && cp "${dirs[$i]}"/blocksparse_attn/_C*.so "$so/$i/"; done
cd "$root"
nv=${#dirs[@]}
for r in $(seq 1 ${ROUNDS:-2}); do
  for cache in ${CACHE_DTYPES:-auto e4m3}; do
    for j in $(seq 0 $((nv - 1))); do
      i=$(( (j + r - 1) % nv ))  # each round starts with the next variant
      cp "$so/$i"/_C*.so blocksparse_attn/
      log="$OUT/r${r}_${cache}_v$i.log"
      env ${envs[$i]:-} timeout ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_decode.py --cache-dtype "$cache" \
        ${BENCH_ARGS:---graph --graph-calls 20 --rounds 2 --batches 1,4,16 --contexts 2048,8192 --flex-at ''} \
        > "$log" 2>&1 || { echo "round $r $cache variant $i: benchmark failed"; tail -2 "$log"; }
      echo "== round $r, cache $cache, variant $i (${dirs[$i]} ${envs[$i]:-}): batch context ours-us sdpa-us x-sdpa"
      awk '$1 ~ /^[0-9]+$/ && NF >= 8 {print "  ", $1, $2, $4, $5, $(NF-1)}' "$log"
    done
  done
done
rm -rf "$so"
