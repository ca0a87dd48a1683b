#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU test suite, then benchmark.
# Usage (repo root, on the device): bash scripts/device_check.sh [pytest -k expression]
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

t0=$(date +%s)
DEVICE=cuda timeout 420 python3 -m pytest -q -x -p no:cacheprovider tests ${1:+-k "$1"} > "$OUT/tests.log" 2>&1
echo "gpu tests: rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/tests.log")"
grep -E "^(FAILED|ERROR)|Error|error" "$OUT/tests.log" | head -20

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 300 python3 benchmarks/bench_prefill.py --device cuda --seq-lens ${SEQ_LENS:-2048,4096,8192,16384,32768} \
    --out-dir "$OUT" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -25 "$OUT/bench.log"
fi
