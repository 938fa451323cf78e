"""How a training rule starts its process(es): plain Python on one device, ``accelerate launch``
with DeepSpeed on several. Kept as a pure function so dry-run tests can check the command."""

from __future__ import annotations

import shlex
import sys


def launch_prefix(gpus: int, *, deepspeed_config: str | None = None, bf16: bool = False,
                  python: str | None = None) -> str:
    """Command prefix that runs ``-m balancedbio.train ...`` on ``gpus`` devices of one node.

    ``python`` defaults to the interpreter running Snakemake, which imports this package, so the
    rule works whether or not the virtual environment is activated.
    """
    python = python or sys.executable
    # GPU jobs first claim their own devices (CUDA_VISIBLE_DEVICES) among concurrently running jobs.
    # A job that declares no GPU hides them all, so it stays on the CPU on a GPU box (balancedbio.devices).
    slots = [python, "-m", "balancedbio.gpu_slots", str(gpus), "--"] if gpus >= 1 else ["env", "CUDA_VISIBLE_DEVICES="]
    if gpus <= 1:
        return shlex.join([*slots, python])
    # Port 0: accelerate picks a free rendezvous port when the job starts, so two multi-GPU jobs
    # on one node do not both bind the default 29500 (the second would fail or hang).
    parts = [*slots, python, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", str(gpus),
             "--main_process_port", "0", "--mixed_precision", "bf16" if bf16 else "no"]
    if deepspeed_config:
        parts += ["--use_deepspeed", "--deepspeed_config_file", deepspeed_config]
    else:
        parts.append("--multi_gpu")
    return shlex.join(parts)
