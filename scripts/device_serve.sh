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
#
# Long context (issue 21), off unless asked for; DEFAULT_STEPS=0 skips the steps above:
#   LONG=1   Phi-3-small-128k (LongRoPE, $LONG_LAYERS layers, default 32), bfloat16: 8 x (65536 prompt + 256
#            new) with the model's sparse/dense layers and with --dense-all (cache: all requests), then
#            2 x (130816 + 256) = 131072 positions, sparse and dense, the cache sized by
#            --gpu-memory-fraction 0.9. About 4-5 minutes on an H200 (estimate): give BUDGET=560.
#   SOAK=1   scripts/soak.py: $SOAK_REQUESTS (500) requests, prompts log-uniform in [1, $SOAK_MAX_PROMPT
#            (131072)], Phi-3-small-128k with $SOAK_LAYERS (4) layers, a cache of 1.1 x the longest request
#            (preemptions: swaps and recomputes), each request re-served alone; once per cache dtype in
#            $SOAK_KV ("auto"; "auto fp8" for both). About 2-4 minutes per dtype (estimate).
#   PYTHON=.venv/bin/python DEVICE=cpu DEFAULT_STEPS=0 LONG=1 LONG_MODEL=tiny-longrope LONG_LAYERS=2 LONG_PROMPT=600 \
#   LONG_PROMPT_MAX=1000 LONG_NEW=8 LONG_CHUNK=256 SOAK=1 SOAK_MODEL=tiny-longrope SOAK_LAYERS=2 SOAK_REQUESTS=12 \
#   SOAK_MAX_PROMPT=600 SOAK_CHUNK=128 SOAK_KV="auto fp8" bash scripts/device_serve.sh     # CPU dry run of those
#   KV_LAYOUT=1  capacity of the per-kv-head cache (issue 17), one GPU: $KV_REQUESTS (12) requests of $KV_PROMPT
#            (32768) prompt + $KV_NEW (128) new tokens arriving at once (max batch = all of them), Phi-3-small-128k
#            with $KV_LAYERS (32) layers, bfloat16, chunks of $KV_CHUNK (8192), a fixed cache of $KV_FIT (4) requests'
#            shared blocks (--num-blocks; KV_BLOCKS overrides), served with --kv-layout shared and per-kv-head (the
#            same bytes) for each model of $KV_MODELS ("alternating homo sparse-all": the model's sparse/dense
#            layers, the same with --homo-head, every layer sparse; "sparse-all-homo" is both flags). Reports
#            peak_running (most sequences running at once), preemptions and tokens/s. About 1 minute per run
#            (estimate): give BUDGET=590 and DEFAULT_STEPS=0.
#   PYTHON=.venv/bin/python DEVICE=cpu DEFAULT_STEPS=0 KV_LAYOUT=1 KV_MODEL=tiny-longrope KV_LAYERS=2 KV_REQUESTS=6 \
#   KV_PROMPT=500 KV_NEW=48 KV_CHUNK=64 KV_FIT=2 bash scripts/device_serve.sh                 # CPU dry run of that
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

long() {  # $1 requests of $2 prompt tokens + LONG_NEW new ones, all at once, Phi-3-small-128k's shape;
  # $3: sparse (the model's layers) or dense (--dense-all); further arguments go to serve.py
  local n=$1 prompt=$2 kind=$3; shift 3
  run "long_${n}x${prompt}_$kind" 240 "${SERVE[@]}" --model "${LONG_MODEL:-phi3-small-128k}" \
    --num-layers "${LONG_LAYERS:-32}" --num-requests "$n" --min-prompt "$prompt" --max-prompt "$prompt" \
    --max-new-tokens "${LONG_NEW:-256}" --arrival-every 0 --max-batch "$n" --chunk-size "${LONG_CHUNK:-8192}" \
    --warmup-requests 1 --init-on-device $([ "$kind" = dense ] && echo --dense-all) "$@"
}

kv() {  # $1: the cache layout (shared, per-kv-head); $2: the model (alternating, homo, sparse-all, sparse-all-homo)
  local flags=()
  case "$2" in
    homo) flags=(--homo-head) ;;
    sparse-all) flags=(--sparse-all) ;;
    sparse-all-homo) flags=(--sparse-all --homo-head) ;;
  esac
  run "kv_$2_$1" 170 "${SERVE[@]}" --model "${KV_MODEL:-phi3-small-128k}" --num-layers "${KV_LAYERS:-32}" \
    --num-requests "$KV_REQUESTS" --min-prompt "$KV_PROMPT" --max-prompt "$KV_PROMPT" --max-new-tokens "$KV_NEW" \
    --arrival-every 0 --max-batch "$KV_REQUESTS" --chunk-size "${KV_CHUNK:-8192}" --num-blocks "$KV_BLOCKS" \
    --kv-layout "$1" --warmup-requests 1 --init-on-device $PAD ${flags[@]+"${flags[@]}"}
}

soak() {  # $1: the cache dtype (auto, fp8, ...)
  run "soak_$1" "${SOAK_SECONDS:-540}" "$PY" scripts/soak.py --device "$DEVICE" --model "${SOAK_MODEL:-phi3-small-128k}" \
    --num-layers "${SOAK_LAYERS:-4}" --num-requests "${SOAK_REQUESTS:-500}" --max-prompt "${SOAK_MAX_PROMPT:-131072}" \
    --chunk-size "${SOAK_CHUNK:-8192}" --kv-cache-dtype "$1"
}

# Most wanted first, so that running out of the budget loses the least.
if [ "${DEFAULT_STEPS:-1}" != 0 ]; then
  DTYPES=(${CHECK_DTYPES:-float16 bfloat16})
  LAYERS=(${BENCH_LAYERS:-4 32})
  check "${DTYPES[0]}"
  tp2 graphs
  bench "${LAYERS[0]}" sparse
  bench "${LAYERS[0]}" dense
  for dt in "${DTYPES[@]:1}"; do check "$dt"; done
  tp2 eager
  for layers in "${LAYERS[@]:1}"; do bench "$layers" sparse; bench "$layers" dense; done
fi
if [ "${LONG:-0}" != 0 ]; then
  LONG_PROMPT=${LONG_PROMPT:-65536}
  # the longest: prompt + new tokens = the model's 131072 positions
  LONG_PROMPT_MAX=${LONG_PROMPT_MAX:-$((131072 - ${LONG_NEW:-256}))}
  long 8 "$LONG_PROMPT" sparse
  long 8 "$LONG_PROMPT" dense
  long 2 "$LONG_PROMPT_MAX" sparse --gpu-memory-fraction 0.9
  long 2 "$LONG_PROMPT_MAX" dense --gpu-memory-fraction 0.9
fi
if [ "${KV_LAYOUT:-0}" != 0 ]; then
  KV_REQUESTS=${KV_REQUESTS:-12} KV_PROMPT=${KV_PROMPT:-32768} KV_NEW=${KV_NEW:-128}
  # KV_FIT requests' shared blocks of 16 tokens (serve.py's default --kv-block-size)
  KV_BLOCKS=${KV_BLOCKS:-$(( ${KV_FIT:-4} * ((KV_PROMPT + KV_NEW + 15) / 16) ))}
  for model in ${KV_MODELS:-alternating homo sparse-all}; do kv shared "$model"; kv per-kv-head "$model"; done
fi
if [ "${SOAK:-0}" != 0 ]; then
  for kv in ${SOAK_KV:-auto}; do soak "$kv"; done
fi

"$PY" - "$OUT" ${RUNS[@]+"${RUNS[@]}"} <<'EOF'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
w = max([22] + [len(n) for n in names])  # the run names' column
print(f"\n{'run':<{w}} {'rc':>3}  {'config, correctness (max rel err)':<52} {'prefill tok/s':>13} {'decode tok/s':>13} "
      f"{'total tok/s':>12} {'wall s':>7}  untimed s (setup/capture/warm-up)")
for name in names:
    lines = open(f"{out}/serve_{name}.log").read().splitlines()
    rc = next((l[3:] for l in reversed(lines) if l.startswith("rc=")), "?")
    res = next((json.loads(l[len("RESULT json "):]) for l in reversed(lines) if l.startswith("RESULT json ")), None)
    if res is None:
        print(f"{name:<{w}} {rc:>3}  (no RESULT line: see {out}/serve_{name}.log)")
        continue
    if name.startswith("soak"):
        print(f"{name:<{w}} {rc:>3}  {res['requests']} requests, {res['prompt_tokens']} prompt + {res['generated_tokens']} "
              f"generated tokens (longest prompt {res['longest_prompt']}), {res['steps']} steps, {res['preemptions']} "
              f"preemptions ({res['swaps']} swaps, {res['recomputes']} recomputes); lost {res['lost']}, stuck "
              f"{res['stuck']}, mismatches {res['mismatches']} (max rel err {res['max_rel_err']:.1e}), memory "
              f"{res['memory_start']} -> {res['memory_end']} B; soak {res['soak_s']:.0f} s, re-runs {res['rerun_s']:.0f} s")
        continue
    checks = []
    if "check" in res:
        checks.append(f"ref {res['check']} {res.get('check_max_rel_err', float('nan')):.1e}")
    if "compare_eager" in res:
        checks.append(f"eager {res['compare_eager']} {res.get('compare_eager_max_rel_err', float('nan')):.1e}")
    layers = "dense" if res["dense_all"] else "sparse" if res.get("sparse_all") else "sp/dn"
    what = (f"{res['num_layers']}L {layers}{' homo' if res.get('homo_head') else ''} {res['dtype']} tp{res['tp']}"
            f"{' graphs' if res['cuda_graphs'] else ''}")
    if name.startswith("kv_"):
        checks.append(f"{res['kv_layout']}: peak {res['peak_running']} running, {res['pages_released']} released, "
                      f"tokens {res.get('output_digest', '?')}")
    if res.get("preemptions"):
        checks.append(f"{res['preemptions']} preempted")
    print(f"{name:<{w}} {rc:>3}  {(what + ' ' + ', '.join(checks)):<52} {res['prefill_tokens_per_s']:>13.0f} "
          f"{res['decode_tokens_per_s']:>13.0f} {res['total_tokens_per_s']:>12.0f} {res['wall_s']:>7.2f}  "
          f"{res['setup_s']:.1f}/{res['capture_s']:.1f}/{res['warmup_s']:.1f}")
EOF
