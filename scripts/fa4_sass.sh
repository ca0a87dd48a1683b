#!/usr/bin/env bash
# FlashAttention-4's Hopper forward kernel as SASS, on a machine without a GPU, to hold our kernel's
# main loop against it instruction by instruction (benchmarks/RESULTS.md, sixteenth session). FA4
# compiles without launching under torch's FakeTensorMode; the CuTe DSL is told the target
# (sm_90a) and the SM count, and keeps its PTX and cubin. The shape: bf16, head dim 128, causal,
# 32 q / 8 kv heads, 8k tokens (FA4 picks its tiles by arch and head dim, not by length).
#   bash scripts/fa4_sass.sh [DIR]      (default /tmp/fa4sass; a venv of ~2 GB, a few minutes)
# Writes DIR/fa4_fwd_sm90_hd128.{ptx,cubin,sass}; cuobjdump and nvdisasm come from NVIDIA's wheels.
set -euo pipefail
dir=${1:-/tmp/fa4sass}
mkdir -p "$dir" && cd "$dir"
[ -d venv ] || python3 -m venv venv
venv/bin/python -m pip install -q torch==2.13.0
venv/bin/python -m pip install -q --pre flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 cuda-bindings==13.5.0 cuda-pathfinder==1.9.1 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 einops triton numpy \
  nvidia-cuda-cuobjdump==13.* nvidia-cuda-nvdisasm==13.*
rm -rf dump && mkdir dump
FLASH_ATTENTION_ARCH=sm_90a CUTE_DSL_ARCH=sm_90a FLASH_ATTENTION_NUM_SMS=132 CUTE_DSL_KEEP=ptx,cubin \
  CUTE_DSL_DUMP_DIR="$dir/dump" venv/bin/python - <<'EOF'
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from flash_attn.cute import interface

with FakeTensorMode():  # compiles the kernel, launches nothing
    q = torch.empty(1, 8192, 32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.empty(1, 8192, 8, 128, dtype=torch.bfloat16, device="cuda")
    interface._flash_attn_fwd(q, k, torch.empty_like(k), causal=True)
EOF
cp dump/*.sm_90a.cubin fa4_fwd_sm90_hd128.cubin
cp dump/*.sm_90a.ptx fa4_fwd_sm90_hd128.ptx
cuda_bin=$(dirname "$(find "$dir/venv" -path '*cu13/bin/cuobjdump' | head -1)")  # nvdisasm beside it
PATH=$cuda_bin:$PATH cuobjdump -sass fa4_fwd_sm90_hd128.cubin > fa4_fwd_sm90_hd128.sass
echo "$dir/fa4_fwd_sm90_hd128.sass: $(grep -c HGMMA fa4_fwd_sm90_hd128.sass) HGMMA"
