# Two commands for a newcomer: `make demo` and `make test`. Each builds what it needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# tinker-cookbook 0.6.1 (with torch) in a venv of its own, for the jobs tests/cookbook/ runs;
# installed with --no-deps, see tools/install-cookbook.sh for why (and why not in .venv)
COOKBOOK_VENV := .venv-cookbook
COOKBOOK_STAMP := $(COOKBOOK_VENV)/.installed

.PHONY: demo test lint typecheck unit tools cookbook bench bench-smoke clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(COOKBOOK_STAMP): pyproject.toml tools/install-cookbook.sh tools/cookbook-requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 2; }
	bash tools/install-cookbook.sh $(PYTHON) $(COOKBOOK_VENV)
	touch $(COOKBOOK_STAMP)

cookbook: $(COOKBOOK_STAMP)

tools:
	bash tools/install-tools.sh

demo: $(STAMP)
	$(BIN)/tinker-recovery demo

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard daemon tests benchmarks examples)
	$(BIN)/ruff format --check $(wildcard daemon tests benchmarks examples)
	cd daemon && ../$(BIN)/lint-imports ../pyproject.toml

typecheck: $(STAMP) $(COOKBOOK_STAMP)
	$(BIN)/mypy
	$(BIN)/mypy tests examples $(wildcard benchmarks/*.py)
	# Its own cache: one shared with the runs above (another interpreter, torch in its
	# site-packages) makes the next plain `mypy` fail with an internal error.
	$(BIN)/mypy --cache-dir .mypy_cache/cookbook --python-executable $(COOKBOOK_VENV)/bin/python $(wildcard tests/cookbook/*_job.py)

unit: $(STAMP) $(COOKBOOK_STAMP) tools
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/RESULTS.md

clean:
	rm -rf $(VENV) $(COOKBOOK_VENV) .tools .mypy_cache .ruff_cache
