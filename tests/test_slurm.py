"""The cluster path for real: the `.test` workflow through `--profile profiles/slurm` on a throwaway
single-node SLURM that profiles/slurm/local-cluster.sh starts on this machine (no accounting
database, as at a site without slurmdbd). Skipped, with the reason, where that cluster cannot run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, SMOKE_ENV, TEST_CONFIG, run_snakemake

LOCAL_CLUSTER = REPO / "profiles" / "slurm" / "local-cluster.sh"
# "Job 4 has been submitted with SLURM jobid 5 (log: /.../slurm_logs/rule_build_kg/5.log)."
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
LOG_RULE = re.compile(r"/slurm_logs/rule_([A-Za-z0-9_]+)/")


def _cluster(mode: str) -> subprocess.CompletedProcess:
    # The first start may install slurm-wlm with apt (waiting for another apt's lock).
    return subprocess.run(["bash", str(LOCAL_CLUSTER), mode], capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def local_slurm():
    """A running single-node cluster; stopped afterwards unless it was already running."""
    if shutil.which("bash") is None:
        pytest.skip("the local SLURM cluster's script needs bash")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd runs as root)")
    was_running = _cluster("status").returncode == 0
    started = _cluster("start")
    if started.returncode != 0:
        reason = started.stderr.strip().splitlines()[-1:] or [f"exit status {started.returncode}"]
        pytest.skip(f"no local SLURM cluster: {reason[0]}")
    yield
    if not was_running:
        stopped = _cluster("stop")
        assert stopped.returncode == 0, stopped.stderr


def _job_stats(output: str) -> dict[str, int]:
    """Snakemake's plan ("Job stats:" table): rule -> job count."""
    table = output[output.index("Job stats:"):].split("\n\n", 1)[0].splitlines()
    rows = (line.split() for line in table[3:])
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[0] != "total"}


@pytest.mark.slow
def test_test_workflow_runs_through_the_slurm_profile(local_slurm, tmp_path):
    result = run_snakemake(
        "--profile", str(REPO / "profiles" / "slurm"),
        # No accounting database (profiles/slurm/README.md); a first look after 5 s, not 40,
        # so that short jobs do not wait; every job's SLURM log kept for the checks below.
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5",
        "--slurm-keep-successful-logs", "--retries", "0",
        "--configfile", str(TEST_CONFIG), workdir=tmp_path, env=SMOKE_ENV)
    output = result.stdout + result.stderr

    report = tmp_path / "results" / "report" / "report.html"
    assert report.is_file() and report.stat().st_size > 0
    assert (tmp_path / "results" / "grpo_full" / "dynamics.jsonl").is_file()

    # Every planned job ran, each either on this machine ("localrule x:", the Snakefile's
    # localrules) or through the executor ("rule x:"); each of the latter went through sbatch once.
    remote = Counter(re.findall(r"^rule (\w+):$", output, flags=re.MULTILINE))
    local = Counter(re.findall(r"^localrule (\w+):$", output, flags=re.MULTILINE))
    assert remote + local == Counter(_job_stats(output))
    assert {"prepare_model", "train_prm", "sft", "grpo", "evaluate", "heldout_rewards"} <= set(remote)
    submitted = {int(job_id): Path(log) for job_id, log in SUBMITTED.findall(output)}
    assert Counter(LOG_RULE.search(str(log)).group(1) for log in submitted.values()) == remote

    # SLURM ran them: slurmctld reports each as COMPLETED in the profile's `cpu` partition (MinJobAge
    # keeps finished jobs an hour), and each job's own log (SLURM's --output) shows the executor's
    # job step inside the allocation running that rule to the end.
    states = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T|%P",
                             "--jobs=" + ",".join(map(str, submitted))],
                            capture_output=True, text=True, check=True).stdout
    seen = {int(job_id): (state, partition) for job_id, state, partition in
            (line.split("|") for line in states.split())}
    assert seen == {job_id: ("COMPLETED", "cpu") for job_id in submitted}
    for job_id, log in submitted.items():
        text = log.read_text(errors="replace")  # progress bars cut mid-character
        rule = LOG_RULE.search(str(log)).group(1)
        assert "--executor slurm-jobstep" in text and f"Finished jobid: 0 (Rule: {rule})" in text, log
