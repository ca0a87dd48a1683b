#!/usr/bin/env bash
# Syntax-checks the CUDA host glue (csrc/cuda/*.cpp: torch tensors to kernel parameters) on a machine
# without the CUDA build of torch: the CPU wheel ships torch's CUDA headers, and the few CUDA library
# headers they include (cuSPARSE, cuBLAS, cuSOLVER) are stubbed with the handle types they need. The
# kernels themselves are compiled by nvcc (.ci/run); this catches the glue's errors before a device
# session spends its minutes on them.   bash scripts/check_cuda_glue.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
cuda_include=${CUDA_HOME:-/usr/local/cuda}/include
stubs=$(mktemp -d)
trap 'rm -rf "$stubs"' EXIT
mkdir -p "$stubs/c10/cuda/impl"
echo '#pragma once' > "$stubs/c10/cuda/impl/cuda_cmake_macros.h"
printf '#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n' > "$stubs/cusparse.h"
printf '#pragma once\ntypedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n' > "$stubs/cublas_v2.h"
printf '#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' > "$stubs/cublasLt.h"
printf '#pragma once\ntypedef int cusolverStatus_t;\n' > "$stubs/cusolver_common.h"
printf '#pragma once\n#include "cusolver_common.h"\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n' > "$stubs/cusolverDn.h"
includes=$("$python" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
for f in csrc/cuda/*.cpp; do
  ${CXX:-g++} -std=c++17 -fsyntax-only -w $includes -I"$stubs" -I"$cuda_include" -Icsrc -DBSA_WITH_CUDA "$f"
  echo "   $f: ok"
done
