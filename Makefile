# mpsearch developer / CI entry points. GNU make.
# .venv is this clone's own small venv on top of a shared, read-only dependency venv (tools/venv.sh).
PYTHON ?= python3
export PYTHON

VENV_ROOT := $(or $(MPSEARCH_VENV_ROOT),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mpsearch/venvs)
BIN := .venv/bin

.PHONY: venv setup demo test test-slow lint clean clean-venvs

venv:
	bash tools/venv.sh

setup: venv
	$(BIN)/python -m mpsearch.tasks.weights

demo: setup
	$(BIN)/mpsearch search --task digits --target x86-vnni --trials 40 --seed 0 --out mpsearch-out/demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf mpsearch-out mlflow.db mlruns mlartifacts .pytest_cache .ruff_cache
	find . -path ./.venv -prune -o -path ./.git -prune -o -type d -name __pycache__ -print0 \
		| xargs -0 -r rm -rf
	if [ -f .venv/.mpsearch-clone-venv ] || [ -L .venv ]; then rm -rf .venv; fi

clean-venvs: clean
	rm -rf "$(VENV_ROOT)"
