# The two commands of the quick start: `make run` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test schemas bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## make run: nats-server + edge (+ metering once it exists) on this machine; prints the URL.
run: $(STAMP)
	$(BIN)/relay-local

## make test: the whole suite against real nats-server processes.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make schemas: regenerate the JSON Schema files in schemas/json from the Structs.
schemas: $(STAMP)
	$(BIN)/python -m schemas.export

## make bench: the load benchmark, the edge against the reference relay (bench/README.md).
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .local .pytest_cache
