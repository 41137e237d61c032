# Everyday commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# rules call `python -m lcnn.<stage>`: the venv comes first on PATH
export PATH := $(BIN):$(PATH)
STAMP := $(VENV)/.lcnn-installed

.PHONY: venv install demo test test-fast lint format clean gpu-check status

venv: $(BIN)/python  ## create .venv alone

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(STAMP)  ## install lcnn and its dev tools into .venv

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install  ## the whole study, scaled down, on built-in data on the CPU, then the HTML report
	$(BIN)/python -m lcnn.forkserver -- $(BIN)/snakemake --profile profiles/demo  # trainers forked warm: README
	$(BIN)/snakemake --profile profiles/demo --report report.html
	@echo "Demo done: tables in results/report/, HTML report in report.html"

test: install  ## the whole test suite (starts a SLURM test cluster when run as root)
	$(BIN)/python -m pytest

test-fast: install  ## the package-level tests only
	$(BIN)/python -m pytest -m "not slow and not slurm and not browser"

lint: install  ## snakemake --lint, snakefmt and ruff
	$(BIN)/snakemake --lint --profile profiles/demo
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/ruff check lcnn tests
	$(BIN)/ruff format --check lcnn tests

format: install
	$(BIN)/snakefmt Snakefile rules
	$(BIN)/ruff format lcnn tests

gpu-check: install  ## GPU acceptance check (under 8 min on one GPU): gpu_check/gpu_check.{json,md}
	$(BIN)/python -m lcnn.tools.gpu_check --out gpu_check/

status: install  ## the study's state: each run, GPU-hours spent and left (add ARGS="--configfile ...")
	$(BIN)/python -m lcnn.status $(ARGS)

clean:  ## remove everything the workflow produced (keeps .venv)
	rm -rf data/builtin data/builtin_search runs runs_halving search results benchmarks logs mlruns gpu_check report.html .snakemake
