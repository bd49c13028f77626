# Two commands on a bare machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-headless test test-browser lint check bench-ledger bench-rounds bench-pages clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,worker]'
	touch $(STAMP)

## The demo: seed the consortium, start the server, the coordinator and one site worker per
## hospital, run an approved job through them, and serve the dashboard at http://127.0.0.1:8000
demo: $(STAMP)
	$(PY) manage.py migrate --noinput
	$(PY) manage.py demo

## The same job run to completion without a dashboard: prints the metrics and the ledger head
demo-headless: $(STAMP)
	$(PY) manage.py migrate --noinput
	$(PY) manage.py demo --no-serve --rounds 3

## Run the test suite (embedded SQLite by default; set DATABASE_URL etc. for the real services)
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Only the browser journeys (Playwright driving Debian's chromium against the real stack);
## screenshots land in var/test-artifacts/browser/
test-browser: $(STAMP)
	$(PY) -m pytest -m browser $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

check: $(STAMP)
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run
	$(PY) manage.py spectacular --validate --fail-on-warn --file /dev/null

bench-ledger: $(STAMP)
	$(PY) benchmarks/ledger.py

## Overhead per round with ten real site workers; beside Flower's simulation when the
## bench extra is installed (pip install -e '.[bench]')
bench-rounds: $(STAMP)
	$(PY) benchmarks/round_overhead.py $(BENCH_ARGS)

## Server time (95th percentile) and queries of the main pages with 100 institutions,
## 1,000 jobs and 100,000 ledger entries, against the same pages with a tenth of the data
bench-pages: $(STAMP)
	$(PY) benchmarks/pages.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var db.sqlite3 db.sqlite3-wal db.sqlite3-shm staticfiles
