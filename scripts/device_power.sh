#!/usr/bin/env bash
# Is the prefill kernel power-bound? Builds the extension (NVCC_APPEND_FLAGS: a variant), then runs
# for a few seconds each: a bf16 8192^3 matmul loop and the 8k x 4 Phi-3-small prefill, while
# nvidia-smi samples the SM clock, the power draw and the active throttle reasons every 50 ms.
# Prints the median clock and power of each phase.
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
python3 - "$OUT" <<'PY'
import sys, time, json
import torch
from blocksparse_attn import ops
from blocksparse_attn.layout import SparsePattern

phases = []
def run(name, fn, seconds=4.0):
    fn(); torch.cuda.synchronize()
    start = time.time(); n = 0
    t0 = torch.cuda.Event(enable_timing=True); t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    while time.time() - start < seconds:
        for _ in range(20):
            fn()
        n += 20
        torch.cuda.synchronize()
    t1.record(); torch.cuda.synchronize()
    phases.append(dict(name=name, start=start, end=time.time(), ms=t0.elapsed_time(t1) / n))
    time.sleep(1.0)

a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
run("matmul 8192^3", lambda: a @ b)
tokens, seq = 32768, 8192
q = torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
cu = torch.arange(0, tokens + 1, seq, device="cuda", dtype=torch.int32)
pattern = SparsePattern.phi3_small(32)
run("prefill 8k x 4", lambda: ops.varlen_prefill(q, k, v, cu, cu, 128 ** -0.5, pattern))
json.dump(phases, open(sys.argv[1] + "/phases.json", "w"))
PY
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
    print(f"{p['name']:>16}: {p['ms']:.3f} ms/call, SM clock median {statistics.median(s[1] for s in inside):.0f} MHz "
          f"(min {min(s[1] for s in inside):.0f}), power median {statistics.median(s[2] for s in inside):.0f} W, "
          f"throttle reasons {reasons}")
PY
