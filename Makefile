# The two commands of the README. Both create/refresh .venv first, so a fresh
# machine needs only Python 3.11 and the package registry.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench demo clean up down system-packages

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q torch==2.13.0     # the CPU wheel first, so nothing pulls CUDA torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)   ## the whole pipeline on the default (synthetic) data, then a summary
	$(BIN)/tumorscope run

test: $(STAMP) system-packages  ## the test suite (real tools, tiny data)
	$(BIN)/python -m pytest

# Two test groups need Debian packages: server mode a real PostgreSQL, the page test Chromium and its driver.
# Installed when missing and we are root; otherwise those tests skip and say why.
SYSTEM_PACKAGES := postgresql chromium chromium-driver
system-packages:
	@missing=""; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="postgresql"; \
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || missing="$$missing chromium chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q $$missing >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null) \
	      || echo "note: could not install$$missing; their tests will be skipped"; \
	  else echo "note:$$missing not installed (needs root); their tests will be skipped"; fi; \
	fi

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
	rm -rf data models models_calibrated models_pretrained models_volumes reports mlflow.db mlartifacts .prefect .bentoml .tumorscope dvc_plots
