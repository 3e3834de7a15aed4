# Two commands for a newcomer:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
# pytest-xdist workers for `make test` (the two cores of a small machine; 0 runs in this process)
TEST_WORKERS ?= 2

.PHONY: demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[all,test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m aoe.cli demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# everything but the tests marked slow (multi-process runs, compile, long trainings): for editing
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
