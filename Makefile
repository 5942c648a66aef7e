# The two commands of the README. Both create/refresh .venv first, so a fresh
# machine needs only Python 3.11 and the package registry.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench demo clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q torch==2.13.0     # the CPU wheel first, so nothing pulls CUDA torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)   ## the whole pipeline on the default (synthetic) data, then a summary
	$(BIN)/tumorscope run

test: $(STAMP)  ## the test suite (real tools, tiny data)
	$(BIN)/python -m pytest

demo: $(STAMP)  ## the monitoring loop on the synthetic cohort: serve, drift, feedback, retrain, gate, reload
	$(BIN)/python -m flows.demo

lint: $(STAMP)
	$(BIN)/ruff check components flows serving tests bench

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

clean:          ## remove run outputs (keeps .venv)
	rm -rf data models reports mlflow.db mlartifacts .prefect .bentoml .tumorscope dvc_plots
