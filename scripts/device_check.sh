#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU test suite, then benchmark.
# Usage (repo root, on the device):
#   [TEST_FILES=...] [PYTEST_K=...] [SANITIZE="memcheck racecheck synccheck"] [SANITIZE_K=...] \
#   [BENCH="decode prefill"] [SKIP_BENCH=1] [BSA_FUZZ_PROFILE=long BSA_FUZZ_EXAMPLES=600] \
#   bash scripts/device_check.sh
# Logs go to $OUT (default ./out); the last lines printed are a short summary.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"

t0=$(date +%s)
if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error" "$OUT/build.log" | head -30; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"

# One process per test file, so a crash in one file cannot hide the results of the others.
for f in ${TEST_FILES:-tests/test_*.py}; do
  t0=$(date +%s)
  name=$(basename "$f" .py)
  DEVICE=cuda timeout ${TEST_TIMEOUT:-300} python3 -X faulthandler -m pytest -v -p no:cacheprovider -rf "$f" ${PYTEST_K:+-k "$PYTEST_K"} \
    > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s: $(grep -E "passed|failed|error" "$OUT/$name.log" | tail -1)"
  if [ $rc -ne 0 ]; then grep -E "^(FAILED|ERROR)|Fatal|File .*tests/" "$OUT/$name.log" | head -12; grep -B1 "Fatal Python" "$OUT/$name.log" | head -3; fi
done

if [ -n "${SANITIZE:-}" ]; then  # e.g. SANITIZE="memcheck racecheck" SANITIZE_K="bf16"
  for tool in $SANITIZE; do
    t0=$(date +%s)
    DEVICE=cuda timeout 400 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
      python3 -m pytest -q -p no:cacheprovider ${SANITIZE_FILES:-tests/test_attention_ops.py tests/test_kv_cache_ops.py} \
      ${SANITIZE_K:+-k "$SANITIZE_K"} > "$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: rc=$? in $(( $(date +%s) - t0 )) s: $(grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer_$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  for bench in ${BENCH:-prefill}; do
    case $bench in
      prefill) args="--seq-lens ${SEQ_LENS:-2048,4096,8192,16384,32768} --out-dir $OUT" ;;
      decode) args="${DECODE_ARGS:-}" ;;
    esac
    PYTHONPATH=$PWD timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_$bench.py --device cuda $args \
      > "$OUT/bench_$bench.log" 2>&1
    echo "bench $bench rc=$?"; grep -v "^skip\|Warning\|warn" "$OUT/bench_$bench.log" | tail -22
  done
fi
