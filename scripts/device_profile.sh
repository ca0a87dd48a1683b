#!/usr/bin/env bash
# Build, then profile one prefill call with Nsight Compute (and optionally debug a crashing test).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { grep error "$OUT/build.log" | head; exit 1; }
if [ -n "${DEBUG_TEST:-}" ]; then
  timeout 120 cuda-gdb -batch -ex run -ex bt --args python3 -m pytest -q -p no:cacheprovider "$DEBUG_TEST" \
    > "$OUT/gdb.log" 2>&1
  grep -E "^#[0-9]+" "$OUT/gdb.log" | head -25
fi
timeout 240 ncu --kernel-name regex:prefill_sm80 --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
  --section LaunchStats python3 benchmarks/profile_prefill.py > "$OUT/ncu.txt" 2>&1
echo "ncu rc=$?"
grep -E "Duration|Throughput|Hit Rate|Achieved Occupancy|Theoretical Occupancy|Registers|Shared Memory Config|Block Limit|Stall|Warp Cycles|Issued Ipc|Bank" "$OUT/ncu.txt" | head -60
