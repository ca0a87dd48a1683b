#!/usr/bin/env bash
# Serving on a GPU machine (issue 6), about 3-5 minutes on an H100: examples/phi3_small_tiny checked on
# CUDA (CUDA-graph decode against the float32 reference and against eager decode), tensor parallelism
# over NCCL when 2 GPUs are visible, and tokens/s of 32 requests x (2048 prompt + 256 new tokens) with
# Phi-3-small's layer shape, its alternating sparse/dense layers against dense attention in every layer.
#
# Expects the repo root as working directory, the extension built in place
# (python3 setup.py build_ext --inplace) and python3 with torch on PATH.
#   [OUT=out] [DEVICE=cuda] [NUM_GPUS=n] [CHECK_DTYPES="float16 bfloat16"] [BENCH_LAYERS="4 32"] \
#   [BENCH_MODEL=phi3-small] [BENCH_REQUESTS=32] [BENCH_PROMPT=2048] [BENCH_NEW=256] [BENCH_CHUNK=8192] \
#   [BENCH_WARMUP=4] [BUDGET=345] bash scripts/device_serve.sh
# CPU dry run of the same steps (tiny sizes; NUM_GPUS=2 runs the tensor-parallel step over gloo):
#   PYTHON=.venv/bin/python DEVICE=cpu NUM_GPUS=2 CHECK_DTYPES=float32 BENCH_MODEL=tiny BENCH_LAYERS=2 \
#   BENCH_REQUESTS=3 BENCH_PROMPT=100 BENCH_NEW=4 BENCH_CHUNK=256 BENCH_WARMUP=1 bash scripts/device_serve.sh
# Logs go to $OUT/serve_*.log; each run's last line is `RESULT json {...}`; a summary table is printed last.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/serve_gpu.txt"
if ! "$PY" -c "import torch, blocksparse_attn; print('torch', torch.__version__, torch.version.cuda)"; then
  echo "blocksparse_attn does not import: build it first (python3 setup.py build_ext --inplace)"; exit 1
fi
NUM_GPUS=${NUM_GPUS:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
# On the CPU, decode-only steps go through the CUDA-graph path's padded buffers without capture.
PAD=""; [ "$DEVICE" = cpu ] && PAD="--pad-decode"
SERVE=("$PY" -m examples.phi3_small_tiny.serve --device "$DEVICE" --no-progress)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m examples.phi3_small_tiny.serve
          --device "$DEVICE" --no-progress)
RUNS=()

# run NAME SECONDS CMD...: one step under `timeout`, its output in $OUT/serve_NAME.log (the command line
# first). Each step's limit is cut to what is left of BUDGET seconds for the whole script; a step with
# less than 20 s left is skipped, so a hang costs one step, not the machine's time.
BUDGET=${BUDGET:-345}
run() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/serve_$name.log" t0=$SECONDS left=$((BUDGET - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "$name: skipped, out of the ${BUDGET} s budget"; return; fi
  echo "\$ $*" > "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "rc=$rc" >> "$log"
  echo "$name: rc=$rc in $((SECONDS - t0)) s"
  [ $rc -ne 0 ] && grep -E "FAILED|Error|error|Traceback" "$log" | head -8
  RUNS+=("$name")
}

check() {  # one GPU, tiny model, CUDA graphs on (the default on CUDA): every generated token's logits
  # against the float32 dense-mask reference, and against the same requests decoded eagerly
  run "check_$1" 120 "${SERVE[@]}" --chunk-size 48 --dtype "$1" --check --compare-eager $PAD
}

tp2() {  # two ranks (NCCL on CUDA, gloo on the CPU) against one eager rank; with CUDA graphs (NCCL
  # all-reduce captured; also against the reference) or without
  if [ "$NUM_GPUS" -lt 2 ]; then echo "tp2_$1: skipped, $NUM_GPUS GPU(s) visible"; return; fi
  if [ "$1" = graphs ]; then
    run tp2_graphs 150 "${TORCHRUN[@]}" --chunk-size 48 --dtype "${TP_DTYPE:-float16}" --check --compare-eager $PAD
  else
    run tp2_eager 120 "${TORCHRUN[@]}" --chunk-size 48 --dtype "${TP_DTYPE:-float16}" --compare-eager --no-cuda-graph
  fi
}

bench() {  # throughput with Phi-3-small's layer shape (32 q / 8 kv heads, D 128, hidden 4096, bfloat16
  # on CUDA) and $1 layers, random weights drawn on the device, all requests at once; $2: sparse = the
  # model's alternating sparse/dense layers, dense = --dense-all
  run "bench_${1}l_$2" 180 "${SERVE[@]}" --model "${BENCH_MODEL:-phi3-small}" --num-layers "$1" \
    --num-requests "${BENCH_REQUESTS:-32}" --min-prompt "${BENCH_PROMPT:-2048}" --max-prompt "${BENCH_PROMPT:-2048}" \
    --max-new-tokens "${BENCH_NEW:-256}" --arrival-every 0 --max-batch "${BENCH_REQUESTS:-32}" \
    --chunk-size "${BENCH_CHUNK:-8192}" --warmup-requests "${BENCH_WARMUP:-4}" --init-on-device \
    $([ "$2" = dense ] && echo --dense-all)
}

# Most wanted first, so that running out of the budget loses the least.
DTYPES=(${CHECK_DTYPES:-float16 bfloat16})
LAYERS=(${BENCH_LAYERS:-4 32})
check "${DTYPES[0]}"
tp2 graphs
bench "${LAYERS[0]}" sparse
bench "${LAYERS[0]}" dense
for dt in "${DTYPES[@]:1}"; do check "$dt"; done
tp2 eager
for layers in "${LAYERS[@]:1}"; do bench "$layers" sparse; bench "$layers" dense; done

"$PY" - "$OUT" ${RUNS[@]+"${RUNS[@]}"} <<'EOF'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print(f"\n{'run':<19} {'rc':>3}  {'config, correctness (max rel err)':<52} {'prefill tok/s':>13} {'decode tok/s':>13} "
      f"{'total tok/s':>12} {'wall s':>7}  untimed s (setup/capture/warm-up)")
for name in names:
    lines = open(f"{out}/serve_{name}.log").read().splitlines()
    rc = next((l[3:] for l in reversed(lines) if l.startswith("rc=")), "?")
    res = next((json.loads(l[len("RESULT json "):]) for l in reversed(lines) if l.startswith("RESULT json ")), None)
    if res is None:
        print(f"{name:<19} {rc:>3}  (no RESULT line: see {out}/serve_{name}.log)")
        continue
    checks = []
    if "check" in res:
        checks.append(f"ref {res['check']} {res.get('check_max_rel_err', float('nan')):.1e}")
    if "compare_eager" in res:
        checks.append(f"eager {res['compare_eager']} {res.get('compare_eager_max_rel_err', float('nan')):.1e}")
    what = (f"{res['num_layers']}L {'dense' if res['dense_all'] else 'sp/dn'} {res['dtype']} tp{res['tp']}"
            f"{' graphs' if res['cuda_graphs'] else ''}")
    print(f"{name:<19} {rc:>3}  {(what + ' ' + ', '.join(checks)):<52} {res['prefill_tokens_per_s']:>13.0f} "
          f"{res['decode_tokens_per_s']:>13.0f} {res['total_tokens_per_s']:>12.0f} {res['wall_s']:>7.2f}  "
          f"{res['setup_s']:.1f}/{res['capture_s']:.1f}/{res['warmup_s']:.1f}")
EOF
