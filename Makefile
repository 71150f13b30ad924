# Contract targets: setup, dev, test, check (see README). Each is idempotent.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STACK_DIR ?= .stack
KAFKA_LIBS := $(STACK_DIR)/kafka/libs

.PHONY: setup dev test check system-packages stack-up stack-down clean

setup: system-packages $(VENV)/.installed $(KAFKA_LIBS)/.resolved

system-packages:
	@command -v java >/dev/null || { echo "java not found: install a Java 17 runtime (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v mvn >/dev/null || { echo "mvn not found: install Maven (apt-get install maven)"; exit 1; }
	@missing=""; for p in jq chromium; do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing$$missing (apt-get; chromium runs the browser tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@if ! command -v redis-server >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing redis-server (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
		else echo "redis-server not found: install it (sudo apt-get install redis-server)"; exit 1; fi; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing postgresql (apt-get)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
		else echo "PostgreSQL server binaries not found: install them (sudo apt-get install postgresql)"; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

$(KAFKA_LIBS)/.resolved: deploy/kafka/pom.xml
	@mkdir -p $(KAFKA_LIBS)
	rm -f $(KAFKA_LIBS)/*.jar
	mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies \
		-DincludeScope=runtime -DoutputDirectory=$(abspath $(KAFKA_LIBS))
	@touch $@

dev: setup
	$(BIN)/microgrid stack up
	$(BIN)/microgrid migrate
	$(BIN)/microgrid dev

test: setup
	$(BIN)/microgrid stack up
	$(BIN)/pytest -q -p no:cacheprovider

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy contracts ingest_gateway stream_processors projections query_api microgrid ui benchmarks tests
	$(BIN)/microgrid contracts check

stack-up: setup
	$(BIN)/microgrid stack up

stack-down:
	$(BIN)/microgrid stack down

clean:
	@test ! -x $(BIN)/microgrid || $(BIN)/microgrid stack down --purge
	rm -rf $(STACK_DIR) $(VENV)
