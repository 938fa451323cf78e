"""One function decides a job's device: ``job_device``.

A rule declares its GPUs (``resources.gpu``); ``gpu_slots`` gives a job that declares some its own
devices (``CUDA_VISIBLE_DEVICES``). Every GPU-capable piece (lm-eval's HF backend, held-out
generation, PRM training and scoring, the rollout copy's dtype probe) takes its device from here:

- a job that declares GPUs runs on CUDA device 0 of the ones it was given, when CUDA has any;
- a job that declares ``gpu: 0`` stays on the CPU, also on a GPU box: it holds no GPU slot, so
  another job owns the devices (``enter_job`` hides them from its process before CUDA starts);
- code inside a job that declared nothing itself (``declared_gpus=None``: the GRPO trainer's reward
  models, library calls) follows its process: CUDA when the process can see a device.
"""

from __future__ import annotations

import os


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def job_device(declared_gpus: int | None = None) -> str:
    """``"cuda"`` or ``"cpu"`` for a job that declared ``declared_gpus`` GPUs (``None``: follow the process)."""
    if declared_gpus is not None and declared_gpus <= 0:
        return "cpu"
    return "cuda" if cuda_device_count() > 0 else "cpu"


def enter_job(declared_gpus: int) -> tuple[str, list]:
    """For a rule's script, before anything starts CUDA: claim the job's GPUs, or hide them all.

    Returns ``job_device(declared_gpus)`` and the GPU lock files (keep them open while the job runs).
    """
    from balancedbio.gpu_slots import claim_in_process

    if declared_gpus <= 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # libraries that pick CUDA on their own see none
        return "cpu", []
    locks = claim_in_process(declared_gpus)
    return job_device(declared_gpus), locks


def single_process_gpu_count(n_gpu: int) -> int:
    """GPUs one non-distributed training process may use: one (never ``nn.DataParallel`` over all).

    HF's Trainer wraps the model in ``nn.DataParallel`` when one process sees several GPUs; a job
    that wants several launches one process per GPU (``accelerate launch``) instead.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return n_gpu if distributed else min(n_gpu, 1)
