# The README's two commands: `make dev` runs the pipeline, `make test` runs the tests.
# Each sets up what it needs: a virtualenv in .venv with the pinned dependencies.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test test-fast lint bench bench-quick migrate simulate clean

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/pipeline dev --config deploy/example.toml

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not kafka and not clickhouse and not e2e"

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench

simulate: $(STAMP)
	$(BIN)/pipeline simulate --config deploy/example.toml

clean:
	rm -rf $(VENV) .data

# Benchmarks (bench/run.py): figures against same-run baselines, written to bench/results/.
bench: $(STAMP)
	sh bench/ensure_wrk.sh
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	sh bench/ensure_wrk.sh
	$(BIN)/python -m bench.run --quick
