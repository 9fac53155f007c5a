# Two commands do all set-up: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moefy-installed

.PHONY: setup demo test bench lint

setup: $(STAMP)

# torch first, pinned: on a machine without a GPU `torch==2.13.0` resolves to the local CPU
# wheel; an unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf,demo]'
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_layer.py

lint: setup
	$(VENV)/bin/ruff check moefy tests benchmarks examples
