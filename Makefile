# The two commands: `make run` (set up + the embedded default experiment) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@# an older .venv's hydra-optuna-sweeper (optuna<3) would clash with hydra_plugins/effbench_optuna_sweeper
	@$(BIN)/python -m pip uninstall --quiet --yes hydra-optuna-sweeper >/dev/null 2>&1 || true
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/effbench $(ARGS)

# Two pytest workers (pytest-xdist), each kept to its own share of the cores (tests/conftest.py):
# on a 2-core machine most of a test is single-threaded Python (imports, Hydra, Lightning's loop),
# so two workers finish the suite sooner than one worker with two torch threads. JOBS=1: one.
# --dist loadgroup: a module marked xdist_group runs on one worker, so its module-scoped fixture
# runs once, not once per worker (tests/test_bad_input.py: ~90 CLI processes, 33 s).
JOBS ?= 2
XDIST = -n $(JOBS) --dist loadgroup
test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) $(ARGS)

# The edit loop: configs, imports and the core's rules, every refusal through the CLI, datasets,
# backbones, compare, received folders; no training beyond a few tiny runs. `make test` (CI) runs all.
FAST := tests/test_config.py tests/test_imports.py tests/test_bad_input.py tests/compare \
        tests/data tests/backbones tests/test_received_folders.py
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" $(FAST) $(ARGS)

# Every CPU figure of the README in one run (~10 min; take it on a quiet machine).
bench: $(STAMP)
	$(BIN)/python scripts/bench_all.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check effbench tests scripts hydra_plugins

clean:
	rm -rf $(VENV) .pytest_cache
