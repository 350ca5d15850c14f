# The obvious targets. Everything installs into .venv from PyPI (and Debian packages for the
# offline image base); nothing is downloaded from a model hub.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SCENARIO ?= scenarios/tiny-azure.yaml
# Containers where Docker is reachable (the real testbed), local processes otherwise.
RUNTIME  ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo local)

.PHONY: setup test test-unit lint bench demo clean

$(BIN)/testbed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

setup: $(BIN)/testbed

# The test command (README, .ci/run): unit tests, then integration tests (real model layers,
# local stage processes, Docker containers and shaped links where the host has them).
test: setup
	$(BIN)/python -m pytest

test-unit: setup
	$(BIN)/python -m pytest tests/unit

lint: setup
	$(BIN)/ruff check testbed tests benchmarks
	$(BIN)/ruff format --check testbed tests benchmarks
	$(BIN)/mypy testbed

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The main job on the default topology and scenario.
demo: setup
	$(BIN)/testbed compare $(SCENARIO) $(if $(RUNTIME),--runtime $(RUNTIME))

clean: setup
	$(BIN)/testbed clean
