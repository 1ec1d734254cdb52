# `make test` and `make example` each create the virtual environment they need.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test example check lint typecheck docs bench clean

$(STAMP): pyproject.toml requirements/dev.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt -e .
	touch $(STAMP)

test: $(STAMP)  ## Run the test suite
	$(BIN)/pytest

example: $(STAMP)  ## Run the example application, web server and worker
	$(BIN)/python -m example_app

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

check: lint typecheck docs  ## ruff, mypy --strict and the docs

$(VENV)/.bench-installed: $(STAMP) bench/requirements.txt
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	touch $@

bench: $(VENV)/.bench-installed  ## Benchmark against the alternatives (Redis, PostgreSQL); BENCH_ARGS=--full
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) docs/_build
