# The README's two commands: `make dev` runs the pipeline, `make test` runs the tests.
# Each sets up what it needs: a virtualenv in .venv with the pinned dependencies.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test test-fast test-fuzz test-faults lint openapi bench bench-quick migrate simulate clean

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

# the hostile-input suites: schemathesis + raw-socket fuzzer on Tansu, and the SSRF suite
test-fuzz: $(STAMP)
	$(BIN)/pytest -q tests/test_fuzz.py tests/test_ssrf.py

# SIGKILLs of every component and a broker restart under load, on Apache Kafka (needs java;
# mvn once); prints the duplicate-delivery figure as JSON
test-faults: $(STAMP)
	$(BIN)/pytest -q -s tests/test_faults.py

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench

# the ingress serves deploy/openapi.yaml as JSON (PyYAML is a dev dependency only)
openapi: $(STAMP)
	$(BIN)/python -c 'import json, yaml; d = yaml.safe_load(open("deploy/openapi.yaml")); open("pipeline/ingress/openapi.json", "w").write(json.dumps(d, indent=1) + "\n")'

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
