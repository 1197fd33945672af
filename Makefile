# Two commands on a fresh machine:
#   make demo   install, then answer a question about an image (offline, built-in demo model)
#   make test   install, then run the whole test suite (the oracle check, a live server,
#               headless Chromium and a local Ray cluster included)
#   make test-fast   the quick subset (no tests marked slow)
# Both install the package into the active Python environment (activate a virtualenv
# first if you want one), so `dsvl2 ...` and `python -m dsvl2.commands.oracle ...` work afterwards.
PY ?= python3
# torch is an ordinary dependency (pyproject: torch>=2.1). Where pip's find-links offer a
# local CPU build (these machines ship torch 2.13.0+cpu in /opt/wheels), install that file:
# an unpinned torch would pull a multi-GB CUDA build instead. Override with TORCH=... .
FIND_LINKS := $(firstword $(PIP_FIND_LINKS) $(shell $(PY) -m pip config get global.find-links 2>/dev/null))
TORCH ?= $(lastword $(sort $(wildcard $(FIND_LINKS)/torch-*+cpu-cp3*.whl)))
export PIP_ROOT_USER_ACTION := ignore
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-test demo test test-fast

# the package alone (torch, safetensors, tokenizers, Pillow, numpy, huggingface_hub)
install:
	$(PY) -m pip install -q $(TORCH) -e .
	@# pyenv puts new console scripts on PATH only after a rehash
	@if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi

# + the test extra: the server, the web test's browser driver, Ray, hypothesis, ...
install-test:
	$(PY) -m pip install -q $(TORCH) -e ".[test]"
	@if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi

demo: install
	$(PY) -m dsvl2 chat -i examples/monday.jpg --max-new-tokens 48 "Describe this image."

test: install-test
	@# the browser tests drive Debian's Chromium (installed once; nothing downloads a browser build)
	@if [ ! -x /usr/bin/chromium ]; then echo "make test: installing Debian's chromium package (needs apt-get, and sudo unless root; used by tests/test_web.py) ..."; fi
	bash tests/browser/install.sh
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"
