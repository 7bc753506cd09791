# The MLOps platform's entry points. `make help` lists them (from the ## comments).
#
# Everything runs from the virtual environment .venv, built from the pinned requirements.lock.
# `make install` is idempotent and fast once done: stamps under .venv/.stamps record what was
# installed, and Debian packages are only installed when missing.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
MLOPS := $(VENV)/bin/mlops
STAMPS := $(VENV)/.stamps
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: the local stack's Redis and Prometheus, the browser for dashboard tests,
# and venv support for the interpreter.
APT_PACKAGES := redis-server prometheus chromium chromium-driver python3-venv
# pip on these machines warns about every configured wheel location on each run
PIP_FILTER := sed -u '/^WARNING: Location .* is ignored/d'
# the mypy-protobuf plugin names every stub it writes
PROTOC_FILTER := sed -u '/^Writing mypy to /d'
LINT_PATHS := $(wildcard services tests loadtests)
PYTEST_ARGS ?=

.PHONY: help install system-packages up down status logs test lint alerts format protos lock bench \
	demo loadtest chaos clean distclean

help: ## Show this help
	@echo "Usage: make <target>   (the platform's CLI is $(MLOPS); see README.md)"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# ----------------------------------------------------------------------------- installation

install: system-packages $(STAMPS)/requirements $(STAMPS)/project ## Install what is missing: Debian packages, .venv from requirements.lock, Triton stub; check protos
	@$(PY) -c 'from services.cli.localinfra import ensure_triton_python_stub as e; e()'
	@$(PY) protos/generate.py --check 2>&1 | $(PROTOC_FILTER)

system-packages:
	@missing=""; \
	for package in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$package" 2>/dev/null | grep -q "install ok installed" \
			|| missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
		for service in redis-server prometheus; do \
			case "$$missing" in *" $$service"*) \
				echo "Stopping the system's own $$service: the stack runs its own instance"; \
				$(SUDO) systemctl disable --now "$$service" 2>/dev/null \
					|| $(SUDO) service "$$service" stop 2>/dev/null || true;; \
			esac; \
		done; \
	fi

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required, $(PYTHON) is " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/requirements: requirements.lock | $(PY)
	@echo "Installing requirements.lock into $(VENV) (once; a few minutes)"
	$(PY) -m pip install --quiet --no-deps -r requirements.lock 2>&1 | $(PIP_FILTER)
	$(PY) -m pip check
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/project: pyproject.toml $(STAMPS)/requirements
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | $(PIP_FILTER)
	@touch $@

# ----------------------------------------------------------------------------- the local stack

up: install ## Start the whole platform locally, wait until healthy, print the endpoints; first model if none
	@$(MLOPS) stack up
	@# no production model yet (a fresh platform): simulated history -> train -> production
	@eval "$$($(MLOPS) stack env)" && $(MLOPS) bootstrap

down: ## Stop everything `make up` started and verify nothing is left
	@if [ -x $(MLOPS) ]; then $(MLOPS) stack down; else echo "nothing installed, nothing running"; fi

status: ## Show each component's state and health
	@$(MLOPS) stack status

logs: ## Show logs: `make logs` (all), `make logs NAME=serving`, add FOLLOW=1 to follow
	@$(MLOPS) stack logs $(NAME) $(if $(FOLLOW),--follow)

# ----------------------------------------------------------------------------- quality

# one pytest process; `make test PYTEST_ARGS="-n 2"` runs the drift e2e module in a worker of
# its own beside the rest (tests/conftest.py OWN_LANE; README "Tests" says what that costs)
test: install lint alerts ## Run everything: lint, alert rules, then the unit, integration and e2e tests
	@mkdir -p var/test-results
	$(PY) -m pytest tests --durations=15 --junitxml=var/test-results/junit.xml $(PYTEST_ARGS)
	@$(PY) .ci/test_summary.py var/test-results/junit.xml

lint: install ## ruff format --check, ruff check, mypy, generated protobuf code up to date
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(PY) protos/generate.py --check 2>&1 | $(PROTOC_FILTER)

alerts: ## Check the Prometheus alert rules and run their unit tests (promtool, deploy/alerts/)
	promtool check rules deploy/alerts/alerts.yml
	promtool test rules deploy/alerts/alerts_test.yml

format: install ## Format the code and apply ruff's safe fixes
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

protos: install ## Regenerate the Python code of protos/ into services/shared/proto
	$(PY) protos/generate.py

lock: ## Re-resolve requirements.txt into requirements.lock (in a throwaway venv)
	rm -rf var/lock-venv
	$(PYTHON) -m venv var/lock-venv
	var/lock-venv/bin/pip install --quiet -r requirements.txt 2>&1 | $(PIP_FILTER)
	var/lock-venv/bin/pip check
	{ echo "# Generated by \`make lock\` from requirements.txt (Python 3.11); do not edit."; \
	  echo "# Installed with pip install --no-deps -r requirements.lock (make install);"; \
	  echo "# it includes setuptools (torch and grpcio-tools need it at run time)."; \
	  var/lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^pip=='; } > var/requirements.lock.new
	mv var/requirements.lock.new requirements.lock
	rm -rf var/lock-venv

# ----------------------------------------------------------------------------- performance

bench: install ## Run every loadtests/bench_*.py in turn; their tables go to BENCHMARKS.md
	@benches="$$(ls loadtests/bench_*.py 2>/dev/null || true)"; \
	if [ -z "$$benches" ]; then echo "no benchmarks (loadtests/bench_*.py) yet"; exit 1; fi; \
	mkdir -p var/bench; \
	for bench in $$benches; do \
		name="$$(basename "$$bench" .py)"; name="$${name#bench_}"; \
		rm -f "var/bench/$$name.md"; \
		echo "== $$bench"; \
		$(PY) "$$bench"; \
		[ -s "var/bench/$$name.md" ] || { echo "$$bench wrote no var/bench/$$name.md"; exit 1; }; \
	done; \
	{ echo "# Benchmarks"; echo; \
	  echo "Measured by \`make bench\` on $$(date -u +%Y-%m-%d) ($$(nproc) cores); each table compares"; \
	  echo "against a baseline measured in the same run."; \
	  for bench in $$benches; do \
		name="$$(basename "$$bench" .py)"; echo; cat "var/bench/$${name#bench_}.md"; \
	  done; } > BENCHMARKS.md; \
	echo "wrote BENCHMARKS.md"

chaos: install ## Kill -9 every component in turn under traffic and Predict load (a stack of its own); table to var/chaos.md
	$(PY) loadtests/chaos.py

RATE ?= 20
DEMO_USERS ?= 2000
DEMO_SECONDS ?= 600
DRIFT_AT ?= 60
LABEL_DELAY ?= 10
# payments per card holder and day that make the bootstrap history as dense as the live traffic
DEMO_PER_USER_DAY = $(shell echo $$(( $(RATE) * 86400 / $(DEMO_USERS) )))
DEMO_WORLD = --users $(DEMO_USERS) --transactions-per-user-per-day $(DEMO_PER_USER_DAY)
demo: install ## The closed loop live: first model, a concept shift DRIFT_AT s in, the autopilot's answer (mlops loop status/history)
	@$(MLOPS) stack up
	@eval "$$($(MLOPS) stack env)" && $(MLOPS) bootstrap --days 0.02 $(DEMO_WORLD)
	@eval "$$($(MLOPS) stack env)"; mkdir -p var/log; \
	$(MLOPS) simulate --rate $(RATE) $(DEMO_WORLD) --concept-drift-at $(DRIFT_AT) \
		--label-delay $(LABEL_DELAY) --duration $(DEMO_SECONDS) --no-wait-labels \
		> var/log/demo-simulate.log 2>&1 & simulator=$$!; \
	trap 'kill $$simulator 2>/dev/null || true' EXIT; \
	echo "simulated traffic at $(RATE)/s, the fraud pattern changes $(DRIFT_AT) s in (log: var/log/demo-simulate.log)"; \
	while kill -0 $$simulator 2>/dev/null; do \
		sleep 30; $(MLOPS) loop status || true; \
	done; \
	$(MLOPS) loop history

USERS ?= 50
SPAWN_RATE ?= 10
DURATION ?= 1m
loadtest: install ## Load the running serving API with locust, headless (USERS=50 DURATION=1m)
	@[ -f loadtests/locustfile.py ] || { echo "loadtests/locustfile.py does not exist yet (the serving work adds it)"; exit 1; }
	@[ -x $(VENV)/bin/locust ] || { echo "locust is not installed: add it to requirements.txt and run make lock"; exit 1; }
	eval "$$($(MLOPS) stack env)" && $(VENV)/bin/locust -f loadtests/locustfile.py --headless \
		--users $(USERS) --spawn-rate $(SPAWN_RATE) --run-time $(DURATION) --only-summary

# ----------------------------------------------------------------------------- cleaning

clean: down ## Stop the stack and delete var/ (all local data, models and logs) and caches
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
	find services tests protos -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## clean, and delete the virtual environment
	rm -rf $(VENV) *.egg-info
