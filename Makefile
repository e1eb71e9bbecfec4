# Two commands do everything: `make run` (the whole stack) and `make test`.
# Each creates .venv on first use and reinstalls only when pyproject.toml or the
# constraints change, so a fresh clone needs nothing but Python 3.11+.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONSTRAINTS := $(wildcard constraints.txt)

.PHONY: run test test-fast lint format clean-data capture-histories bench audit

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing dependencies into $(VENV) (first run takes a minute) ..."
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	@touch $@

run: $(STAMP)
	@$(PY) -m devstack run

# The storm benchmark: prints figures, writes .data/bench/report-*.json.
# make bench ARGS=--quick (1,000 requests); ARGS="--workers 2"; ARGS=--help
bench: $(STAMP)
	@$(PY) -m bench $(ARGS)

# Reconcile provider, ledger and Temporal of the stack `make run` started (its fixed
# ports); exits non-zero on any problem. Flags: .venv/bin/python -m audit --help
audit: $(STAMP)
	@$(PY) -m audit --database-url postgresql+psycopg://postgres@127.0.0.1:55432/payments \
		--provider-url http://127.0.0.1:8100 --temporal-address 127.0.0.1:7233

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest

# Everything but the end-to-end and slow fault tests: for the edit-test loop.
test-fast: lint
	$(PY) -m pytest -m "not e2e and not slow"

# Drive every payment path on a stack of its own (free ports) and refresh
# tests/replay/histories/ (about 6 minutes: one path waits out the charge budget).
capture-histories: $(STAMP)
	@$(PY) -m devstack capture-histories

clean-data:
	rm -rf .data
