# Two commands on a fresh machine:
#   make demo   install into .venv, then answer a question about an image (offline, built-in demo model)
#   make test   install into .venv, then run the test suite (the oracle check included)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is an ordinary dependency (pyproject: torch>=2.1). Where pip's find-links offer a
# local CPU build (these machines ship torch 2.13.0+cpu in /opt/wheels), install that file:
# an unpinned torch would pull a multi-GB CUDA build instead. Override with TORCH=... .
FIND_LINKS := $(firstword $(PIP_FIND_LINKS) $(shell $(PY) -m pip config get global.find-links 2>/dev/null))
TORCH ?= $(lastword $(sort $(wildcard $(FIND_LINKS)/torch-*+cpu-cp3*.whl)))

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH) -e ".[test]"
	touch $@

demo: install
	$(BIN)/dsvl2 chat -i examples/monday.jpg --max-new-tokens 48 "Describe this image."

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
