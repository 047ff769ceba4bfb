# The two commands a new user needs: `make run` and `make test`. Both install first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build that lies on this machine's disk; on a GPU machine use e.g. TORCH=torch (CUDA build).
TORCH ?= torch==2.13.0
SPEC ?= search_spaces/digits.yaml
HPO_DATA_DIR ?= $(abspath ../shared/data)
export HPO_DATA_DIR

.PHONY: install run test lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

run: install
	$(BIN)/hpo run $(SPEC)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check hpo tests benchmarks
	$(BIN)/ruff format --check hpo tests benchmarks

format: install
	$(BIN)/ruff format hpo tests benchmarks
	$(BIN)/ruff check --fix hpo tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) optuna.db mlflow.db mlruns mlartifacts .pytest_cache
