#!/usr/bin/env bash
# Experiment: prefill tile shape and K/V ring depth. Builds each variant (nvcc reads NVCC_APPEND_FLAGS:
# BSA_PREFILL_BLOCK_N, BSA_PREFILL_STAGES for the sm80 kernel; BSA_SM90_STAGES, BSA_SM90_LOADS_IN_FLIGHT, BSA_SM90_Q_BUFFERS for the Hopper kernel), runs the
# prefill tests (TEST_FILE, TEST_K; TEST_VARIANTS=all or the one variant number to test) and the
# benchmark (SEQ_LENS, METHODS) for each, once per run-time setting in BENCH_ENVS (';'-separated
# lists of VAR=value, e.g. 'BSA_SM90_GRID=100000;' for one CTA per unit, then the default); NCU=i
# profiles variant i's NCU_KERNEL.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
i=0
while IFS= read -r flags; do
  [ -z "$flags" ] && continue
  i=$((i + 1)); stages=$i; echo "== variant $i: $flags"
  rm -rf build blocksparse_attn/_C*.so
  NVCC_APPEND_FLAGS="$flags" BSA_HEAD_DIMS=${BSA_HEAD_DIMS:-64,128} python3 setup.py build_ext --inplace \
    > "$OUT/build_$stages.log" 2>&1 || { grep error "$OUT/build_$stages.log" | head; exit 1; }
  if [ "${TEST_VARIANTS:-all}" = all ] || [ "${TEST_VARIANTS}" = "$i" ]; then
    DEVICE=cuda timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider ${TEST_FILE:-tests/test_attention_ops.py} -k "${TEST_K:-prefill and not D256}" \
      > "$OUT/test_$stages.log" 2>&1
    echo "variant $i tests: $(tail -1 "$OUT/test_$stages.log")"
  fi
  IFS=';' read -ra envs <<< "${BENCH_ENVS:-}"; [ ${#envs[@]} -eq 0 ] && envs=("")
  for e in "${envs[@]}"; do
    echo "-- bench ${e:-(default run-time settings)}"
    env $e timeout ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_prefill.py --device cuda --seq-lens ${SEQ_LENS:-8192} --out-dir "$OUT" ${METHODS:+--methods "$METHODS"} ${BENCH_ARGS:-} \
      > "$OUT/bench_$stages.log" 2>&1
    grep -A3 "^ *S batch" "$OUT/bench_$stages.log" | cut -c1-${BENCH_COLS:-100}
  done
  if [ "${NCU:-0}" = "$i" ]; then
    timeout ${NCU_TIMEOUT:-200} ncu --kernel-name regex:${NCU_KERNEL:-prefill_sm80} --launch-skip 1 --launch-count 1 --section SpeedOfLight \
      --section Occupancy --section WarpStateStats --section SchedulerStats --section InstructionStats \
      --section MemoryWorkloadAnalysis python3 benchmarks/profile_prefill.py > "$OUT/ncu_$stages.txt" 2>&1
    grep -E "Duration|Throughput|No Eligible|Eligible Warps|Executed Instructions  |Warp Cycles Per Issued|Bank|Stall" "$OUT/ncu_$stages.txt" | head -20
  fi
done <<< "${VARIANTS:-$'-DBSA_PREFILL_STAGES=2\n-DBSA_PREFILL_STAGES=3'}"

# FULL_BENCH=1: the whole table (all methods, 2k..32k) with the last variant built.
if [ "${FULL_BENCH:-0}" = 1 ]; then
  timeout 240 python3 benchmarks/bench_prefill.py --device cuda --seq-lens 2048,4096,8192,16384,32768 --out-dir "$OUT" \
    > "$OUT/bench_full.log" 2>&1
  grep -A7 "^ *S batch" "$OUT/bench_full.log"
fi
