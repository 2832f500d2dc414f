# Two commands on a fresh machine: `make train` (default CPU pretraining run) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel this project is developed and tested with; on a GPU box install the
# matching CUDA build of torch first (see README) and the pin leaves it alone.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
# Two pytest workers: half of a test's time is process start-up and imports, which a second worker overlaps.
# loadscope keeps a module's tests on one worker, so a module-scoped fixture (a reference run) is built once.
TEST_WORKERS ?= 2

.PHONY: train test install install-test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

train: $(VENV)/.installed
	$(BIN)/attnres-train $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
