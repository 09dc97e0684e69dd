# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# torch is pinned to 2.13.0 (a CPU build where pip's index or a local wheel provides it);
# override TORCH to use another (e.g. `make test TORCH=torch`).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
MEPROP_DATA ?= $(abspath ../shared/data)
export MEPROP_DATA

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,gpu,hf]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/meprop demo

test: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_backward.py --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
