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

# The client names the API by this checkout's path (so that `pip install ./client` works
# alone), which pip will not pair with an editable API in the same command: the API goes in
# first, the server and the client after (they put a copy of the API in), and the API is made
# editable again last, so that make proto and edits to api/ take effect.
INSTALL_API := $(PY) -m pip install --quiet -e ./api

$(VENV)/.installed-run: $(PARTS) | $(PY)
	$(INSTALL_API)
	$(PY) -m pip install --quiet -e . -e ./client
	$(INSTALL_API) --no-deps
	touch $@

$(VENV)/.installed-test: $(PARTS) | $(PY)
	$(INSTALL_API)
	$(PY) -m pip install --quiet -e '.[test]' -e './client[load,locust]'
	$(INSTALL_API) --no-deps
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
