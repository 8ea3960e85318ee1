# mpsearch developer / CI entry points. GNU make.
# .venv is this clone's own small venv on top of a shared, read-only dependency venv (tools/venv.sh).
PYTHON ?= python3
export PYTHON

VENV_ROOT := $(or $(MPSEARCH_VENV_ROOT),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mpsearch/venvs)
BIN := .venv/bin

.PHONY: venv setup demo test test-cpus test-slow lint screenshots clean clean-venvs

venv:
	bash tools/venv.sh

setup: venv
	$(BIN)/python -m mpsearch.tasks.weights

# mobilenet_v2 on this CPU: the fastest configuration within the default drop budget (one of the 256
# evaluation images), then its deployed graph measured beside FP32 and all-int8 (under 5 minutes on
# 2 cores, caches built included)
demo: setup
	$(BIN)/mpsearch search --task mobilenet_v2 --target x86-vnni --trials 20 --seed 0 --verify 1 \
		--out mpsearch-out/demo

test: setup
	$(BIN)/python -m pytest -q

# The tests whose results depend on float kernels, run as on other CPUs: torch's portable kernels
# (ATEN_CPU_CAPABILITY=default, oneDNN at SSE4.1) and AVX2 ones (oneDNN at AVX2), each with ONNX
# Runtime graphs built as for an x86 CPU without VNNI (uint8 weights; tests/mpsearch/conftest.py).
NUMERICS_TESTS := tests/mpsearch/scoring tests/mpsearch/tasks tests/mpsearch/deploy tests/mpsearch/test_search.py \
	$(addprefix tests/mpsearch/engine/test_,sensitivity.py ilp.py early_stop.py) tests/mpsearch/results/test_compare.py \
	tests/mpsearch/calibration/test_gpu.py tests/search_spaces
test-cpus: setup
	@status=0; \
	echo "test-cpus: portable kernels (ATEN_CPU_CAPABILITY=default, oneDNN SSE4.1), no VNNI"; \
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MPSEARCH_TEST_VNNI=0 \
		$(BIN)/python -m pytest -q $(NUMERICS_TESTS) || status=1; \
	echo "test-cpus: AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, oneDNN AVX2), no VNNI"; \
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MPSEARCH_TEST_VNNI=0 \
		$(BIN)/python -m pytest -q $(NUMERICS_TESTS) || status=1; \
	exit $$status

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# docs/report-search.png and docs/report-compare.png: the reports of a mobilenet_v2 search (verified on
# this CPU) and of a compare over three targets, opened in headless Chromium by tools/check_report.py
# (which fails on a console error, a network request or an empty plot), at 1400 px wide
screenshots: setup
	$(BIN)/mpsearch search --task mobilenet_v2 --target x86-vnni --trials 20 --seed 0 --verify 1 \
		--out mpsearch-out/docs-search --no-mlflow
	$(BIN)/mpsearch compare --task mobilenet_v2 --targets x86-vnni,h100,jetson-orin --trials 20 --seed 0 \
		--out mpsearch-out/docs-compare --no-mlflow
	$(BIN)/python tools/check_report.py mpsearch-out/docs-search/report.html mpsearch-out/docs-compare/report.html \
		--screenshots docs --names report-search,report-compare --width 1400

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf mpsearch-out mlflow.db mlruns mlartifacts .pytest_cache .ruff_cache
	find . -path ./.venv -prune -o -path ./.git -prune -o -type d -name __pycache__ -print0 \
		| xargs -0 -r rm -rf
	if [ -f .venv/.mpsearch-clone-venv ] || [ -L .venv ]; then rm -rf .venv; fi

clean-venvs: clean
	rm -rf "$(VENV_ROOT)"
