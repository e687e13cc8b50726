# The README's commands. Each bootstraps .venv on first use (a few minutes), then reuses it.
PYTHON ?= python3
# bash: finetune-demo's prompt ends in a newline, which $'...' keeps and $(printf ...) drops.
SHELL  := /bin/bash
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raymoe-installed

.PHONY: demo finetune-demo test test-fast setup clean

setup: $(STAMP)

# torch==2.13.0 first: it is a CPU build this machine has on disk. Installed after it, the
# project's `torch>=2.5,<3` is already satisfied, so pip does not pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# A fresh run name each time: running the same name again would resume (and find it finished).
demo: $(STAMP)
	$(BIN)/raymoe train jobs/configs/demo.yaml --set name=demo-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/raymoe serve models:/raymoe-demo/latest --routed --try "def " --try "import os" --try "class "

# LoRA on the model `make demo` registered (models:/raymoe-demo/latest), with the shipped instructions.
finetune-demo: $(STAMP)
	$(BIN)/raymoe train jobs/configs/finetune-demo.yaml --set name=finetune-demo-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/raymoe serve models:/raymoe-demo-chat/latest --routed --try $$'<|user|>\nWrite a function that adds two numbers.\n<|assistant|>\n'

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The in-process tests, about a minute: skips those marked slow (Ray, gloo process groups, subprocess CLIs, servers, benchmarks).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf .raymoe .pytest_cache
