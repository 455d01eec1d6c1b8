# Quick start: `make repro` runs the pipeline, `make test` runs the tests. Both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup repro test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

## setup: venv + pinned packages + the embedded dataset (Debian's dataset-fashion-mnist)
setup: $(VENV)/.installed
	@$(PY) -m freezecache.cli ensure-data

## repro: render dvc.yaml from params.yaml and run the pipeline
repro: setup
	$(PY) -m freezecache.cli pipeline
	dvc repro

## test: the whole test suite (the smoke pipeline included)
test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

## bench: cache speed/size benchmarks, ratios measured side by side (writes results/bench.json)
bench: setup
	$(PY) benchmarks/bench_cache.py

lint: setup
	$(PY) -m ruff check src stages tests benchmarks

clean:
	rm -rf runs data/prepared data/cache results/*.json .ckpt
