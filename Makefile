# Each target does all of its own set-up: a virtual env with the CPU build of torch 2.13.0 first
# (a bare `torch` requirement would pull a CUDA build of several GB), then bpfree itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint setup clean

$(BIN)/bpfree: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/bpfree

setup: $(BIN)/bpfree

demo: setup
	$(BIN)/bpfree compare --config configs/demo.json

test: setup
	$(BIN)/ruff check bpfree tests benchmarks examples
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check bpfree tests benchmarks examples

clean:
	rm -rf $(VENV) runs
