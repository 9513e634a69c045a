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

# Stamps record which extras are installed; they are rebuilt when pyproject.toml changes.
$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/foliod $(ARGS)

test: check

check: $(VENV)/.installed-test lint typecheck pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff format --check server client tests benchmarks
	$(BIN)/ruff check server client tests benchmarks

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test
	$(BIN)/pytest $(PYTEST_ARGS)

# The quick loop while editing: lint, types and the tests not marked slow (make test runs all).
test-fast: $(VENV)/.installed-test lint typecheck
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

fmt: $(VENV)/.installed-test
	$(BIN)/ruff format server client tests benchmarks
	$(BIN)/ruff check --fix server client tests benchmarks

# Regenerates the committed Python code of the API; tests/test_structure.py fails when it is stale.
proto: $(VENV)/.installed-test
	PATH=$(abspath $(BIN)):$$PATH $(PY) -m grpc_tools.protoc -Iproto \
	  --python_out=server --grpc_python_out=server \
	  --mypy_out=server --mypy_grpc_out=server $(PROTO)

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
