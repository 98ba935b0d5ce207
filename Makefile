# Fresh machine: only Python 3.11+ and the package registries are needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint unit integration bench clean tools

# System tools the tests need: pdftoppm/pdftotext (Debian poppler-utils) render and read the
# invoice PDFs; prometheus/promtool (Debian prometheus) scrape a running Tally and check the
# alert rules and dashboard queries (tests/integration/e2e/test_prometheus.py). Installed here
# when missing, the same way on a fresh machine and in CI. Only the binaries are used: the tests
# start their own Prometheus on a free port (the package's service is never needed).
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
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends prometheus; }

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

bench: $(STAMP)  ## the benchmark harness (docs/performance.md); QUICK=1 for the 2-minute run; invoice run (1k customers)
	$(BIN)/python -m benchmarks $(if $(QUICK),--quick)
	$(BIN)/python benchmarks/invoice_run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
