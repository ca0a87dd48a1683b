#!/usr/bin/env bash
# Profile one warm prefill call with Nsight Compute: speed of light, pipe and shared-memory use, warp
# stalls, and the per-instruction stall samples and execution counts of the SASS (source.csv.gz: one
# row per instruction; sort by "Warp Stall Sampling (All Samples)" or "Instructions Executed").
# NVCC_FLAGS: build flags; NCU_KERNEL: kernel name regex.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONPATH=$PWD
rm -rf build blocksparse_attn/_C*.so
NVCC_APPEND_FLAGS="${NVCC_FLAGS:-}" BSA_HEAD_DIMS=${BSA_HEAD_DIMS:-128} python3 setup.py build_ext --inplace \
  > "$OUT/build.log" 2>&1 || { grep error "$OUT/build.log" | head; exit 1; }
timeout ${NCU_TIMEOUT:-300} ncu --kernel-name regex:${NCU_KERNEL:-prefill_sm90} --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats \
  --section InstructionStats --section SourceCounters --import-source no -o "$OUT/rep" \
  python3 benchmarks/profile_prefill.py > "$OUT/ncu.log" 2>&1
ncu -i "$OUT/rep.ncu-rep" --page details > "$OUT/details.txt" 2>&1
ncu -i "$OUT/rep.ncu-rep" --page source --csv --print-source sass 2> "$OUT/source.err" | gzip > "$OUT/source.csv.gz"
rm -f "$OUT/rep.ncu-rep"
grep -E "Duration|Throughput|Pipe|Shared|Bank|Issue Slots|Eligible|Warp Cycles Per Issued|Stall|Executed Ipc" "$OUT/details.txt" | head -60
