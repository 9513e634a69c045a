# foliod: one entry point for set-up, running, testing and benchmarking.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
PROTO  := proto/foliod/v1/foliod.proto

.PHONY: run test test-fast check lint typecheck pytest proto bench fmt clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The three parts, each installable on its own: the API (api/), the server (.) and the client
# (client/). Stamps record which extras are installed; they are rebuilt when a pyproject changes.
PARTS := pyproject.toml api/pyproject.toml client/pyproject.toml

$(VENV)/.installed-run: $(PARTS) | $(PY)
	$(PY) -m pip install --quiet -e ./api -e . -e ./client
	touch $@

$(VENV)/.installed-test: $(PARTS) | $(PY)
	$(PY) -m pip install --quiet -e ./api -e '.[test]' -e './client[load,locust]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/foliod $(ARGS)

test: check

check: $(VENV)/.installed-test lint typecheck pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check api server client tests benchmarks
	$(BIN)/ruff check api server client tests benchmarks

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test
	$(BIN)/pytest $(PYTEST_ARGS)

# The quick loop while editing: lint, types and the tests not marked slow (make test runs all).
test-fast: $(VENV)/.installed-test lint typecheck
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

fmt: $(VENV)/.installed-test
	$(BIN)/ruff format api server client tests benchmarks
	$(BIN)/ruff check --fix api server client tests benchmarks

# Regenerates the committed Python code of the API; tests/test_structure.py fails when it is stale.
proto: $(VENV)/.installed-test
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m grpc_tools.protoc -Iproto \
	  --python_out=api --grpc_python_out=api \
	  --mypy_out=api --mypy_grpc_out=api $(PROTO)

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
