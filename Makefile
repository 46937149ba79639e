# Every README command goes through here. PYTHON may point at another interpreter.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help setup train test test-fast bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,interpret]"
	touch $@

setup: $(VENV)/.installed  ## create the environment and install the package

train: setup  ## train the default small decoder on the embedded corpus
	$(PY) train.py

test: setup  ## run the whole test suite (what CI runs; ~3 min on 2 cores)
	$(PY) -m pytest -q

test-fast: setup  ## skip the tests marked slow (every experiment running a few steps, DDP, ...)
	$(PY) -m pytest -q -m "not slow"

bench: setup  ## benchmarks (slow; write bench/results/)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) bench/vanilla_speed.py

clean:  ## remove run outputs and caches
	rm -rf logs outputs .cache .pytest_cache
