# Set-up and the two everyday commands. Everything installs into .venv on first use.
PY ?= python3
VENV ?= .venv
# CPU machines: a pinned CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export RES_OPTIONS := timeout:1 attempts:1

.PHONY: setup test bench clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# The test suite: pytest on CPU over gloo (GPU tests skip without GPUs).
test: setup
	$(BIN)/python -m pytest -q

# The main job: a CPU busbw sweep on 4 local gloo ranks, every algorithm, table and plot.
bench: setup
	$(BIN)/python -m benchmarks.busbw --op all_reduce,reduce_scatter --algo all -b 1K -e 16M -f 4 \
		--nproc 4 --json benchmarks/results/cpu-gloo-4rank.json --plot benchmarks/results/cpu-gloo-4rank.png

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
