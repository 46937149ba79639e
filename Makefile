# Every README command goes through here. PYTHON may point at another interpreter.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help setup train test test-full bench clean

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

test: setup  ## run the test suite (excludes tests marked slow)
	$(PY) -m pytest -q -m "not slow"

test-full: setup  ## run every test
	$(PY) -m pytest -q

bench: setup  ## benchmarks (slow; write bench/results/)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) bench/vanilla_speed.py

clean:  ## remove run outputs and caches
	rm -rf logs outputs .cache .pytest_cache
