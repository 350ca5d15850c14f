# The obvious targets. Python packages come from uv.lock (exact versions and hashes, what CI
# tested) into .venv; the node image's system packages come from Debian (debootstrap, which
# `testbed up` installs itself when it is missing and it runs as root). Nothing is downloaded
# from a model hub.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# uv installs the lock; it is itself installed from PyPI at this exact version into .tools/.
UV_VERSION ?= 0.13.9
TOOLS  ?= .tools
UV      = $(TOOLS)/bin/uv
# Never let uv fetch an interpreter from the network: use the Python the user has.
export UV_PYTHON_DOWNLOADS = never
SCENARIO ?= scenarios/paper-phi3-medium.yaml
# Containers where Docker is reachable (the real testbed), local processes otherwise.
RUNTIME  ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo local)

.PHONY: setup lock test test-unit test-latest lint bench demo clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

# Exactly the lock (fails if uv.lock no longer matches pyproject.toml: run `make lock`).
$(BIN)/testbed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra dev --python $(PYTHON)
	@touch $@

setup: $(BIN)/testbed

# Refresh the lock to the newest releases that pyproject.toml allows, and the node image's
# requirements exported from it (images/requirements-node.txt, same versions and hashes).
lock: | $(UV)
	$(UV) lock --upgrade --python $(PYTHON)
	$(UV) export --frozen --no-dev --no-emit-project --no-header --format requirements-txt \
		--prune torch -o images/requirements-node.txt
	$(MAKE) setup

# The test command (README, .ci/run): unit tests, then integration tests (real model layers,
# local stage processes, Docker containers and shaped links where the host has them).
test: setup
	$(BIN)/python -m pytest

test-unit: setup
	$(BIN)/python -m pytest tests/unit

# The suite against the newest releases pyproject.toml allows, in a separate venv: tells
# whether the next `make lock` is safe, without touching .venv.
LATEST ?= .venv-latest
test-latest: | $(UV)
	$(UV) venv --allow-existing --python $(PYTHON) $(LATEST)
	$(UV) pip install --python $(LATEST)/bin/python --upgrade --resolution highest -e '.[dev]'
	$(LATEST)/bin/python -m pytest

lint: setup
	$(BIN)/ruff check testbed tests benchmarks
	$(BIN)/ruff format --check testbed tests benchmarks
	$(BIN)/mypy testbed

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The main job: Phi-3-medium on the paper-like three-tier cluster with emulated devices,
# Hyperion vs GPipe vs HEFT (README "The main job"); SCENARIO=scenarios/tiny-azure.yaml for the
# fast tiny one.
demo: setup
	$(BIN)/testbed compare $(SCENARIO) $(if $(RUNTIME),--runtime $(RUNTIME))

clean: setup
	$(BIN)/testbed clean
