"""The cluster path for real: the `.test` workflow through `--profile profiles/slurm` on a throwaway
single-node SLURM that profiles/slurm/local-cluster.sh starts on this machine (no accounting
database, as at a site without slurmdbd). The session's one smoke run goes through it where it can
(tests/conftest.py); skipped, with the reason, where that cluster cannot run."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import SMOKE_OUTPUT, SMOKE_SLURM

# "Job 4 has been submitted with SLURM jobid 5 (log: /.../slurm_logs/rule_build_kg/5.log)."
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
LOG_RULE = re.compile(r"/slurm_logs/rule_([A-Za-z0-9_]+)/")


def _job_stats(output: str) -> dict[str, int]:
    """Snakemake's plan ("Job stats:" table): rule -> job count."""
    table = output[output.index("Job stats:"):].split("\n\n", 1)[0].splitlines()
    rows = (line.split() for line in table[3:])
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[0] != "total"}


@pytest.mark.slow
def test_test_workflow_runs_through_the_slurm_profile(smoke_workdir, local_slurm):
    """The session's one smoke run of the `.test` workflow (tests/conftest.py) went through SLURM."""
    if local_slurm is not None:
        pytest.skip(f"no local SLURM cluster, the smoke run used the local cores: {local_slurm}")
    assert (smoke_workdir / SMOKE_SLURM).is_file()
    output = (smoke_workdir / SMOKE_OUTPUT).read_text(encoding="utf-8")

    report = smoke_workdir / "results" / "report" / "report.html"
    assert report.is_file() and report.stat().st_size > 0
    assert (smoke_workdir / "results" / "grpo_full" / "dynamics.jsonl").is_file()

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


@pytest.mark.slow
def test_jobs_a_stopped_run_submitted_are_cancelled(local_slurm, tmp_path):
    """The smoke fixture's cleanup when pytest is stopped (SIGTERM, Ctrl-C) or the run fails: the jobs
    submitted since it started are cancelled, jobs that were already there are left alone."""
    if local_slurm is not None:
        pytest.skip(f"no local SLURM cluster: {local_slurm}")
    from conftest import cancel_jobs_since, slurm_job_ids

    def submit() -> str:
        done = subprocess.run(["sbatch", "--parsable", "--output", str(tmp_path / "%j.out"), "--wrap", "sleep 300"],
                              capture_output=True, text=True, timeout=60, check=True)
        return done.stdout.strip().split(";")[0]

    earlier = submit()
    try:
        before = slurm_job_ids()
        assert earlier in before
        stray = submit()
        assert cancel_jobs_since(before) == {stray}
        for _ in range(60):  # a cancelled job leaves the queue after its completing state
            if stray not in slurm_job_ids():
                break
            time.sleep(1)
        assert stray not in slurm_job_ids() and earlier in slurm_job_ids()
    finally:
        subprocess.run(["scancel", earlier], capture_output=True, timeout=60)
