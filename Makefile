# The two commands a new user needs: `make run` and `make test`. Both install first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build that lies on this machine's disk; on a GPU machine use e.g. TORCH=torch (CUDA build).
TORCH ?= torch==2.13.0
SPEC ?= search_spaces/digits.yaml
HPO_DATA_DIR ?= $(abspath ../shared/data)
export HPO_DATA_DIR

.PHONY: install postgres run test lint format docs bench bench-quick bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,ray,postgres]"
	touch $@

# The multi-process tests run a real PostgreSQL server (initdb + pg_ctl in a temporary folder):
# Debian's package, installed when missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
	  || { command -v apt-get >/dev/null 2>&1 && apt-get update -qq \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
	  || { echo "error: PostgreSQL is needed by the tests: apt-get install postgresql" >&2; exit 1; }

run: install
	$(BIN)/hpo run $(SPEC)

# Two test processes (pytest-xdist): most of the suite's time goes to starting hpo processes,
# MLflow servers and PostgreSQL, which overlap; one intra-op thread each keeps the two from
# oversubscribing a 2-core machine (17.7 -> 25 CPU minutes with torch's default threads).
# TEST_JOBS=1: one process. loadgroup: tests that share a costly server or study (marked
# xdist_group) run in one process, which starts it once.
TEST_JOBS ?= 2

test: install postgres
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadgroup

lint: install
	$(BIN)/ruff check hpo tests benchmarks
	$(BIN)/ruff format --check hpo tests benchmarks

format: install
	$(BIN)/ruff format hpo tests benchmarks
	$(BIN)/ruff check --fix hpo tests benchmarks

# docs/spec.md's list of names (datasets, samplers, ...) is written from hpo/registry.py, its
# docs/spec.md's table of hyperparameters from hpo/params.py.
docs: install
	$(BIN)/python -c "from hpo.registry import sync_names; sync_names('docs/spec.md')"
	$(BIN)/python -c "from hpo.params import sync_doc; sync_doc('docs/spec.md')"
	$(BIN)/hpo schema > docs/spec.schema.json

# reports/benchmarks.md and .json, and the figures of docs/performance.md: trainer vs DataLoader loop, fused trials, platform overhead,
# time to 98% on MNIST vs a plain Optuna script (benchmarks/suite.py); then trials per hour
# with 1 and 2 workers. bench-quick: the suite in under 10 minutes on a 2-core laptop.
bench: install
	$(BIN)/python benchmarks/suite.py
	$(BIN)/python benchmarks/bench_workers.py

bench-quick: install
	$(BIN)/python benchmarks/suite.py --quick

# On a machine with an NVIDIA GPU: the CUDA tests, then the quick suite on the GPU with its
# GPU-only section, mnist.yaml's whole budget timed with the GPU's use sampled (about 10 minutes).
bench-gpu: install
	$(BIN)/python -m pytest -q -p no:xdist tests/test_cuda.py tests/test_autoplan.py
	$(BIN)/python benchmarks/suite.py --quick --device cuda

clean:
	rm -rf $(VENV) optuna.db mlflow.db mlruns mlartifacts .pytest_cache
