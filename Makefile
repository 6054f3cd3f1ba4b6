# `make run` serves on http://127.0.0.1:8080 with nothing else installed; `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck bench bench-quick bench-retrieval clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,browser]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/chatbot serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

# Needs redis-server; about 10 minutes (bench-quick: 2). Results: bench/out/, see bench/RESULTS.md.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	PYTHONPATH=. $(BIN)/python -m bench
	PYTHONPATH=. $(BIN)/python -m bench.retrieval

bench-quick: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	PYTHONPATH=. $(BIN)/python -m bench --quick
	PYTHONPATH=. $(BIN)/python -m bench.retrieval --quick

# Retrieval quality and time only (tests/data/site, 1,000 pages); a few seconds, no Redis.
bench-retrieval: $(STAMP)
	PYTHONPATH=. $(BIN)/python -m bench.retrieval

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
