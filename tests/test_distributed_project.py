"""AOC's update under data parallel and gradient accumulation, for real: 2 CPU processes (gloo) vs 1.

``python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed_project.py --worker OUT``
builds ``BalancedGRPOTrainer`` on a tiny Llama in every process, wraps it in DDP through the
trainer's accelerator, gives each rank its half of one fixed global batch (``test_distributed``)
in ``GA`` micro-batches (the non-final ones under ``no_sync``, as HF's loop does) and runs the
trainer's own AOC step and a real SGD step. The tests compare each run's update with the
1-process, GA = 1 update of the same rows: ``project`` mode (PCGrad, GradVac), and the penalty
with GA = 2 in one and in two processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

# name: (aoc settings, gradient accumulation steps)
CASES = {
    "pcgrad": ({"mode": "project", "projection": "pcgrad"}, 1),
    "gradvac": ({"mode": "project", "projection": "gradvac", "gradvac_beta": 0.5}, 1),
    "penalty_ga1": ({"mode": "penalty", "lambda": 30.0, "lambda_scaling": "constant"}, 1),
    "penalty_ga2": ({"mode": "penalty", "lambda": 30.0, "lambda_scaling": "constant"}, 2),
    "pcgrad_ga2": ({"mode": "project", "projection": "pcgrad"}, 2),
}


def conflicting_batch() -> dict:
    """The mixed global batch with the instruction rows' advantages negated: on this model and
    batch S_cos is then negative, so PCGrad and GradVac do change the update."""
    from test_distributed import global_batch

    inputs = global_batch("mixed")
    inputs["advantages"] = inputs["advantages"].where(inputs["is_medical"], -inputs["advantages"])
    return inputs


def _case(out_dir: str, name: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig

    from balancedbio.grpo import BalancedGRPOTrainer
    from balancedbio.rewards import AccuracyReward, InstructionReward
    from balancedbio.weights import PIDWeights
    from test_distributed import ROWS, VOCAB, _tokenizer

    aoc, accumulation = CASES[name]
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights in every process
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    dataset = Dataset.from_list([{"prompt": "w1 w2", "capability": "medical", "answer": "A"},
                                 {"prompt": "w3 w4", "capability": "instruction", "answer": None}])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = ROWS // world // accumulation
    args = GRPOConfig(output_dir=str(Path(out_dir) / name), per_device_train_batch_size=rows, num_generations=2,
                      gradient_accumulation_steps=accumulation, beta=0.0, max_completion_length=4,
                      loss_type="grpo", report_to=[], use_cpu=True, bf16=False, optim="sgd", learning_rate=0.1,
                      lr_scheduler_type="constant", max_steps=1)
    trainer = BalancedGRPOTrainer(model=LlamaForCausalLM(config), reward_funcs=[AccuracyReward(), InstructionReward()],
                                  args=args, train_dataset=dataset, processing_class=_tokenizer(),
                                  weight_controller=PIDWeights(["accuracy", "instruction"]),
                                  aoc_config={"tau": 0.0, "penalty_gradient": "finite_difference", **aoc})
    accelerator = trainer.accelerator
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.create_optimizer()
    wrapped, optimizer = accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped = wrapped
    wrapped.train()
    rank = accelerator.process_index
    batch = conflicting_batch()
    params = [p for p in accelerator.unwrap_model(wrapped).parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    for micro in range(accumulation):  # this rank's rows, GA micro-batches of them in order
        start = (rank * accumulation + micro) * rows
        inputs = {key: value[start:start + rows] if value.ndim else value for key, value in batch.items()}
        last = micro == accumulation - 1
        accelerator.gradient_state._set_sync_gradients(last)
        with accelerator.no_sync(wrapped) if not last else contextlib.nullcontext():
            trainer.orthogonality_step(wrapped, inputs)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    optimizer.step()
    delta = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before)])
    record = trainer.pop_step_record()
    result = {"grad": grads.tolist(), "delta": delta.tolist(),
              **{k: record.get(k) for k in ("s_cos", "l_orth", "aoc_fired", "projection_weights")}}
    (Path(out_dir) / f"{name}_{world}_{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    accelerator.wait_for_everyone()


def worker(out_dir: str) -> None:
    import torch

    for name in CASES:
        _case(out_dir, name)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _run(tmp_path: Path, processes: int) -> dict[str, list[dict]]:
    from conftest import run_rank_workers

    out = tmp_path / f"processes_{processes}"
    out.mkdir()
    run_rank_workers(HERE, out, processes)
    return {name: [json.loads((out / f"{name}_{processes}_{rank}.json").read_text()) for rank in range(processes)]
            for name in CASES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict[str, list[dict]]]:
    tmp_path = tmp_path_factory.mktemp("aoc_project")
    return {processes: _run(tmp_path, processes) for processes in (1, 2)}


def _assert_same_update(result: dict, expected: dict) -> None:
    import torch

    grad, delta = torch.tensor(result["grad"]), torch.tensor(result["delta"])
    expected_grad, expected_delta = torch.tensor(expected["grad"]), torch.tensor(expected["delta"])
    assert torch.allclose(grad, expected_grad, rtol=1e-3, atol=1e-6), float((grad - expected_grad).abs().max())
    assert torch.allclose(delta, expected_delta, rtol=1e-3, atol=1e-7)
    assert float(delta.abs().max()) > 0


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_projection_in_two_processes_matches_one(runs, method):
    import torch

    single, = runs[1][method]
    assert single["s_cos"] < 0  # the gradients conflict: the projection acts
    a, b = single["projection_weights"]
    assert abs(a - 1) + abs(b - 1) > 1e-3
    # ... and it moves the update away from plain g_R + g_I (the monitor-like update of the same rows)
    plain = torch.tensor(runs[1]["penalty_ga1"][0]["grad"])  # penalty run: g_R + g_I + g_orth, differs too
    assert not torch.allclose(torch.tensor(single["grad"]), plain, rtol=1e-3, atol=1e-6)
    for result in runs[2][method]:
        assert result["s_cos"] == pytest.approx(single["s_cos"], abs=1e-4)
        assert result["projection_weights"] == pytest.approx(single["projection_weights"], rel=1e-3, abs=1e-5)
        _assert_same_update(result, single)
    assert runs[2][method][0]["grad"] == runs[2][method][1]["grad"]  # replicas stay identical


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("mode", ["penalty", "pcgrad"])
def test_two_accumulation_steps_give_the_one_step_update(runs, processes, mode):
    """S_cos and the penalty/projection are taken once per optimizer step, from the window's
    gradients: GA = 2 applies the GA = 1 update of the same rows (not one penalty per micro-batch)."""
    reference, = runs[1]["penalty_ga1" if mode == "penalty" else "pcgrad"]
    if mode == "penalty":
        assert reference["aoc_fired"] is True and reference["l_orth"] > 0
    for result in runs[processes][f"{mode}_ga2"]:
        assert result["s_cos"] == pytest.approx(reference["s_cos"], abs=1e-4)
        assert result["l_orth"] == pytest.approx(reference["l_orth"], rel=1e-3, abs=1e-7)
        _assert_same_update(result, reference)


def test_aoc_decides_once_per_optimizer_step_in_the_real_training_loop(tmp_path):
    """HF's own loop with GA = 2 (it sets sync_gradients on the window's last micro-batch): one
    S_cos and one penalty per optimizer step, not one per micro-batch."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig

    from balancedbio.grpo import BalancedGRPOTrainer
    from balancedbio.weights import StaticWeights
    from test_distributed import VOCAB, ScriptedReward, _tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    dataset = Dataset.from_list([{"prompt": f"w{i} w{i + 1}", "capability": "medical" if i % 2 else "instruction",
                                  "answer": None} for i in range(3, 20)])
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                      num_generations=2, beta=0.0, max_completion_length=4, report_to=[], use_cpu=True, bf16=False,
                      max_steps=2, logging_steps=1, save_strategy="no")
    rewards = [ScriptedReward("accuracy", "medical", set()), ScriptedReward("instruction", "instruction", set())]
    trainer = BalancedGRPOTrainer(model=LlamaForCausalLM(config), reward_funcs=rewards, args=args,
                                  train_dataset=dataset, processing_class=_tokenizer(),
                                  weight_controller=StaticWeights(["accuracy", "instruction"], [1.0, 1.0]),
                                  aoc_config={"mode": "penalty", "tau": 0.0})
    decisions, micro_batches = [], []
    correction, step = trainer._aoc_correction, trainer.orthogonality_step

    def count_decisions(*args, **kwargs):
        decisions.append(trainer.state.global_step)
        return correction(*args, **kwargs)

    def count_micro_batches(*args, **kwargs):
        micro_batches.append(trainer.state.global_step)
        return step(*args, **kwargs)

    trainer._aoc_correction, trainer.orthogonality_step = count_decisions, count_micro_batches
    trainer.train()
    assert micro_batches == [0, 0, 1, 1] and decisions == [0, 1]
    fired = [row for row in trainer.state.log_history if "aoc/fired" in row]
    assert len(fired) == 2 and all(row["aoc/fired"] == 1 for row in fired)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2])
