# The two commands of the README. Both create/refresh .venv first, so a fresh
# machine needs only Python 3.11 and the package registry.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench demo clean up down postgres

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q torch==2.13.0     # the CPU wheel first, so nothing pulls CUDA torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)   ## the whole pipeline on the default (synthetic) data, then a summary
	$(BIN)/tumorscope run

test: $(STAMP) postgres  ## the test suite (real tools, tiny data)
	$(BIN)/python -m pytest

# The server-mode tests start a real PostgreSQL: Debian's package, installed when missing and we are root
# (otherwise those tests skip and say why).
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && (apt-get install -y -q postgresql >/dev/null 2>&1 || \
	    (apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null)); } || \
	  echo "note: PostgreSQL not installed; the server-mode tests will be skipped"

demo: $(STAMP)  ## the monitoring loop on the synthetic cohort: serve, drift, feedback, retrain, gate, reload
	$(BIN)/python -m flows.demo

up: $(STAMP)    ## server mode: PostgreSQL, S3 (moto), MLflow + Prefect servers and a worker on 127.0.0.1; deploys the flows
	$(BIN)/python infra/local/stack.py up

down:           ## stop the server-mode services (data kept; `python infra/local/stack.py down --purge` deletes it)
	$(BIN)/python infra/local/stack.py down

lint: $(STAMP)
	$(BIN)/ruff check components flows serving tests bench

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

clean:          ## remove run outputs (keeps .venv)
	rm -rf data models reports mlflow.db mlartifacts .prefect .bentoml .tumorscope dvc_plots
