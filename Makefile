# Fresh machine: only Python 3.11+ and the package registries are needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint unit integration bench clean tools

# System tools the tests need: pdftoppm/pdftotext (Debian poppler-utils) render and read the
# invoice PDFs. Installed here when missing, the same way on a fresh machine and in CI.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)  ## set up and run Tally in embedded mode (no Docker)
	$(BIN)/tally run

tools:
	@command -v pdftoppm >/dev/null 2>&1 && command -v pdftotext >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq poppler-utils; }

test: $(STAMP) tools  ## set up and run lint, types and the whole test suite
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

integration: $(STAMP) tools
	$(BIN)/pytest tests/integration -q

bench: $(STAMP)  ## quick end-to-end ingest + freshness benchmark, invoice run (1k customers)
	$(BIN)/python benchmarks/ingest_e2e.py
	$(BIN)/python benchmarks/invoice_run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
