# Set-up and entry points. `make demo` and `make test` are the two commands a user needs;
# both create what is missing (venv, editable install, .pth workarounds, model cache) and
# reuse what is there. See docs/setup.md for why each step exists.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
# pip.conf normally points at /opt/wheels (the CPU torch wheel); say it again for CI hosts
# whose pip config differs.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(VPY) -m pip install --disable-pip-version-check $(FIND_LINKS)
REQS := requirements/sglang-cpu.txt requirements/dev.txt requirements/no-deps.txt

.PHONY: setup venv models demo test test-all clean-cache

setup: $(VENV)/.dynsplit-install models

venv: $(VENV)/.dynsplit-deps

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Stamp files: re-run pip only when a requirements file or pyproject.toml changes.
$(VENV)/.dynsplit-deps: $(REQS) | $(VPY)
	$(PIP) -r requirements/sglang-cpu.txt -r requirements/dev.txt
	$(PIP) --no-deps -r requirements/no-deps.txt
	@# A CUDA torch or nvidia-* wheel here means a pin was lost; fail loudly instead of later.
	@if $(VPY) -m pip list 2>/dev/null | grep -qiE '^nvidia-|^torch +[0-9.]+\+cu'; then \
		echo "error: pip installed CUDA torch/nvidia wheels into $(VENV); see docs/setup.md" >&2; exit 1; fi
	touch $@

$(VENV)/.dynsplit-install: pyproject.toml $(VENV)/.dynsplit-deps
	$(PIP) --no-deps --no-build-isolation -e .
	$(VPY) -m dynsplit_sglang.patches.cpu_host install
	touch $@

models: $(VENV)/.dynsplit-install
	$(VPY) -m dynsplit_sglang.models prepare all

demo: setup
	$(VPY) examples/agent_frontend.py

test: setup
	$(VPY) -m pytest -m "not slow"

test-all: setup
	$(VPY) -m pytest -m "slow or not slow"

clean-cache:
	rm -rf .cache/models
