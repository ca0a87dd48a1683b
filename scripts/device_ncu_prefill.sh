#!/usr/bin/env bash
# Profile one warm prefill call with Nsight Compute: speed of light, pipe and shared-memory use, warp
# stalls, and the per-instruction stall samples and execution counts of the SASS (source.csv.gz: one
# row per instruction; sort by "Warp Stall Sampling (All Samples)" or "Instructions Executed").
# NVCC_FLAGS: build flags; NCU_KERNEL: kernel name regex; NCU_SCRIPT: the profiled script
# (benchmarks/profile_prefill.py, or benchmarks/profile_decode.py with NCU_KERNEL=decode_sm80);
# PROFILE_ARGS: its arguments (e.g. "--seq-len 128 --batch 256", or "--batch 1 --context 2048");
# NCU_ARGS: more ncu flags (e.g. "--cache-control none" to keep the caches warm between kernels).
# SKIP_BUILD=1: profile the extension already built in this tree (e.g. a second kernel after a first run).
# Digest offline: python3 scripts/ncu_digest.py <label>/source.csv.gz sass/*.sass.gz
# Everything comes back as one tarball, $OUT/ncu.tgz (the device tool returns only a few files of a
# call's $OUT; the rest are lost with the machine): unpack it here with tar -xzf.
set -uo pipefail
RESULT=${OUT:-out}; mkdir -p "$RESULT"; RESULT=$(cd "$RESULT" && pwd)
OUT=$(mktemp -d)
trap 'tar -czf "$RESULT/ncu.tgz" -C "$OUT" . && rm -rf "$OUT"' EXIT
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONPATH=$PWD
if [ -z "${SKIP_BUILD:-}" ]; then  # SKIP_BUILD=1: profile the extension already built here
  rm -rf build blocksparse_attn/_C*.so
  NVCC_APPEND_FLAGS="${NVCC_FLAGS:-}" BSA_HEAD_DIMS=${BSA_HEAD_DIMS:-128} python3 setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { grep error "$OUT/build.log" | head; exit 1; }
fi
# The profiled kernels' SASS with line and inlining info, for scripts/ncu_digest.py (ncu's source
# page has the per-instruction counts but not which source line each instruction came from).
so=$(ls "$PWD"/blocksparse_attn/_C*.so)
mkdir -p "$OUT/sass" && tmp=$(mktemp -d) && (cd "$tmp" && cuobjdump -xelf all "$so" > /dev/null 2>&1)
for c in "$tmp"/*.cubin; do
  [ -e "$c" ] || continue
  nvdisasm -c -gi "$c" > "$tmp/listing" 2> /dev/null || continue
  grep -qE "${NCU_KERNEL:-prefill_sm90}" "$tmp/listing" && gzip -c "$tmp/listing" > "$OUT/sass/$(basename "$c" .cubin).sass.gz"
done
rm -rf "$tmp"
ls "$OUT/sass" | grep -q . || echo "note: no SASS listings saved (cuobjdump / nvdisasm not found?)"
# PROFILE_SETS: lines of "<label> <arguments>", each profiled in turn into $OUT/<label>/ (one build),
# e.g. $'varlen\npaged16 --paged --kv-block 16\nchunk-e4m3 --paged --cache-dtype e4m3 --chunk 2048'.
profile() {  # <dir> <script arguments...>
  local dir=$1; shift
  mkdir -p "$dir"
  timeout ${NCU_TIMEOUT:-300} ncu --kernel-name regex:${NCU_KERNEL:-prefill_sm90} --launch-skip 1 --launch-count 1 ${NCU_ARGS:-} \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats \
    --section InstructionStats --section SourceCounters --import-source no -o "$dir/rep" \
    python3 ${NCU_SCRIPT:-benchmarks/profile_prefill.py} "$@" > "$dir/ncu.log" 2>&1
  ncu -i "$dir/rep.ncu-rep" --page details > "$dir/details.txt" 2>&1
  ncu -i "$dir/rep.ncu-rep" --page raw > "$dir/raw.txt" 2>&1
  ncu -i "$dir/rep.ncu-rep" --page source --csv --print-source sass 2> "$dir/source.err" | gzip > "$dir/source.csv.gz"
  rm -f "$dir/rep.ncu-rep"
  grep -E "Duration|Throughput|Pipe|Shared|Bank|Issue Slots|Eligible|Warp Cycles Per Issued|Stall|Executed Ipc" "$dir/details.txt" | head -60
  # the tensor pipe's busy share, the clock, the L2 hit rate and DRAM bytes (raw metric names)
  grep -E "pipe_tensor.*(pct|sum )|sm__cycles_elapsed.avg.per_second|sm__cycles_elapsed.max |lts__t_sector_hit_rate.pct|dram__bytes_read.sum |sm__inst_executed.sum |smsp__inst_executed.sum " \
    "$dir/raw.txt" | head -30
  gzip "$dir/raw.txt"
}
if [ -n "${PROFILE_SETS:-}" ]; then
  while read -r label args; do
    [ -z "$label" ] && continue
    echo "== $label: $args"
    # shellcheck disable=SC2086
    profile "$OUT/$label" $args < /dev/null  # ncu must not read the remaining lines
  done <<< "$PROFILE_SETS"
else
  # shellcheck disable=SC2086
  profile "$OUT" ${PROFILE_ARGS:-}
fi
