# The two commands: `make run` (set up + the embedded default experiment) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test lint bench clean

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

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check effbench tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
