PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test

.PHONY: demo test install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(TESTSTAMP): $(STAMP)
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlmtag run --config examples/demo.yaml
	$(VENV)/bin/vlmtag report demo-output/demo-tagged.jsonl -o demo-output/report.html
	@echo "Open the report in a browser: file://$(CURDIR)/demo-output/report.html"

test: $(TESTSTAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache demo-output

# The Data-Juicer tier (README "Inside Data-Juicer"): its own environment .venv-dj with vlmtag[dj] and the pinned
# py-data-juicer. The CPU torch, aiohttp, ray and openai go in first, so that Data-Juicer installs nothing at run
# time (its run-time installs use uv, past pip's constraints, and would fetch a CUDA torch). Then the real
# dj-process runs the tests marked dj (tests/dj) against the loopback OpenAI server.
DJ_VENV  := .venv-dj
DJ_PY    := $(DJ_VENV)/bin/python
DJ_STAMP := $(DJ_VENV)/.installed
DJ_PINS  := -c constraints.txt -c constraints-dj.txt

.PHONY: test-dj

$(DJ_PY):
	$(PYTHON) -m venv $(DJ_VENV)

$(DJ_STAMP): $(DJ_PY) pyproject.toml constraints.txt constraints-dj.txt
	$(DJ_PY) -m pip install -q --upgrade pip
	$(DJ_PY) -m pip install -q $(DJ_PINS) torch aiohttp ray openai
	$(DJ_PY) -m pip install -q $(DJ_PINS) -e '.[dj]' pytest pytest-timeout
	touch $@

test-dj: $(DJ_STAMP)
	$(DJ_PY) -m pytest -q -m dj tests/dj
