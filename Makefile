# One command sets up a fresh machine and runs the tests: `make test`.
# TORCH_SPEC picks the torch build (default: the CPU wheel this project is developed with;
# e.g. `make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"` for CUDA).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv test test-fast demo clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest

# the fast tier: everything but the tests marked slow (subprocesses, DDP, long training runs)
test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

demo: venv
	$(BIN)/python -m rectflow.cli demo

clean:
	rm -rf $(VENV) build *.egg-info
