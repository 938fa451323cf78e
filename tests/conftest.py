"""Shared fixtures: the repository root, a Snakemake runner, one end-to-end smoke run."""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The smallest config, in the catalog's place for a workflow's test config.
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"
# The real benchmark files, read by path (never copied into the repository): the folder in
# BALANCEDBIO_BENCHMARKS_DIR, else ../shared/benchmarks beside the checkout.
SHARED_BENCHMARKS = Path(os.environ.get("BALANCEDBIO_BENCHMARKS_DIR") or REPO / ".." / "shared" / "benchmarks").resolve()
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run_snakemake(*args: str, workdir: Path | None = None, env: dict | None = None,
                  check: bool = True, timeout: int = 2400) -> subprocess.CompletedProcess:
    """Run Snakemake on the repository's Snakefile, optionally in another working directory."""
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "workflow" / "Snakefile")]
    if workdir is not None:
        cmd += ["--directory", str(workdir)]
    cmd += list(args)
    full_env = {**os.environ, **(env or {})}
    # Scripts run with this interpreter; make sure they import the same package.
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


SMOKE_ENV = {"BALANCEDBIO_BENCHMARKS_DIR": str(SHARED_BENCHMARKS)}


LOCAL_CLUSTER = REPO / "profiles" / "slurm" / "local-cluster.sh"
# Through profiles/slurm on the local cluster: no accounting database (profiles/slurm/README.md); a
# first status look after 5 s, not 40, so short jobs do not wait; every job's SLURM log kept.
SLURM_ARGS = ("--profile", str(REPO / "profiles" / "slurm"), "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "5", "--slurm-keep-successful-logs", "--retries", "0")
SMOKE_OUTPUT = "smoke_run.out"  # Snakemake's output of the smoke run, kept for tests/test_slurm.py
SMOKE_SLURM = "smoke_run.slurm"  # present when the smoke run went through the local SLURM cluster


def pytest_configure(config):
    # `timeout`, a CI runner or `kill` stop pytest with SIGTERM, which by default ends Python without
    # running a fixture's cleanup: as KeyboardInterrupt it does run, so the smoke run's SLURM jobs
    # are cancelled (below) instead of running on for minutes after pytest is gone.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def slurm_job_ids() -> set[str]:
    """This user's queued or running SLURM job ids (empty where squeue cannot answer)."""
    try:
        listed = subprocess.run(["squeue", "--noheader", "--user", getpass.getuser(), "--format=%i"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(listed.stdout.split()) if listed.returncode == 0 else set()


def cancel_jobs_since(before: set[str]) -> set[str]:
    """scancel this user's jobs that were not in ``before`` (a run stopped half way submitted them;
    killing Snakemake does not cancel them); the ids it cancelled."""
    started = slurm_job_ids() - before
    if started:
        subprocess.run(["scancel", *sorted(started)], capture_output=True, text=True, timeout=60)
    return started


def _local_cluster(mode: str) -> subprocess.CompletedProcess:
    # The first start may install slurm-wlm with apt (waiting for another apt's lock).
    return subprocess.run(["bash", str(LOCAL_CLUSTER), mode], capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="session")
def local_slurm():
    """A single-node SLURM cluster on this machine (profiles/slurm/local-cluster.sh), or the reason there
    is none; stopped at the end of the session unless it was already running."""
    if os.environ.get("BALANCEDBIO_TEST_SLURM", "1") == "0":
        yield "BALANCEDBIO_TEST_SLURM=0"
        return
    if os.geteuid() != 0:
        yield "the local SLURM cluster needs root (slurmd runs as root)"
        return
    was_running = _local_cluster("status").returncode == 0
    started = _local_cluster("start")
    if started.returncode != 0:
        yield (started.stderr.strip().splitlines()[-1:] or [f"exit status {started.returncode}"])[0]
        return
    yield None
    if not was_running:
        _local_cluster("stop")


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory, local_slurm) -> Path:
    """A working directory in which the smoke config ran the whole workflow for real.

    Where a local SLURM cluster can run, the one smoke run goes through ``--profile profiles/slurm``
    (the cluster path tested for real without a second whole run; tests/test_slurm.py checks it);
    elsewhere on the local cores."""
    workdir = tmp_path_factory.mktemp("smoke_run")
    through = SLURM_ARGS if local_slurm is None else ("--cores", "2")
    before = slurm_job_ids() if local_slurm is None else set()
    try:
        result = run_snakemake(*through, "--configfile", str(TEST_CONFIG), workdir=workdir, env=SMOKE_ENV)
    except BaseException:  # interrupted, timed out or failed: its jobs must not outlive it
        if local_slurm is None:
            cancel_jobs_since(before)
        raise
    (workdir / SMOKE_OUTPUT).write_text(result.stdout + result.stderr, encoding="utf-8")
    if local_slurm is None:
        (workdir / SMOKE_SLURM).touch()
    return workdir


@pytest.fixture(scope="session")
def default_prm_workdir(tmp_path_factory) -> Path:
    """A working directory in which the embedded default's own config (config/config.yaml) built
    its data and trained its process reward model: the real rules, about 5 minutes on 2 cores."""
    workdir = tmp_path_factory.mktemp("default_prm")
    # The target first: --configfile takes every argument after it.
    run_snakemake("results/models/prm", "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"),
                  workdir=workdir, env=SMOKE_ENV)
    return workdir


@pytest.fixture(scope="session")
def smoke_graph(smoke_workdir):
    from balancedbio.data.kg import KnowledgeGraph

    return KnowledgeGraph.load(smoke_workdir / "results" / "data" / "kg" / "graph.json.gz")


@pytest.fixture(scope="session")
def prepared_model_dir(smoke_workdir) -> Path:
    return smoke_workdir / "results" / "models" / "base"


@pytest.fixture(scope="session")
def smoke_config() -> dict:
    """The smoke config, validated and with the schema's defaults filled in."""
    from balancedbio.config import load_config

    return load_config(TEST_CONFIG, base_dir=REPO)


def free_port() -> int:
    """A TCP port free on this machine now (each multi-process test's own rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rank_workers(script: Path, out: Path, processes: int, timeout: int = 300) -> None:
    """Run ``script --worker OUT`` in ``processes`` real processes (torch.distributed.run, gloo on the CPU)
    or in one plain process; a hang (a collective some rank never joins) fails after ``timeout`` seconds."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if processes > 1 else [sys.executable])
    try:
        done = subprocess.run([*launcher, str(script), "--worker", str(out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{processes}-process run of {script.name} did not finish in {timeout} s:\n"
                             f"{err.stderr}") from None
    assert done.returncode == 0, \
        f"{processes}-process run of {script.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
