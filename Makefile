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

demo: setup  ## train `small` on the built-in corpus for a few minutes, then evaluate and sample
	$(BIN)/autoglm info small
	rm -rf runs/demo  # a fresh run each time (use `autoglm train --resume` to continue one)
	$(BIN)/autoglm train --preset small --out runs/demo --steps 150 --minutes 6 --eval-every 50 --save-every 50
	$(BIN)/autoglm generate runs/demo --prompt "Return the " --max-new-tokens 60

test: setup  ## run the test suite and every module's doctests (CPU; slow end-to-end tests left out)
	$(BIN)/python -m pytest -n auto --dist loadgroup

test-all: setup  ## also the tests marked slow
	$(BIN)/python -m pytest -n auto --dist loadgroup -m "slow or not slow"

bench: setup  ## architecture benchmark (writes benchmarks/results/)
	$(BIN)/python benchmarks/architecture.py

clean:
	rm -rf runs benchmarks/results .pytest_cache
