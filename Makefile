# mpsearch developer / CI entry points. GNU make.
# The venv is cached outside the clone (see tools/venv.sh); .venv is a symlink to it.
PYTHON ?= python3
export PYTHON
# The cached venv is shared by clones and its editable install points at whichever clone ran
# tools/venv.sh last: make's targets import this clone's code first, whatever that points at.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

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
	if [ -L .venv ]; then rm -f .venv; fi

clean-venvs:
	if [ -L .venv ]; then rm -f .venv; fi
	rm -rf "$(VENV_ROOT)"
