"""Dynamic reward weights (eq. 10), Active Orthogonality Control (eqs. 4-6), GAE, the sampler."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from balancedbio.aoc import (Projector, dynamic_lambda, gradient_cosine, orthogonality_penalty,
                             pcgrad_reference)
from balancedbio.grpo import StratifiedRepeatSampler, variant_settings
from balancedbio.launch import launch_prefix
from balancedbio.ppo import gae, whiten
from balancedbio.weights import DWAWeights, PIDWeights, StaticWeights, build_weight_controller

NAMES = ["accuracy", "reasoning", "instruction"]


# -- PID weights ---------------------------------------------------------------------------

def test_pid_raises_the_lagging_weight_and_lowers_the_leading_one():
    pid = PIDWeights(NAMES)
    for _ in range(10):  # accuracy lags, instruction leads (section 4.4's example)
        weights = pid.update([0.2, 0.5, 0.9])
    assert weights[0] > 1.0 > weights[2]
    assert weights[0] > weights[1] > weights[2]
    assert pid.errors()[0] > 0 > pid.errors()[2]


def test_pid_first_step_by_hand():
    pid = PIDWeights(NAMES, ema=0.1, kp=0.5, ki=0.05, normalize=False)
    weights = pid.update([0.0, 0.3, 0.9])
    # First observation seeds S; e_k = mean(S) - S_k; integral = e_k; z = (Kp + Ki) e_k;
    # log w = 0 + h tanh(z / h) with h = log 10 (bounds 0.1 .. 10 are symmetric in log space).
    half = math.log(10.0)
    expected = [math.exp(half * math.tanh((0.5 + 0.05) * (0.4 - s) / half)) for s in (0.0, 0.3, 0.9)]
    assert weights == pytest.approx(expected)


@pytest.mark.parametrize("gains", [dict(kp=2.0, ki=0.2), dict(kp=20.0, ki=5.0, integral_limit=50.0)])
def test_pid_settles_strictly_inside_its_bounds_under_constant_rates(gains):
    # Eq. 10's multiplicative form integrates a constant error forever and ends on a clamp;
    # this controller reaches a fixed point, strictly inside (min, max) even with huge gains.
    pid = PIDWeights(NAMES, ema=0.1, min_weight=0.2, max_weight=5.0, **gains)
    history = [pid.update([0.2, 0.5, 0.8]) for _ in range(400)]
    final = history[-1]
    assert all(0.2 < w < 5.0 for w in final), final
    assert max(abs(a - b) for a, b in zip(history[-2], final)) < 1e-9  # stopped changing
    assert final[0] > final[1] > final[2]  # the lagging accuracy ends highest
    assert math.prod(final) == pytest.approx(1.0)  # geometric mean 1
    assert all(abs(i) <= pid.integral_limit for i in pid.integral)


def test_pid_weight_of_a_lagging_component_rises_step_by_step():
    pid = PIDWeights(NAMES)
    accuracy = [pid.update([0.1, 0.6, 0.6])[0] for _ in range(30)]
    assert all(b >= a for a, b in zip(accuracy, accuracy[1:])) and accuracy[-1] > accuracy[0] > 1.0


def test_pid_integral_does_not_wind_up():
    pid = PIDWeights(NAMES, ema=1.0, kp=2.0, ki=1.0, min_weight=0.2, max_weight=5.0, integral_limit=3.0)
    for _ in range(2000):
        weights = pid.update([0.0, 0.5, 1.0])  # a constant error, forever
    assert all(0.2 < w < 5.0 and math.isfinite(w) for w in weights)
    assert all(abs(i) <= 3.0 for i in pid.integral)
    # When the error flips, the integral (stopped at saturation) unwinds within a few steps.
    for _ in range(10):
        pid.update([1.0, 0.5, 0.0])
    assert pid.weights[0] < pid.weights[2]


def test_pid_resumes_its_state_exactly():
    run = PIDWeights(NAMES, initial=[2.0, 1.0, 0.5])
    for rates in ([0.1, 0.5, 0.9], [0.2, None, 0.8], [0.3, 0.6, 0.7]):
        run.update(rates)
    restored = PIDWeights(NAMES)  # other initial weights: the state carries them
    restored.load_state_dict(json.loads(json.dumps(run.state_dict())))  # as the checkpoint stores it
    for rates in ([0.4, 0.5, 0.6], [0.0, 1.0, 0.5]):
        assert restored.update(rates) == run.update(rates)
    with pytest.raises(ValueError, match="cannot be loaded"):
        StaticWeights(NAMES).load_state_dict(run.state_dict())


def test_pid_rejects_initial_weights_outside_its_bounds():
    with pytest.raises(ValueError, match="strictly inside"):
        build_weight_controller({"mode": "pid", "initial": {"instruction": 10.0}}, NAMES)


def test_dwa_resumes_its_state_exactly():
    run = DWAWeights(NAMES)
    for rates in ([0.1, 0.5, 0.9], [0.2, 0.4, 0.8], [0.3, 0.6, 0.7]):
        run.update(rates)
    restored = DWAWeights(NAMES)
    restored.load_state_dict(json.loads(json.dumps(run.state_dict())))
    assert restored.update([0.4, 0.5, 0.6]) == run.update([0.4, 0.5, 0.6])


def test_component_without_evidence_keeps_its_success_rate():
    pid = PIDWeights(NAMES)
    pid.update([0.5, 0.5, 0.5])
    pid.update([0.5, None, 0.5])
    assert pid.success[1] == 0.5


def test_static_weights_never_move_but_track_success():
    static = build_weight_controller({"mode": "static", "initial": {"accuracy": 2.0}}, NAMES)
    for _ in range(5):
        weights = static.update([0.0, 0.5, 1.0])
    assert weights == [2.0, 1.0, 1.0]
    assert static.success[2] == pytest.approx(1.0)


def test_dwa_weights_favour_the_component_whose_failure_rate_fell_least():
    dwa = DWAWeights(["a", "b"], ema=1.0, temperature=1.0)
    dwa.update([0.5, 0.5])  # failure rates 0.5, 0.5
    weights = dwa.update([0.5, 0.75])  # ratios: a 1.0 (stalled), b 0.5 (improving)
    expected_a = 2 * math.exp(1.0) / (math.exp(1.0) + math.exp(0.5))
    assert weights[0] == pytest.approx(expected_a)
    assert sum(weights) == pytest.approx(2.0)


# -- AOC -----------------------------------------------------------------------------------

def _toy_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    x_r, x_i = torch.randn(5, 4), torch.randn(5, 4)
    params = list(model.parameters())
    g_r = torch.autograd.grad(model(x_r).pow(2).mean(), params, create_graph=True)
    g_i = torch.autograd.grad((model(x_i) - 1).abs().mean(), params, create_graph=True)
    return model, params, g_r, g_i


def test_cosine_equals_the_hand_computed_cosine_of_eq_5():
    _, _, g_r, g_i = _toy_gradients()
    a = np.concatenate([g.detach().numpy().ravel() for g in g_r])
    b = np.concatenate([g.detach().numpy().ravel() for g in g_i])
    expected = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8))
    assert float(gradient_cosine(g_r, g_i)) == pytest.approx(expected, rel=1e-5)


def test_cosine_of_a_zero_gradient_is_undefined_not_zero():
    g = [torch.ones(3)]
    assert math.isnan(float(gradient_cosine(g, [torch.zeros(3)])))
    assert math.isnan(float(gradient_cosine([None], g)))


def test_penalty_follows_eq_6_and_is_differentiable():
    _, params, g_r, g_i = _toy_gradients()
    cosine = gradient_cosine(g_r, g_i)
    assert orthogonality_penalty(cosine, 0.6, tau=abs(float(cosine)) + 0.01) is None  # indicator off
    penalty = orthogonality_penalty(cosine, 0.6, tau=0.0)
    assert float(penalty) == pytest.approx(0.6 * float(cosine) ** 2)
    grads = torch.autograd.grad(penalty, params)  # double backward through the cosine
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_dynamic_lambda_caps_the_penalty_gradient():
    assert dynamic_lambda(0.6, policy_grad_norm=1.0, penalty_grad_norm=100.0) == pytest.approx(0.006)
    assert dynamic_lambda(0.6, policy_grad_norm=1.0, penalty_grad_norm=0.5) == pytest.approx(0.6)
    assert dynamic_lambda(0.6, 1.0, 0.0) == 0.0


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_projection_removes_the_conflicting_component(method):
    g_r = [torch.tensor([1.0, 0.0]), torch.tensor([0.5])]
    g_i = [torch.tensor([-1.0, 1.0]), torch.tensor([0.0])]  # conflicting: dot < 0
    combined = torch.cat(Projector(method).combine(g_r, g_i))
    flat_r, flat_i = torch.cat(g_r), torch.cat(g_i)
    # Neither task's loss goes up to first order any more.
    assert float(combined @ flat_r) >= -1e-6 and float(combined @ flat_i) >= -1e-6
    assert float((flat_r + flat_i) @ flat_i) < float(combined @ flat_i)
    if method == "pcgrad":  # the paper's formula, written out
        assert torch.allclose(combined, pcgrad_reference(flat_r, flat_i), atol=1e-6)


def test_projection_leaves_agreeing_gradients_alone():
    g_r, g_i = [torch.tensor([1.0, 0.2])], [torch.tensor([0.5, 1.0])]
    combined = Projector("pcgrad").combine(g_r, g_i)[0]
    assert torch.allclose(combined, g_r[0] + g_i[0])


# -- AOC precision and the trainer's module graph ------------------------------------------

def _tiny_bf16_trainer(tmp_path, weights_dtype: str):
    """A BalancedGRPOTrainer with ``bf16`` compute on a tiny Llama loaded through ``load_causal_lm``."""
    pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig

    from balancedbio.grpo import BalancedGRPOTrainer
    from balancedbio.models import load_causal_lm
    from balancedbio.rewards import AccuracyReward, InstructionReward
    from test_distributed import _tokenizer, global_batch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    saved = tmp_path / f"tiny_{weights_dtype}"
    LlamaForCausalLM(config).save_pretrained(saved, safe_serialization=True)
    model = load_causal_lm(str(saved), dtype=weights_dtype)
    from datasets import Dataset

    dataset = Dataset.from_list([{"prompt": "w1 w2", "capability": "medical", "answer": "A"},
                                 {"prompt": "w3 w4", "capability": "instruction", "answer": None}])
    args = GRPOConfig(output_dir=str(tmp_path / f"out_{weights_dtype}"), per_device_train_batch_size=8,
                      num_generations=2, beta=0.0, max_completion_length=4, loss_type="grpo", report_to=[],
                      use_cpu=True, bf16=True, learning_rate=1e-6, lr_scheduler_type="constant", max_steps=1)
    trainer = BalancedGRPOTrainer(model=model, reward_funcs=[AccuracyReward(), InstructionReward()], args=args,
                                  train_dataset=dataset, processing_class=_tokenizer(),
                                  weight_controller=PIDWeights(["accuracy", "instruction"]),
                                  aoc_config={"mode": "penalty", "tau": 0.0, "lambda": 0.6})
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer()
    wrapped, optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    wrapped.train()
    return trainer, wrapped, optimizer, global_batch("mixed")


def _changed_fraction_after_one_step(tmp_path, weights_dtype: str) -> tuple[float, dict, list]:
    trainer, model, optimizer, inputs = _tiny_bf16_trainer(tmp_path, weights_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    trainer.orthogonality_step(model, inputs)
    # The finite-difference probes shift the weights and put them back exactly (copied, not subtracted).
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    optimizer.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    return changed / sum(p.numel() for p in params), trainer.pop_step_record(), params


def test_bf16_full_fine_tuning_keeps_fp32_master_weights_that_move_at_lr_1e_6(tmp_path):
    from balancedbio.models import training_dtype

    assert training_dtype(bf16=True, use_lora=False) == "float32"  # full fine-tuning: fp32 master weights
    assert training_dtype(bf16=True, use_lora=True) == "bfloat16"  # LoRA without AOC: frozen base only
    assert training_dtype(bf16=True, use_lora=True, aoc_mode="penalty") == "float32"  # fp32 AOC forwards
    fraction, record, params = _changed_fraction_after_one_step(tmp_path, training_dtype(True, False))
    assert all(p.dtype == torch.float32 for p in params)
    assert record["aoc_fired"] is True and math.isfinite(record["s_cos"])
    assert fraction > 0.9, fraction
    # What the fp32 master copy prevents: the same step on bf16 weights rounds most updates away.
    fraction_bf16, _, _ = _changed_fraction_after_one_step(tmp_path, "bfloat16")
    assert fraction_bf16 < 0.5 * fraction, (fraction_bf16, fraction)


def test_ppo_does_not_import_grpo():
    import subprocess
    import sys

    code = "import sys, balancedbio.ppo; sys.exit('balancedbio.grpo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- GAE (the ppo ablation) -------------------------------------------------------------------

def test_gae_against_a_hand_computed_example():
    values = torch.tensor([[0.5, 0.2, 0.1, 0.7]])
    mask = torch.tensor([[1, 1, 1, 0]])  # 3 real tokens, 1 padding
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values * mask, mask, gamma=1.0, lam=0.9)
    # d2 = 1 - 0.1 = 0.9; d1 = 0.1 - 0.2 = -0.1 -> A1 = -0.1 + 0.9 * 0.9 = 0.71;
    # d0 = 0.2 - 0.5 = -0.3 -> A0 = -0.3 + 0.9 * 0.71 = 0.339; the padding gets nothing.
    assert advantages[0].tolist() == pytest.approx([0.339, 0.71, 0.9, 0.0])
    assert returns[0].tolist() == pytest.approx([0.839, 0.91, 1.0, 0.0])
    white = whiten(advantages, mask)
    assert float(white[0, :3].mean()) == pytest.approx(0.0, abs=1e-6) and float(white[0, 3]) == 0.0


# -- sampler, variants, launcher --------------------------------------------------------------

def test_stratified_sampler_puts_both_capabilities_in_every_batch():
    capabilities = ["medical"] * 30 + ["instruction"] * 7
    sampler = StratifiedRepeatSampler(capabilities, batch_size=4, mini_repeat_count=3, repeat_count=2, seed=1)
    indices = list(sampler)
    assert len(indices) == len(sampler)
    per_batch = 4 * 3 * 2
    for start in range(0, len(indices), per_batch):
        batch = indices[start:start + per_batch]
        first_pass = batch[: 4 * 3]
        assert batch[4 * 3:] == first_pass  # repeated for num_iterations
        prompts = first_pass[::3]
        assert all(first_pass[i * 3: i * 3 + 3] == [p] * 3 for i, p in enumerate(prompts))  # G in a row
        kinds = [capabilities[p] for p in prompts]
        assert kinds == ["medical", "instruction", "medical", "instruction"]
    assert {i for i in indices if capabilities[i] == "instruction"} == set(range(30, 37))  # cycled, not starved


def test_stratified_sampler_rejects_a_batch_too_small_to_stratify():
    with pytest.raises(ValueError, match="prompts_per_step"):
        StratifiedRepeatSampler(["medical", "instruction"], batch_size=1)


def test_variants_change_exactly_what_they_name(smoke_config):
    full = variant_settings(smoke_config, "full")
    assert variant_settings(smoke_config, "static_weights")["weights"]["mode"] == "static"
    assert variant_settings(smoke_config, "no_aoc")["aoc"]["mode"] == "monitor"
    assert variant_settings(smoke_config, "no_prm")["use_prm"] is False
    assert variant_settings(smoke_config, "ppo")["advantage"] == "critic"
    assert variant_settings(smoke_config, "gradvac")["aoc"] == {**full["aoc"], "mode": "project",
                                                               "projection": "gradvac"}
    assert variant_settings(smoke_config, "g16")["grpo"]["num_generations"] == 16
    assert full["weights"]["mode"] == "pid" and full["aoc"]["mode"] == "penalty"
    assert full["grpo"]["advantage_aggregation"] == "weighted_components"
    assert variant_settings(smoke_config, "gdpo")["grpo"] == {**full["grpo"],
                                                              "advantage_aggregation": "normalize_then_sum"}
    assert variant_settings(smoke_config, "sum_then_normalize")["grpo"]["advantage_aggregation"] == \
        "sum_then_normalize"
    with pytest.raises(ValueError, match="unknown GRPO variant"):
        variant_settings(smoke_config, "fast")


def test_one_definition_of_the_variant_names():
    import re

    from balancedbio.variants import ABLATION_VARIANTS, DEFAULT_VARIANTS, VARIANT_PATTERN, is_variant

    named = [*DEFAULT_VARIANTS, *ABLATION_VARIANTS, "g4", "g16"]
    assert all(is_variant(v) and re.fullmatch(VARIANT_PATTERN, v) for v in named)
    assert not any(is_variant(v) for v in ("fast", "g1", "g", "full_x", "gdpo2"))
    # The schema's pattern for grpo.variants accepts exactly these names too.
    from balancedbio.defaults import _properties

    pattern = _properties("grpo")["variants"]["items"]["pattern"]
    assert all(re.fullmatch(pattern, v) for v in named) and not re.fullmatch(pattern, "fast")


def test_launch_prefix_single_and_multi_gpu():
    assert launch_prefix(0, python="python") == "env CUDA_VISIBLE_DEVICES= python"  # gpu: 0 hides the GPUs
    assert launch_prefix(1, deepspeed_config="ds.json", python="python") == "python -m balancedbio.gpu_slots 1 -- python"
    cmd = launch_prefix(8, deepspeed_config="envs/ds.json", bf16=True, python="python")
    assert cmd.startswith("python -m balancedbio.gpu_slots 8 -- python -m accelerate.commands.launch")
    assert "--num_processes 8" in cmd and "--use_deepspeed --deepspeed_config_file envs/ds.json" in cmd
    assert "--mixed_precision bf16" in cmd
    assert "--multi_gpu" in launch_prefix(2, python="python")


def test_gpu_slots_give_concurrent_jobs_distinct_gpus(tmp_path):
    from balancedbio.gpu_slots import claim

    first, held_1 = claim(1, total=2, lock_dir=tmp_path)
    second, held_2 = claim(1, total=2, lock_dir=tmp_path)
    assert first != second and sorted(first + second) == [0, 1]
    with pytest.raises(TimeoutError):
        claim(1, total=2, lock_dir=tmp_path, timeout_s=0.1)
    for handle in held_1:
        handle.close()  # the first job ends: its GPU is free again
    again, held_3 = claim(1, total=2, lock_dir=tmp_path)
    assert again == first
    with pytest.raises(RuntimeError, match="asks for 3 GPUs"):
        claim(3, total=2, lock_dir=tmp_path)
    for handle in held_2 + held_3:
        handle.close()


def test_gpu_slots_command_exports_cuda_visible_devices(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(BALANCEDBIO_GPU_COUNT="4", BALANCEDBIO_GPU_LOCK_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "balancedbio.gpu_slots", "2", "--", sys.executable, "-c",
                          "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "0,1"
    env["CUDA_VISIBLE_DEVICES"] = "5"  # set by SLURM: left alone
    out = subprocess.run([sys.executable, "-m", "balancedbio.gpu_slots", "1", "--", sys.executable, "-c",
                          "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "5"
