#!/usr/bin/env bash
# Before / after in one GPU run: a baseline source tree (BASE, default ab/base: export it first on the
# development machine, e.g. `mkdir -p ab/base && git archive <rev> | tar -x -C ab/base`, and name `ab`
# in the device call's carry) and this tree are built side by side; TEST_FILES run on this tree; then
# ROUNDS interleaved rounds of the prefill and decode benchmarks, each variant in a fresh process
# with its own Python package (op schemas may differ between the two). Prints each variant's median
# per benchmark line. Logs under $OUT (default out/).
#   SKIP_BUILD=1  reuse the extensions a previous call built on this machine
#   BENCHES   lines "name|script args" (default: the Phi-3-small and dense prefill at 8k x 4 and 32k,
#             the sm80 prefill at 8k x 4, and decode at 64 x 16k and 1 x 8k)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
BASE=${BASE:-ab/base}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0a
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$(date +%s)
if [ "${SKIP_BUILD:-0}" != 1 ]; then  # SKIP_BUILD=1: the extensions of a previous call on this machine
(cd "$BASE" && rm -rf build && MAX_JOBS=8 BSA_HEAD_DIMS=${BASE_HEAD_DIMS:-128} python3 setup.py build_ext --inplace \
  > "$OUT/build_base.log" 2>&1) &
base_pid=$!
MAX_JOBS=8 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -20; exit 1; }
wait $base_pid || { echo "baseline build failed"; grep -E "error" "$OUT/build_base.log" | head; exit 1; }
echo "builds: $(( $(date +%s) - t0 )) s"
fi

for f in ${TEST_FILES:-}; do
  t0=$(date +%s); name=$(basename "$f" .py)
  DEVICE=cuda timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -x "$f" ${PYTEST_K:+-k "$PYTEST_K"} \
    > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/$name.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/$name.log" | head -5
done

default_benches="prefill-8kx4|bench_prefill.py --seq-lens 8192 --methods ours
prefill-32k|bench_prefill.py --seq-lens 32768 --methods ours --no-sanity-check
dense-8kx4|bench_prefill.py --seq-lens 8192 --methods ours --dense-pattern
sm80-8kx4|bench_prefill.py --seq-lens 8192 --methods ours KERNEL=sm80
decode|bench_decode.py --batches 64,1 --contexts 16384,8192 --flex-at ''"
mapfile -t benches < <(printf '%s\n' "${BENCHES:-$default_benches}" | sed '/^$/d')
root=$PWD
for r in $(seq 1 ${ROUNDS:-2}); do
  for b in "${benches[@]}"; do
    name=${b%%|*}; cmd=${b#*|}; kernel=auto
    [[ $cmd == *KERNEL=sm80* ]] && kernel=sm80 && cmd=${cmd/KERNEL=sm80/}
    for v in base new; do
      dir=$root; [ $v = base ] && dir=$root/$BASE
      log="$OUT/r${r}_${name}_$v.log"
      extra=""; [[ $cmd == bench_prefill* ]] && extra="--out-dir $OUT/csv_r${r}_${name}_$v"
      (cd "$dir" && BSA_PREFILL_KERNEL=$kernel PYTHONPATH=$dir timeout 150 python3 benchmarks/$cmd --device cuda \
        $extra > "$log" 2>&1) || { echo "round $r $name $v failed"; tail -3 "$log"; }
    done
  done
done
python3 - "$OUT" <<'PY'
import csv, glob, os, re, statistics, sys
out = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{out}/r*_*.log")):
    m = re.match(r"r(\d+)_(.+)_(base|new)\.log", os.path.basename(path))
    if not m:
        continue
    _, name, variant = m.groups()
    for line in open(path):
        cells = line.split()
        if name.startswith("decode"):  # table rows: batch context must-read-MB ours-us ...
            if len(cells) >= 4 and cells[0].isdigit() and cells[1].isdigit():
                rows.setdefault(f"{name} {cells[0]}x{cells[1]} (us)", {}).setdefault(variant, []).append(float(cells[3]))
    if not name.startswith("decode"):  # the benchmark's CSV: S, method, ms, ...
        m_csv = os.path.join(out, f"csv_{os.path.basename(path)[:-4]}", "bench_prefill_cuda_bfloat16.csv")
        if os.path.exists(m_csv):
            for row in csv.DictReader(open(m_csv)):
                if row.get("method", "ours") == "ours":
                    rows.setdefault(f"{name} S={row['S']} (ms)", {}).setdefault(variant, []).append(float(row["ms"]))
print(f"{'benchmark':36s} {'base median':>12s} {'new median':>12s} {'new/base':>9s}  (all runs)")
for key, by_variant in sorted(rows.items()):
    base, new = by_variant.get("base", []), by_variant.get("new", [])
    mb = statistics.median(base) if base else float("nan")
    mn = statistics.median(new) if new else float("nan")
    print(f"{key:36s} {mb:12.3f} {mn:12.3f} {mn / mb:9.3f}  base {base} new {new}")
PY
# At most a few files come back from a device call: the logs travel as one archive.
tar -czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls | grep -v logs.tgz) 2>/dev/null && \
  (cd "$OUT" && ls | grep -v -e logs.tgz -e summary.txt | xargs rm -rf)
