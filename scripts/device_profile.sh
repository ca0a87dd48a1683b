#!/usr/bin/env bash
# Build, then profile one prefill or decode call with Nsight Compute (and optionally debug a crashing test).
# PROFILE=prefill (default: benchmarks/profile_prefill.py) or PROFILE=decode (bench_decode at 64 x 16k).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { grep error "$OUT/build.log" | head; exit 1; }
if [ -n "${DEBUG_TEST:-}" ]; then
  timeout 120 cuda-gdb -batch -ex run -ex bt --args python3 -m pytest -q -p no:cacheprovider "$DEBUG_TEST" \
    > "$OUT/gdb.log" 2>&1
  grep -E "^#[0-9]+" "$OUT/gdb.log" | head -25
fi
case ${PROFILE:-prefill} in
  prefill) kernel=prefill_sm80; cmd="python3 benchmarks/profile_prefill.py" ;;
  decode) kernel=decode_sm80; cmd="python3 benchmarks/bench_decode.py --batches 64 --contexts 16384 --warmup 1 --repeats 1 --flex-at ''" ;;
esac
timeout 240 ncu --kernel-name regex:$kernel --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
  --section LaunchStats --section SchedulerStats --section InstructionStats $cmd > "$OUT/ncu.txt" 2>&1
echo "ncu rc=$?"
grep -E "Duration|Throughput|Hit Rate|Achieved Occupancy|Theoretical Occupancy|Registers|Shared Memory Config|Block Limit|Stall|Warp Cycles|Issued Ipc|Bank|Eligible|Active Warps|Executed Instructions|Waves|Grid|Block Size" "$OUT/ncu.txt" | head -70
