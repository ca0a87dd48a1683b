#!/usr/bin/env bash
# Is a kernel power-bound, and does it lose to a peer on clock or on cycles? Builds the extension
# (NVCC_APPEND_FLAGS: a variant; SKIP_BUILD=1: the one built here), then runs benchmarks/sustained.py's
# WORKLOADS (default: the bf16 8192^3 matmul and the 8k x 4 Phi-3-small prefill) for a few seconds
# each, while nvidia-smi samples the SM clock, the power draw and the active throttle reasons every
# 50 ms. Prints each phase's median clock and power, and its time a call in clock cycles (ms x MHz):
#   WORKLOADS=ours:dense:8192,fa4:dense:8192 SKIP_BUILD=1 bash scripts/device_power.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONPATH=$PWD
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  rm -rf build blocksparse_attn/_C*.so
  BSA_HEAD_DIMS=${BSA_HEAD_DIMS:-128} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { grep error "$OUT/build.log" | head; exit 1; }
fi
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv,noheader -lms 50 \
  > "$OUT/smi.csv" 2>&1 &
smi=$!
python3 benchmarks/sustained.py --workloads "${WORKLOADS:-matmul,ours:pattern:8192}" --json "$OUT/phases.json"
kill $smi
python3 - "$OUT" <<'PY'
import sys, json, datetime, statistics
phases = json.load(open(sys.argv[1] + "/phases.json"))
samples = []
for line in open(sys.argv[1] + "/smi.csv"):
    parts = [p.strip() for p in line.split(",")]
    try:
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        samples.append((t, float(parts[1].split()[0]), float(parts[2].split()[0]), parts[3]))
    except (ValueError, IndexError):
        pass
for p in phases:
    inside = [s for s in samples if p["start"] + 0.5 <= s[0] <= p["end"]]
    if not inside:
        print(f"{p['name']}: {p['ms']:.3f} ms, no samples"); continue
    reasons = sorted({s[3] for s in inside})
    mhz = statistics.median(s[1] for s in inside)
    print(f"{p['name']:>22}: {p['ms']:.3f} ms/call, SM clock median {mhz:.0f} MHz (min {min(s[1] for s in inside):.0f}), "
          f"{p['ms'] * mhz / 1e3:.3f} M cycles/call, power median {statistics.median(s[2] for s in inside):.0f} W, "
          f"throttle reasons {reasons}")
PY
