# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create the venv and install pinned dependencies (torch==2.13.0 CPU)

demo: setup  ## the sparse MoE model vs a dense Transformer of equal size, 2 min each on a built-in corpus
	$(BIN)/autoglm info small
	rm -rf runs/demo  # a fresh run each time
	$(BIN)/autoglm compare --config configs/demo.yaml

test: setup  ## run the test suite and every module's doctests (CPU; slow end-to-end tests left out)
	$(BIN)/python -m pytest -n auto --dist loadgroup

test-all: setup  ## also the tests marked slow
	$(BIN)/python -m pytest -n auto --dist loadgroup -m "slow or not slow"

bench: setup  ## architecture benchmark (writes docs/results/architecture.*)
	$(BIN)/python benchmarks/architecture.py

clean:
	rm -rf runs .pytest_cache
