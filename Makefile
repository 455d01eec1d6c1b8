# Quick start: `make repro` runs the pipeline, `make test` runs the tests. Both set up first.
# Every other target also works without activating the venv (it puts .venv/bin first on PATH).
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup repro scratch plan sweep bench bench-scale results results-status plots readme \
	doctor gpu-check test test-all test-fast lint clean

# The exact versions of constraints.txt (pyproject.toml declares only compatible ranges).
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	@touch $@

## setup: venv + the packages of constraints.txt + the embedded dataset (Debian's dataset-fashion-mnist)
setup: $(VENV)/.installed
	@$(PY) -m freezecache ensure-data

## repro: run the pipeline of params.yaml (the fine-tuning default unless you chose a profile);
## dvc.yaml is rendered first for params.yaml's number of freeze points
repro: setup
	freezecache pipeline && dvc repro

## scratch: the from-scratch profile (results in results/scratch/), when they are stale; it runs
## in its own clone (.results/scratch), so params.yaml here stays as it is
scratch: setup
	freezecache results run scratch scratch-plan

## plan: cache size and savings per candidate freeze block (results/plan.md)
plan: setup
	dvc repro plan

## sweep: the default over a grid of codecs and tolerances, 3 seeds each (results/codec_sweep.*)
sweep: setup
	freezecache sweep

## bench: cache speed/size and scaling benchmarks, ratios measured side by side (results/bench*)
bench: setup
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_scaling.py --json results/bench_scaling.json

## bench-scale: FreezeOut and the discard methods after the shared run at four training-set
## sizes, one seed, with the plan's prediction (results/bench_scale.*; about 30 minutes)
bench-scale: setup
	$(PY) benchmarks/bench_scale.py

## results: regenerate every stale result in dependency order (resumable: rerun after a kill),
## then the README's sections; `make results-status` says what is stale and why
results: setup
	freezecache results run
	freezecache readme

results-status: setup
	freezecache results status

## plots: `dvc plots show` as HTML that works offline (results/plots/index.html)
plots: setup
	freezecache plots

## readme: regenerate the README's result sections from results/
readme: setup
	freezecache readme

## doctor: packages, device, decode on the device, disk, and a 20 s epoch measurement
doctor: setup
	freezecache doctor

## gpu-check: every CUDA check in one command, at most 8 minutes (results/gpu/); runs with the
## interpreter that has torch: the venv's, else python3 (a bare CUDA machine: no setup step)
PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out results/gpu

## test: what CI runs: the fast tests and the slow tier on one shared smoke run (~30 min, 2 cores)
test: setup
	$(PY) -m pytest -q --durations=15 -m "not extended"

## test-all: every test, those with a pipeline of their own too (40 min or more on top)
test-all: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check src stages tests benchmarks

clean:
	rm -rf runs data/prepared data/cache .ckpt results/plots .results
