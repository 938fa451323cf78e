"""AOC under data parallel, for real: two CPU processes (torch.distributed, gloo) against one.

The same module is the worker: ``python -m torch.distributed.run --nproc_per_node 2
tests/test_distributed.py --worker OUT`` builds ``BalancedGRPOTrainer`` on a tiny
Llama in every process, wraps it in DDP through the trainer's accelerator, gives each rank its
half of one fixed global batch and runs the trainer's own AOC step (``orthogonality_step``)
and a real optimizer step. Run without ``torch.distributed.run`` (one process, the whole
batch) it is the reference. The test compares S_cos, the penalty's decision and size, the
applied gradient and the parameter update.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
VOCAB = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(29)]
ROWS = 8
# Rows of the global batch that are medical. "mixed": both ranks hold both capabilities;
# "split": rank 0 holds medical rows only, rank 1 instruction rows only (each rank then sees
# one capability, the global batch both).
SCENARIOS = {"mixed": [True, True, False, True, False, True, False, False],
             "split": [True, True, True, True, False, False, False, False]}
AOC_RUNS = (*sorted(SCENARIOS), "mixed_hessian_vector")  # finite-difference probes; exact H v on the mixed batch


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def global_batch(scenario: str) -> dict:
    import torch

    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 6, (ROWS,), generator=generator)
    return {
        "prompt_ids": torch.randint(3, len(VOCAB), (ROWS, 3), generator=generator),
        "prompt_mask": torch.ones(ROWS, 3, dtype=torch.long),
        "completion_ids": torch.randint(3, len(VOCAB), (ROWS, 5), generator=generator),
        "completion_mask": (torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)).long(),
        "advantages": torch.randn(ROWS, generator=generator),
        "is_medical": torch.tensor(SCENARIOS[scenario]),
        "num_items_in_batch": lengths.sum().float(),
    }


def worker(out_dir: str) -> None:
    import torch

    for scenario in sorted(SCENARIOS):
        _aoc_step(out_dir, scenario)
    # The CPU default's probes (exact H v by a double backward), on the mixed batch.
    _aoc_step(out_dir, "mixed", penalty_gradient="hessian_vector", name="mixed_hessian_vector")
    _dynamic_sampling_step(out_dir)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _aoc_step(out_dir: str, scenario: str, penalty_gradient: str = "finite_difference", name: str | None = None) -> None:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig

    from balancedbio.grpo import BalancedGRPOTrainer
    from balancedbio.rewards import AccuracyReward, InstructionReward
    from balancedbio.weights import PIDWeights

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights in every process
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = LlamaForCausalLM(config)
    dataset = Dataset.from_list([{"prompt": "w1 w2", "capability": "medical", "answer": "A"},
                                 {"prompt": "w3 w4", "capability": "instruction", "answer": None}])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = GRPOConfig(output_dir=str(Path(out_dir) / "trainer"), per_device_train_batch_size=ROWS // world,
                      num_generations=2, beta=0.0, max_completion_length=4, loss_type="grpo", report_to=[],
                      use_cpu=True, bf16=False, logging_steps=1, optim="sgd", learning_rate=0.1,
                      lr_scheduler_type="constant", max_steps=1)
    trainer = BalancedGRPOTrainer(model=model, reward_funcs=[AccuracyReward(), InstructionReward()], args=args,
                                  train_dataset=dataset, processing_class=_tokenizer(),
                                  weight_controller=PIDWeights(["accuracy", "instruction"]),
                                  # A large constant lambda: the penalty's gradient is a sizeable part of
                                  # the update, so a mis-scaled surrogate could not hide in the tolerance.
                                  aoc_config={"mode": "penalty", "tau": 0.0, "lambda": 30.0,
                                              "lambda_scaling": "constant",
                                              "penalty_gradient": penalty_gradient})
    accelerator = trainer.accelerator
    assert accelerator.num_processes == world, (accelerator.num_processes, world)
    trainer.current_gradient_accumulation_steps = 1
    trainer.create_optimizer()
    wrapped, optimizer = accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped = wrapped
    wrapped.train()
    rank, per_rank = accelerator.process_index, ROWS // world
    inputs = {key: value[rank * per_rank:(rank + 1) * per_rank] if value.ndim else value
              for key, value in global_batch(scenario).items()}
    params = [p for p in accelerator.unwrap_model(wrapped).parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    loss = trainer.orthogonality_step(wrapped, inputs)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    optimizer.step()
    delta = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before)])
    record = trainer.pop_step_record()
    result = {"world": world, "rank": rank, "loss": float(loss), "grad": grads.tolist(), "delta": delta.tolist(),
              **{k: record.get(k) for k in ("s_cos", "l_orth", "aoc_lambda", "aoc_fired", "grad_norm_medical",
                                             "grad_norm_instruction", "grad_norm_penalty", "aoc_note")}}
    (Path(out_dir) / f"{name or scenario}_{world}_{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    accelerator.wait_for_everyone()


class ScriptedReward:
    """1.0 on every completion of a prompt in ``constant``, else 1, 0, 1, 0 ...; None off its capability."""

    def __init__(self, name: str, capability: str, constant: set[str]):
        self.name = self.__name__ = name
        self.capability, self.constant = capability, constant

    def __call__(self, prompts, completions, capability, log_extra, **_):
        scores = [None if c != self.capability else 1.0 if p in self.constant else float(i % 2 == 0)
                  for i, (p, c) in enumerate(zip(prompts, capability))]
        log_extra(f"success/{self.name}", [None if s is None else s == 1.0 for s in scores])  # TRL's hook
        return scores


# Groups of G=2 of the global batch; rank r holds groups 2r and 2r+1, so only rank 0 has the
# constant instruction group (w3 w4) and only rank 0 has something to resample.
RESAMPLING_GROUPS = ["w1 w2", "w3 w4", "w1 w2", "w5 w6"]


def _dynamic_sampling_step(out_dir: str) -> None:
    """One generation + scoring step with grpo.resample_constant_groups on (TRL's generation gathers)."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig

    from balancedbio.grpo import BalancedGRPOTrainer
    from balancedbio.weights import StaticWeights

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    capability = {"w1 w2": "medical", "w3 w4": "instruction", "w5 w6": "instruction", "w7 w8": "instruction"}
    dataset = Dataset.from_list([{"prompt": p, "capability": c, "answer": None} for p, c in capability.items()])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = GRPOConfig(output_dir=str(Path(out_dir) / "sampling"), per_device_train_batch_size=ROWS // world,
                      num_generations=2, beta=0.0, max_completion_length=4, loss_type="grpo", report_to=[],
                      use_cpu=True, bf16=False, logging_steps=1, max_steps=1)
    rewards = [ScriptedReward("accuracy", "medical", set()), ScriptedReward("instruction", "instruction", {"w3 w4"})]
    trainer = BalancedGRPOTrainer(model=LlamaForCausalLM(config), reward_funcs=rewards, args=args,
                                  train_dataset=dataset, processing_class=_tokenizer(),
                                  weight_controller=StaticWeights(["accuracy", "instruction"], [1.0, 1.0]),
                                  aoc_config={"mode": "off"})
    trainer.args.resample_constant_groups = 2
    accelerator = trainer.accelerator
    trainer.model_wrapped = accelerator.prepare(trainer.model)
    trainer.model_wrapped.train()
    rank, groups = accelerator.process_index, len(RESAMPLING_GROUPS) // world
    rows = [{"prompt": p, "capability": capability[p], "answer": None}
            for p in RESAMPLING_GROUPS[rank * groups:(rank + 1) * groups] for _ in range(2)]
    output = trainer._generate_and_score_completions(rows)
    record = trainer.pop_step_record()
    result = {"prompts": [row["prompt"] for row in rows], "advantages": output["advantages"].tolist(),
              **{k: record.get(k) for k in ("constant_groups_sampled", "groups_resampled", "constant_groups_kept",
                                             "batch_success_instruction", "batch_success_accuracy")}}
    (Path(out_dir) / f"sampling_{world}_{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    accelerator.wait_for_everyone()


def _run(tmp_path: Path, processes: int) -> dict[str, list[dict]]:
    from conftest import run_rank_workers

    out = tmp_path / f"processes_{processes}"
    out.mkdir()
    run_rank_workers(HERE, out, processes)
    return {scenario: [json.loads((out / f"{scenario}_{processes}_{rank}.json").read_text())
                       for rank in range(processes)] for scenario in (*AOC_RUNS, "sampling")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict[str, list[dict]]]:
    """Every scenario in one process and in two (one launch each: start-up dominates)."""
    tmp_path = tmp_path_factory.mktemp("aoc_ddp")
    return {processes: _run(tmp_path, processes) for processes in (1, 2)}


@pytest.mark.parametrize("scenario", AOC_RUNS)
def test_aoc_penalty_step_in_two_processes_matches_one(runs, scenario):
    import torch

    single, = runs[1][scenario]
    ranks = runs[2][scenario]
    assert single["aoc_fired"] is True and single["l_orth"] > 0  # tau = 0: the penalty acts
    assert single["grad_norm_penalty"] > 0.2 * float(torch.tensor(single["grad"]).norm())
    for result in ranks:
        # The global batch's cosine on every rank, and the same decision everywhere.
        assert result["s_cos"] == pytest.approx(single["s_cos"], abs=1e-4)
        assert result["aoc_fired"] is True
        assert result["l_orth"] == pytest.approx(single["l_orth"], rel=1e-3, abs=1e-7)
        assert result["aoc_lambda"] == pytest.approx(single["aoc_lambda"], rel=1e-3)
        assert result["grad_norm_medical"] == pytest.approx(single["grad_norm_medical"], rel=1e-4)
        assert result["grad_norm_penalty"] == pytest.approx(single["grad_norm_penalty"], rel=1e-3)
        grad, delta = torch.tensor(result["grad"]), torch.tensor(result["delta"])
        expected_grad, expected_delta = torch.tensor(single["grad"]), torch.tensor(single["delta"])
        # The applied update (DDP-averaged TRL loss + the penalty's surrogate) is the single-process one.
        assert torch.allclose(grad, expected_grad, rtol=1e-3, atol=1e-6), float((grad - expected_grad).abs().max())
        assert torch.allclose(delta, expected_delta, rtol=1e-3, atol=1e-7)
        assert float(delta.abs().max()) > 0
    assert ranks[0]["grad"] == ranks[1]["grad"]  # replicas stay identical


def test_dynamic_sampling_in_two_processes(runs):
    """Only rank 0 has a constant group: both ranks still draw in lockstep (no hang), and the
    counts and the controller's success rates are global."""
    single, = runs[1]["sampling"]
    ranks = runs[2]["sampling"]
    assert single["prompts"][2:4] != ["w3 w4", "w3 w4"]  # the constant group was replaced
    assert (single["constant_groups_sampled"], single["groups_resampled"], single["constant_groups_kept"]) == (1, 1, 0)
    assert ranks[0]["prompts"][2:] in (["w5 w6"] * 2, ["w7 w8"] * 2)
    assert ranks[1]["prompts"] == ["w1 w2", "w1 w2", "w5 w6", "w5 w6"]  # nothing to replace there
    for result in ranks:
        # Each of the 2 processes drew 1 group (as many as the process with the most constant ones).
        assert (result["constant_groups_sampled"], result["groups_resampled"], result["constant_groups_kept"]) == (1, 2, 0)
        # Every sampled instruction completion counts: 2 discarded passes + 1 of 2 in each kept group.
        assert result["batch_success_instruction"] == pytest.approx(single["batch_success_instruction"])
        assert result["batch_success_instruction"] == pytest.approx(4 / 6)
        assert result["batch_success_accuracy"] == pytest.approx(0.5)
        assert all(abs(a) > 0 for a in result["advantages"])  # every group now carries a gradient


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2])
