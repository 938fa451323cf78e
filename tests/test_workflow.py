"""The Snakemake workflow: dry runs of every config and profile, lint, and a real smoke run."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, SHARED_BENCHMARKS, run_snakemake


@pytest.mark.parametrize("config_name", ["config.yaml", "paper.yaml", "smoke.yaml"])
def test_dry_run_plans_the_full_dag(config_name, tmp_path):
    result = run_snakemake("-n", "--configfile", str(REPO / "config" / config_name), workdir=tmp_path)
    plan = result.stdout + result.stderr
    for rule in ("prepare_model", "build_kg", "kg_synth", "instruct_prompts", "decontaminate", "train_prm"):
        assert f"rule {rule}:" in plan
    assert "This was a dry-run" in plan


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

    again = run_snakemake("-n", "--configfile", str(REPO / "config" / "smoke.yaml"),
                          workdir=smoke_workdir, env={"BALANCEDBIO_BENCHMARKS_DIR": str(SHARED_BENCHMARKS)})
    assert "Nothing to be done" in again.stdout + again.stderr
    provenance = json.loads((prepared_model_dir / "balancedbio_model.json").read_text())
    assert provenance["kind"] == "embedded"
