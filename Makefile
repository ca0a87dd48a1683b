# Set-up and run on a fresh machine: `make demo` or `make test` (see README.md).
# Each creates .venv if missing, installs torch (unless .venv already has one) and the test/demo
# dependencies, builds the extension against that torch, then runs.
#
#   PYTHON=python3.11        the interpreter that creates .venv
#   TORCH_SPEC=torch==2.13.0 what to install when .venv has no torch
#   TORCH_INDEX_URL=...      e.g. a CPU-only or a specific-CUDA wheel index for torch
#   TORCH_CUDA_ARCH_LIST, MAX_JOBS, BSA_DEBUG, BSA_FORCE_CPU, BSA_HEAD_DIMS: build knobs (setup.py)

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := numpy pytest hypothesis matplotlib tqdm ninja "setuptools>=77" wheel
# Rebuild only when a build input changed; the stamp lives in .venv, so a new .venv rebuilds too.
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
DEPS_STAMP := $(VENV)/.bsa-deps
BUILD_STAMP := $(VENV)/.bsa-build

.PHONY: demo test build bench pattern clean

demo: $(BUILD_STAMP)
	$(PY) -m blocksparse_attn demo

test: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

build: $(BUILD_STAMP)

bench: $(BUILD_STAMP)
	$(PY) benchmarks/bench_prefill.py

# The picture in README.md.
pattern: $(BUILD_STAMP)
	$(PY) -m blocksparse_attn pattern --seq-len 8192 --out docs/pattern.png

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(PY)
	$(PY) -c "import torch" 2>/dev/null || \
		$(PIP) install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"
	$(PIP) install $(DEPS)
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD_INPUTS)
	$(PIP) install --no-build-isolation -e .
	touch $@

clean:
	rm -rf build *.egg-info blocksparse_attn/_C*.so $(BUILD_STAMP)
