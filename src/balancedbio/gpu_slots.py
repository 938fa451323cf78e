"""Give each concurrently running job its own GPUs on a shared box.

Snakemake's ``--resources gpu=8`` makes sure that the running jobs never *declare* more GPUs
than the machine has, but it does not say *which* GPUs a job gets: without this, two 1-GPU
jobs would both land on GPU 0. ``python -m balancedbio.gpu_slots N -- cmd ...`` claims N free
GPU ids through lock files (released when the process ends, even if it is killed), exports
``CUDA_VISIBLE_DEVICES`` and runs the command. Under SLURM (or whenever
``CUDA_VISIBLE_DEVICES`` is already set by the scheduler) it changes nothing.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

LOCK_DIR = Path(os.environ.get("BALANCEDBIO_GPU_LOCK_DIR", "/tmp/balancedbio-gpu-locks"))


def visible_gpu_count() -> int:
    """GPUs on this machine, read from nvidia-smi so that no CUDA context is created here."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0


def claim_into(env, n: int) -> list:
    """Claim ``n`` GPUs and set ``CUDA_VISIBLE_DEVICES`` in ``env``; a no-op on CPU or under SLURM.

    Returns the open lock files: the GPUs stay claimed while they are open.
    """
    if n <= 0 or "CUDA_VISIBLE_DEVICES" in env:
        return []
    total = int(env.get("BALANCEDBIO_GPU_COUNT", visible_gpu_count()))
    if not total:
        return []
    gpus, handles = claim(n, total)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return handles


def claim_in_process(n: int) -> list:
    """For jobs run in-process (Snakemake ``script:``): claim before anything touches CUDA."""
    return claim_into(os.environ, n)


def claim(n: int, total: int, lock_dir: Path = LOCK_DIR, timeout_s: float = 3600.0) -> tuple[list[int], list]:
    """Lock ``n`` of the ``total`` GPU ids; returns the ids and the open lock files (keep them open)."""
    if n > total:
        raise RuntimeError(f"the job asks for {n} GPUs but this machine has {total}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        held: list = []
        for gpu in range(total):
            handle = open(lock_dir / f"gpu{gpu}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            held.append((gpu, handle))
            if len(held) == n:
                return [g for g, _ in held], [h for _, h in held]
        for _, handle in held:  # not enough free: release and wait for a job to finish
            handle.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {n} free GPUs within {timeout_s:.0f} s")
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m balancedbio.gpu_slots N -- command [args...]", file=sys.stderr)
        return 2
    n, command = int(argv[0]), argv[2:]
    env = dict(os.environ)
    handles = claim_into(env, n)
    if handles:
        print(f"gpu_slots: running on GPU(s) {env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr)
    try:
        return subprocess.call(command, env=env)
    finally:
        for handle in handles:
            handle.close()


if __name__ == "__main__":
    sys.exit(main())
