# Contract targets: setup, dev, test, check, lock (see README). Each is idempotent.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# uv, the installer that reads uv.lock, lives apart from the project's environment
TOOLS := .tools
UV := $(TOOLS)/bin/uv
STACK_DIR ?= .stack
KAFKA_LIBS := $(STACK_DIR)/kafka/libs
KAFKA_JARS_LOCK := deploy/kafka/jars.sha256
# the dashboard's browser libraries (uPlot), installed from ui/package-lock.json and served from here
UI_VENDOR := ui/static/vendor
MVN := mvn -q -B -Dstyle.color=never -f deploy/kafka/pom.xml
# the lock is for the machine's Python; never let uv fetch an interpreter of its own
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)

.PHONY: setup dev test test-faults test-contracts test-lowest check lock system-packages stack-up stack-down clean bench-history

setup: system-packages $(VENV)/.installed $(KAFKA_LIBS)/.resolved $(UI_VENDOR)/.installed

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

$(UV): deploy/uv-requirements.txt
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --disable-pip-version-check --no-deps --require-hashes \
		-r deploy/uv-requirements.txt
	@touch $@

# Exactly the locked set, hashes checked; fails when pyproject.toml changed without `make lock`.
$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --locked --extra dev
	@touch $@

$(KAFKA_LIBS)/.resolved: deploy/kafka/pom.xml $(KAFKA_JARS_LOCK)
	@mkdir -p $(KAFKA_LIBS)
	rm -f $(KAFKA_LIBS)/*.jar
	$(MVN) dependency:copy-dependencies -DincludeScope=runtime \
		-DoutputDirectory=$(abspath $(KAFKA_LIBS))
	@cd $(KAFKA_LIBS) && diff <(ls *.jar) <(awk '{print $$2}' $(abspath $(KAFKA_JARS_LOCK)) | sort) \
		&& sha256sum --quiet -c $(abspath $(KAFKA_JARS_LOCK)) \
		|| { echo "Kafka jars differ from $(KAFKA_JARS_LOCK) (run make lock after changing the POM)"; exit 1; }
	@touch $@

# Exactly the locked set (npm ci checks the integrity hashes and fails when package.json and the
# lock disagree); nothing is fetched at run time.
$(UI_VENDOR)/.installed: ui/package.json ui/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: install Node.js 18+ with npm (apt-get install nodejs npm)"; exit 1; }
	cd ui && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@mkdir -p $(UI_VENDOR)
	cp ui/node_modules/uplot/dist/uPlot.esm.js ui/node_modules/uplot/dist/uPlot.min.css $(UI_VENDOR)/
	@touch $@

# Re-resolve after editing pyproject.toml or the POM; pins stay unless named:
# `make lock UPGRADE=faststream` (one package) or `make lock UPGRADE=all`.
lock: $(UV)
	$(UV) lock $(if $(filter all,$(UPGRADE)),--upgrade,$(addprefix --upgrade-package ,$(UPGRADE)))
	$(UV) pip compile -q --generate-hashes --no-header --python-version 3.11 \
		deploy/uv-requirements.in -o deploy/uv-requirements.txt
	@rm -rf $(STACK_DIR)/kafka/relock && mkdir -p $(STACK_DIR)/kafka/relock
	$(MVN) dependency:copy-dependencies -DincludeScope=runtime \
		-DoutputDirectory=$(abspath $(STACK_DIR)/kafka/relock)
	cd $(STACK_DIR)/kafka/relock && sha256sum *.jar > $(abspath $(KAFKA_JARS_LOCK))
	@rm -rf $(STACK_DIR)/kafka/relock
	cd ui && npm install --package-lock-only --ignore-scripts --no-audit --no-fund \
		$(if $(filter all,$(UPGRADE)),&& npm update --package-lock-only --ignore-scripts --no-audit --no-fund)

dev: setup
	$(BIN)/microgrid stack up
	$(BIN)/microgrid migrate
	ENVIRONMENT=dev $(BIN)/microgrid dev

test: setup
	$(BIN)/microgrid stack up
	ENVIRONMENT=test $(BIN)/pytest -q -p no:cacheprovider --ignore=tests/faults

# The fault suite (tests/faults): the platform under load while each part in turn is killed,
# paused or starved of disk; prints a table, one row per scenario (sent, accepted, stored,
# duplicates, lost, recovery time). Runs on a broker, PostgreSQL and Redis of its own.
test-faults: setup
	$(BIN)/microgrid stack up
	ENVIRONMENT=test $(BIN)/pytest -q -p no:cacheprovider tests/faults

# Schemathesis at depth: every phase for every role, 100 examples per operation (the suite runs
# a bounded set); prints the case count of each run.
test-contracts: setup
	$(BIN)/microgrid stack up
	CONTRACT_DEPTH=deep ENVIRONMENT=test $(BIN)/pytest -q -s -p no:cacheprovider \
		tests/e2e/test_openapi_conformance.py

# The suite on the lowest versions pyproject.toml allows for each direct dependency (resolved
# from the index today, so not locked): shows the lower bounds are true. The committed documents
# are compared only under the lock (older Litestar renders them differently).
LOWEST := .venv-lowest
test-lowest: setup
	$(UV) pip compile -q --resolution lowest-direct --extra dev --no-header pyproject.toml \
		-o $(LOWEST).txt
	$(UV) venv -q --allow-existing $(LOWEST)
	$(UV) pip sync -q --python $(LOWEST)/bin/python $(LOWEST).txt
	$(UV) pip install -q --python $(LOWEST)/bin/python --no-deps -e .
	$(BIN)/microgrid stack up
	ENVIRONMENT=test $(LOWEST)/bin/pytest -q -p no:cacheprovider --ignore=tests/faults \
		--deselect tests/integration/test_contracts.py

# The readings route over a month of one device's 1-minute readings, served from the rollups,
# with the projector's cost of keeping them (benchmarks/history.py; a scratch database of its
# own, dropped at the end).
bench-history: setup
	$(BIN)/microgrid stack up
	$(BIN)/python -m benchmarks.history --days 30

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy contracts runtime ingest_gateway stream_processors projections query_api microgrid simulator ui benchmarks tests
	$(BIN)/lint-imports
	$(BIN)/microgrid contracts check
	$(UV) lock --check
	cd ui && npm ci --dry-run --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null

stack-up: setup
	$(BIN)/microgrid stack up

stack-down:
	$(BIN)/microgrid stack down

clean:
	@test ! -x $(BIN)/microgrid || $(BIN)/microgrid stack down --purge
	rm -rf $(STACK_DIR) $(VENV) $(TOOLS) $(LOWEST) $(LOWEST).txt ui/node_modules $(UI_VENDOR)
