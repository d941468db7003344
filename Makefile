# Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

$(STAMP): requirements.txt pyproject.toml runtime/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e . -e runtime
	touch $(STAMP)

venv: $(STAMP)

# The full suite: slow end-to-end tests run in their small CI configuration.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -ra

test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	bash examples/aishell2/s0/demo.sh

bench: $(STAMP)
	$(PY) bench/moe_layer.py

clean:
	rm -rf $(VENV) build *.egg-info
