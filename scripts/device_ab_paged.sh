#!/usr/bin/env bash
# A/B of the paged prefill in one device call: the extension built from BASE_DIR (another tree, e.g.
# `mkdir -p ab/main && git archive main | tar -x -C ab/main` here first: untracked plain files travel)
# against this tree's, each benchmark in a fresh process, ROUNDS alternated rounds of
# bench_paged_prefill.py (BENCH_ARGS), this tree's TESTS (-k TEST_K) first. The benchmark always runs
# this tree's Python package with the variant's extension. BASE_NVCC_FLAGS / NEW_NVCC_FLAGS build
# either with extra NVCC flags (e.g. NEW_NVCC_FLAGS=-DBSA_SM90_STAGES=5 with BASE_DIR=. compares a
# build knob on one tree: the base is built in a copy). Logs in $OUT (default ./out).
#   BASE_DIR=ab/main TESTS="tests/test_prefill_kernels.py tests/test_fp8_cache.py" TEST_K="fp8 or bad_page" \
#     bash scripts/device_ab_paged.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
base=${BASE_DIR:?a source tree to compare with}
if [ "$(cd "$base" && pwd)" = "$PWD" ]; then  # one tree, two builds: the base from a copy of it
  copy=$(mktemp -d) && tar --exclude=./build --exclude=./ab --exclude=./out --exclude='*.so' -cf - . | tar -x -C "$copy" &&
    base=$copy
fi
nvidia-smi --query-gpu=name --format=csv,noheader
(cd "$base" && NVCC_APPEND_FLAGS="${BASE_NVCC_FLAGS:-}" BSA_HEAD_DIMS=${BASE_HEAD_DIMS:-128} python3 setup.py build_ext --inplace \
  > "$OUT/build_base.log" 2>&1) &
NVCC_APPEND_FLAGS="${NEW_NVCC_FLAGS:-}" python3 setup.py build_ext --inplace > "$OUT/build_new.log" 2>&1 ||
  { grep -i error "$OUT/build_new.log" | head; exit 1; }
wait
so=$(mktemp -d); mkdir -p "$so/base" "$so/new"
cp blocksparse_attn/_C*.so "$so/new/"
cp "$base"/blocksparse_attn/_C*.so "$so/base/" || { echo "base build failed"; grep -i error "$OUT/build_base.log" | head; exit 1; }
if [ -n "${TESTS:-}" ]; then
  DEVICE=cuda timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider $TESTS ${TEST_K:+-k "$TEST_K"} 2>&1 | tail -4
fi
for r in $(seq 1 ${ROUNDS:-3}); do
  for v in base new; do
    cp "$so/$v"/_C*.so blocksparse_attn/
    python3 benchmarks/bench_paged_prefill.py ${BENCH_ARGS:---seq-lens 8192,32768 --fp8 e4m3,e5m2} \
      > "$OUT/bench_r${r}_$v.log" 2>&1
    echo "== round $r $v"; tail -3 "$OUT/bench_r${r}_$v.log"
  done
done
cp "$so/new"/_C*.so blocksparse_attn/
