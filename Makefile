# The two commands of the quick start: `make run` and `make test`. Each sets itself up,
# installing exactly the versions in requirements/ (the lock; `make lock` regenerates it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# The tool that writes the lock, pinned so that `make lock` means the same everywhere.
UV_VERSION := 0.13.9
UV := .venv-lock/bin/uv
# Every lock is resolved for all platforms, for the oldest Python the project supports.
LOCK_FLAGS := --quiet --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock"
# Installs from a lock: only what it names, each file checked against its hash.
PIP_LOCKED := --quiet --require-hashes --no-deps
# The project itself goes in without resolving anything: its dependencies came from the
# lock, its build backend (setuptools) too.
PIP_PROJECT := --quiet --no-deps --no-build-isolation

.PHONY: run test schemas bench lock test-latest test-oldest clean

$(STAMP): pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_LOCKED) -r requirements/dev.txt
	$(BIN)/pip install $(PIP_PROJECT) -e .
	touch $(STAMP)

## make run: nats-server + edge + metering on this machine; prints the URL.
run: $(STAMP)
	$(BIN)/relay-local --local-stop-with-parent true

## make test: the whole suite against real nats-server processes.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make schemas: regenerate the JSON Schema files in schemas/json from the Structs.
schemas: $(STAMP)
	$(BIN)/python -m schemas.export

## make bench: the load benchmark, the edge against the reference relay (bench/README.md).
$(BENCH_STAMP): $(STAMP) requirements/bench.txt
	$(BIN)/pip install $(PIP_LOCKED) -r requirements/bench.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run

## make lock: write requirements/*.txt from pyproject.toml's ranges (commit them with it).
# Pins that still fit are kept; `make lock LOCK_ARGS=--upgrade` moves every one to the newest
# allowed version. bench.txt is the whole set; dev.txt and runtime.txt are its subsets.
lock:
	test -x $(UV) || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet uv==$(UV_VERSION); }
	$(UV) pip compile $(LOCK_FLAGS) $(LOCK_ARGS) pyproject.toml --all-extras requirements/build.in -o requirements/bench.txt
	$(UV) pip compile $(LOCK_FLAGS) pyproject.toml --extra dev requirements/build.in -c requirements/bench.txt -o requirements/dev.txt
	$(UV) pip compile $(LOCK_FLAGS) pyproject.toml requirements/build.in -c requirements/bench.txt -o requirements/runtime.txt

## make test-latest: the suite on the newest versions pyproject.toml allows (a venv of its
# own, by hand, not in CI): run it before `make lock`, and now and then to see drift coming.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	.venv-latest/bin/pip freeze --exclude-editable
	.venv-latest/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

## make test-oldest: the suite on the floors of pyproject.toml's ranges (a venv of its own,
# by hand): proves the floors are versions the code runs on.
test-oldest:
	test -x $(UV) || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet uv==$(UV_VERSION); }
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	$(UV) pip compile --quiet --python-version 3.11 --resolution lowest-direct pyproject.toml --extra dev requirements/build.in -o .venv-oldest/requirements.txt
	.venv-oldest/bin/pip install --quiet --no-deps -r .venv-oldest/requirements.txt
	.venv-oldest/bin/pip install $(PIP_PROJECT) -e .
	.venv-oldest/bin/pip freeze --exclude-editable
	.venv-oldest/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-lock .local .pytest_cache
