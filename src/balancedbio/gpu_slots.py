"""Give each concurrently running job its own GPUs on a shared box.

Snakemake's ``--resources gpu=8`` makes sure that the running jobs never *declare* more GPUs
than the machine has, but it does not say *which* GPUs a job gets: without this, two 1-GPU
jobs would both land on GPU 0. ``python -m balancedbio.gpu_slots N -- cmd ...`` claims N free
GPU ids through lock files (released when the process ends, even if it is killed), exports
``CUDA_VISIBLE_DEVICES`` and runs the command. Under SLURM (or whenever
``CUDA_VISIBLE_DEVICES`` is already set by the scheduler) it changes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

# Private to the user (0700): in a shared, world-writable folder another user could plant a
# symlink named like a lock file and have it truncate or lock a file of theirs choosing.
LOCK_DIR = Path(os.environ.get("BALANCEDBIO_GPU_LOCK_DIR", f"/tmp/balancedbio-gpu-locks-{os.getuid()}"))


def private_lock_dir(lock_dir: Path) -> Path:
    """Create ``lock_dir`` owner-only, or check that the existing one is a real folder of ours, 0700."""
    lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(lock_dir)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"GPU lock folder {lock_dir} must be a folder owned by you with mode 0700 "
                           f"(it is {'a link' if stat.S_ISLNK(info.st_mode) else oct(info.st_mode & 0o777)}, "
                           f"owner uid {info.st_uid}); remove it or set BALANCEDBIO_GPU_LOCK_DIR")
    return lock_dir


def open_lock_file(path: Path):
    """Open (creating if needed) a lock file without following a symlink and without truncating."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RuntimeError(f"GPU lock file {path} is a symbolic link; refusing to follow it (remove it)") from None
        raise
    return os.fdopen(fd, "r+b", buffering=0)


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
    private_lock_dir(lock_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        held: list = []
        for gpu in range(total):
            handle = open_lock_file(lock_dir / f"gpu{gpu}.lock")
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
