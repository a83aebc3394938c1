# Loop Service: every install step lives here, so a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo run test lint typecheck unit clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The live demo: simulated platform traffic streamed into the running system, dashboard on :8080.
demo: install
	$(BIN)/loopservice demo

run: install
	$(BIN)/loopservice run

lint: install
	$(BIN)/ruff check domain streams projections infra loopservice tests
	$(BIN)/ruff format --check domain streams projections infra loopservice tests

typecheck: install
	$(BIN)/mypy -p loopservice

unit: install
	$(BIN)/pytest -q

## Debian packages the tests use for real (PostgreSQL, Chromium, ChromeDriver); apt-get runs
## only when one is missing.
.PHONY: system-deps
system-deps:
	infra/system-deps.sh

## Installs everything, then lint, types and the whole test suite.
test: install system-deps
	$(MAKE) lint typecheck unit

clean:
	rm -rf $(VENV) build *.egg-info

## A real single-node Kafka broker (KRaft) on 127.0.0.1:9092, data in var/kafka; the first run
## fetches Kafka's jars from Maven Central. Stop it with `infra/kafka/kafka.sh down`.
.PHONY: kafka
kafka:
	infra/kafka/kafka.sh up
