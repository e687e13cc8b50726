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
# pip would compile each installed file to bytecode one at a time (half of its 117 s here);
# compileall does it on every core (60 + 35 s). A file that cannot compile on this Python (torch's
# 3.12-only test helpers) is skipped, as pip skips it: bytecode only saves time at import.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -e '.[test]'
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

# A fresh run name each time: running the same name again would resume (and find it finished).
demo: $(STAMP)
	$(BIN)/raymoe train jobs/configs/demo.yaml --set name=demo-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/raymoe serve models:/raymoe-demo/latest --routed --try "def " --try "import os" --try "class "

# LoRA on the model `make demo` registered (models:/raymoe-demo/latest), with the shipped instructions.
finetune-demo: $(STAMP)
	$(BIN)/raymoe train jobs/configs/finetune-demo.yaml --set name=finetune-demo-$$(date +%Y%m%d-%H%M%S)
	$(BIN)/raymoe serve models:/raymoe-demo-chat/latest --routed --try $$'<|user|>\nWrite a function that adds two numbers.\n<|assistant|>\n'

# Two pytest sessions at once: tests/ray's end-to-end runs leave a core idle for about a third of
# their time (process starts, timeouts, autoscaling delays), and the other tests fill it at a lower
# CPU priority (nice 19). Their report follows the Ray tests' (and stays in .raymoe/test-others.log).
# ARGS reach both, e.g. make test ARGS="-x --durations=20".
test: $(STAMP)
	@mkdir -p .raymoe; \
	nice -n 19 $(BIN)/python -m pytest -q -p no:cacheprovider --ignore=tests/ray $(ARGS) > .raymoe/test-others.log 2>&1 & others=$$!; \
	trap 'kill $$others 2>/dev/null' INT TERM; \
	echo "tests outside tests/ray: running beside these, report below (.raymoe/test-others.log)"; \
	$(BIN)/python -m pytest -q tests/ray $(ARGS); ray=$$?; \
	wait $$others; rest=$$?; \
	echo "--- tests outside tests/ray"; cat .raymoe/test-others.log; \
	exit $$(( ray != 0 || rest != 0 ))

# The in-process tests, about a minute: skips those marked slow (Ray, gloo process groups, subprocess CLIs, servers, benchmarks).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf .raymoe .pytest_cache
