"""One function decides a job's device (balancedbio.devices.job_device): for every kind of job, with CUDA
present (a faked device count) and absent; a rule that declares gpu: 0 stays on the CPU on a GPU box."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from balancedbio.config import _deep_merge
from balancedbio.devices import enter_job, job_device, single_process_gpu_count
from conftest import REPO


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend this process sees ``count`` CUDA devices (bf16-capable)."""
    def set_count(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    return set_count


def _declared_gpus(config_name: str, rule: str) -> int:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    if config_name != "config.yaml":
        config = _deep_merge(config, yaml.safe_load((REPO / "config" / config_name).read_text(encoding="utf-8")))
    resources = {**config["resources"]["default"], **(config["resources"].get(rule) or {})}
    return int(resources.get("gpu", 0))


# Kind of job -> the rule whose resources it runs under (heldout_rewards declares evaluate's).
JOBS = {"evaluate": "evaluate", "heldout_rewards": "evaluate", "train_prm": "train_prm"}


@pytest.mark.parametrize("cuda_devices", [0, 2], ids=["no_cuda", "two_gpus"])
@pytest.mark.parametrize("config_name", ["config.yaml", "paper.yaml", "qwen05b.yaml"])
def test_each_rule_job_runs_where_its_rule_declares(fake_cuda, cuda_devices, config_name):
    fake_cuda(cuda_devices)
    for job, rule in JOBS.items():
        declared = _declared_gpus(config_name, rule)
        expected = "cuda" if declared > 0 and cuda_devices > 0 else "cpu"
        assert job_device(declared) == expected, (job, config_name, declared)
    if config_name == "config.yaml":  # the CPU default declares no GPU: nothing lands on one
        assert all(job_device(_declared_gpus(config_name, rule)) == "cpu" for rule in JOBS.values())
    else:  # the GPU configs: evaluation and PRM training hold a GPU slot
        assert all(_declared_gpus(config_name, rule) >= 1 for rule in JOBS.values())


@pytest.mark.parametrize("cuda_devices", [0, 2], ids=["no_cuda", "two_gpus"])
def test_code_inside_a_job_follows_its_process(fake_cuda, cuda_devices):
    """The NLI judge and the PRM scorer inside GRPO, library calls: the process's device."""
    fake_cuda(cuda_devices)
    assert job_device() == ("cuda" if cuda_devices else "cpu")
    from balancedbio.prm import _device

    assert _device().type == job_device()


def test_a_gpu_0_job_hides_the_gpus_of_a_gpu_box(fake_cuda, monkeypatch):
    fake_cuda(2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    device, locks = enter_job(0)
    assert (device, locks) == ("cpu", [])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # lm-eval / HF Trainer cannot pick CUDA on their own


def test_a_gpu_job_claims_its_own_device(fake_cuda, monkeypatch):
    fake_cuda(2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("BALANCEDBIO_GPU_COUNT", "2")
    device, locks = enter_job(1)
    try:
        assert device == "cuda"
        assert os.environ["CUDA_VISIBLE_DEVICES"] in {"0", "1"} and len(locks) == 1
    finally:
        for handle in locks:
            handle.close()
    fake_cuda(0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("BALANCEDBIO_GPU_COUNT", "0")
    assert enter_job(1) == ("cpu", [])  # a GPU rule on a CPU machine runs on the CPU


def test_prm_training_uses_one_device_unless_launched_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert single_process_gpu_count(8) == 1  # no nn.DataParallel over every visible GPU
    assert single_process_gpu_count(0) == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert single_process_gpu_count(1) == 1


def test_rollout_auto_and_eval_dtype_on_cuda_do_not_benchmark_the_cpu(fake_cuda, monkeypatch):
    from balancedbio import rollout
    from balancedbio.evaluation import resolve_dtype

    fake_cuda(1)

    def no_cpu_matmuls(*args, **kwargs):
        raise AssertionError("benchmarked CPU matmuls for a CUDA policy")

    monkeypatch.setattr(rollout.torch, "randn", no_cpu_matmuls)
    assert rollout.faster_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert rollout.faster_dtype("cuda") == torch.float32
    assert resolve_dtype("auto", "cuda") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"  # an explicit dtype is kept
