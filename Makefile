# Two commands for users: `make up` runs the system, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
export PYTHONPATH := $(CURDIR):$(CURDIR)/clients/python

.PHONY: up test install node system-deps lint typecheck protos-check ts-check buf-lint buf-breaking gen gen-ts pytest migrate bench soak chaos lock clean

$(VENV)/.installed: requirements.lock pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check uv==0.13.8
	@$(UV) pip install -q --python $(PY) -r requirements.lock
	@# The client package, editable: `.venv/bin/python -m ops ...` imports `logistics` from any folder.
	@$(UV) pip install -q --python $(PY) --no-deps -e clients/python
	@touch $@

install: $(VENV)/.installed

node_modules/.installed: package.json package-lock.json
	@npm ci --no-audit --no-fund --loglevel=error
	@touch $@

node: node_modules/.installed

# Debian packages some tests drive (space-separated); installed only when missing.
SYSTEM_PACKAGES := jq chromium chromium-driver prometheus

system-deps:
	@bash scripts/system_deps.sh $(SYSTEM_PACKAGES)

up: install
	@$(PY) -m ops up

migrate: install
	@$(PY) -m ledger migrate && $(PY) -m sequencer migrate

gen: install
	@$(PY) scripts/gen_protos.py
	@$(PY) scripts/gen_openapi.py

lint: install
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

typecheck: install
	@$(VENV)/bin/mypy

buf-lint: node
	@npx --no-install buf lint

buf-breaking: node
	@bash scripts/buf_breaking.sh

protos-check: install
	@$(PY) scripts/check_generated.py

gen-ts: node
	@bash scripts/gen_typescript.sh

ts-check: node
	@bash scripts/check_typescript.sh

bench: install
	@$(PY) -m bench $(BENCH_ARGS)

# The long fault campaign (docs/faults.md): CHAOS_ARGS="--minutes 10 --seed 7".
soak: install
	@$(PY) -m bench --soak $(BENCH_ARGS)

chaos: install
	@$(PY) -m tests.chaos $(CHAOS_ARGS)

pytest: install
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

test: install node system-deps lint typecheck buf-lint buf-breaking protos-check ts-check pytest

# requirements.lock: everything (runtime + dev) for make install; requirements-runtime.lock: the
# runtime dependencies only, for the container image (Dockerfile), resolved to the same versions.
lock:
	@$(UV) pip compile pyproject.toml --group dev --python-version 3.11 --generate-hashes -q -o requirements.lock
	@$(UV) pip compile pyproject.toml --python-version 3.11 --generate-hashes -q -c requirements.lock -o requirements-runtime.lock

clean:
	rm -rf $(VENV) node_modules .pgdata-test .pgdata-bench .mypy_cache .ruff_cache .pytest_cache
