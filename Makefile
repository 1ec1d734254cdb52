# `make test` and `make example` each create the virtual environment they need:
# the example's has the package and its runtime dependencies alone.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXAMPLE_VENV := .venv-example
EXAMPLE_STAMP := $(EXAMPLE_VENV)/.installed

.PHONY: test lowest newest tox-envs example check lint typecheck docs bench instructions instructions-profile clean

# pyenv's shims run python3.10 and python3.13, which tox needs, only when
# they are selected; the first version stays the default python3.
ifneq ($(shell command -v pyenv),)
export PYENV_VERSION := $(shell pyenv version-name):3.10:3.13
endif

$(STAMP): pyproject.toml requirements/dev.txt requirements/tests.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt -e .
	touch $(STAMP)

test: $(STAMP)  ## Run the test suite
	$(BIN)/pytest

# TOX_FLAGS=--skip-pkg-install runs the tests in an environment made before,
# as .ci/run does to run both side by side.
lowest: $(STAMP)  ## The tests on the oldest supported versions, Python 3.10
	$(BIN)/tox -e lowest $(TOX_FLAGS)

newest: $(STAMP)  ## The tests on the newest versions, Python 3.13
	$(BIN)/tox -e newest $(TOX_FLAGS)

tox-envs: $(STAMP)  ## Make the environments of lowest and newest, one after the other
	$(BIN)/tox -e lowest,newest --notest

$(EXAMPLE_STAMP): pyproject.toml requirements/example.txt
	python3 -m venv $(EXAMPLE_VENV)
	$(EXAMPLE_VENV)/bin/python -m pip install --quiet -r requirements/example.txt -e .
	touch $(EXAMPLE_STAMP)

example: $(EXAMPLE_STAMP)  ## Run the example application, web server and worker
	$(EXAMPLE_VENV)/bin/python -m example_app

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

instructions: $(VENV)/.bench-installed  ## Instructions per task under callgrind, no server needed; INSTRUCTIONS_ARGS=--layouts 5
	$(BIN)/python bench/instructions.py $(INSTRUCTIONS_ARGS)

# The profile by Python function needs Python 3.12 or later (-X perf).
PERF_PYTHON ?= python3.13

.venv-perf/.installed: pyproject.toml bench/requirements.txt requirements/dev.txt
	$(PERF_PYTHON) -m venv .venv-perf
	.venv-perf/bin/python -m pip install --quiet -r bench/requirements.txt -e .
	touch $@

instructions-profile: $(VENV)/.bench-installed .venv-perf/.installed  ## The same, and where the instructions go, by Python function
	$(BIN)/python bench/instructions.py --profile .venv-perf/bin/python $(INSTRUCTIONS_ARGS)

clean:
	rm -rf $(VENV) $(EXAMPLE_VENV) .venv-perf .tox docs/_build
