"""BalancedGRPOTrainer's AOC step on a tiny random Llama: the real trainer code, no generation."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from balancedbio.aoc import Projector, gradient_cosine  # noqa: E402
from balancedbio.grpo import BalancedGRPOTrainer  # noqa: E402
from balancedbio.rewards import AccuracyReward, InstructionReward  # noqa: E402
from balancedbio.weights import PIDWeights, StaticWeights  # noqa: E402

VOCAB = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(29)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def make_trainer(tmp_path, mode: str, controller=None, advantage_aggregation=None, grpo_args=None,
                 **aoc) -> BalancedGRPOTrainer:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = LlamaForCausalLM(config)
    dataset = Dataset.from_list([
        {"prompt": "w1 w2", "capability": "medical", "answer": "A"},
        {"prompt": "w3 w4", "capability": "instruction", "answer": None},
    ])
    args = GRPOConfig(output_dir=str(tmp_path / mode), per_device_train_batch_size=4, num_generations=2,
                      beta=0.0, max_completion_length=4, loss_type="grpo", use_cpu=True, logging_steps=1,
                      # fp32: these tests check the passes' arithmetic exactly (TRL defaults to bf16 autocast,
                      # under which monitor/project run; their agreement with fp32 is test_aoc_probes' and the bench's).
                      **{"report_to": [], "bf16": False, **(grpo_args or {})})
    trainer = BalancedGRPOTrainer(model=model, reward_funcs=[AccuracyReward(), InstructionReward()], args=args,
                                  train_dataset=dataset, processing_class=_tokenizer(),
                                  weight_controller=controller or PIDWeights(["accuracy", "instruction"]),
                                  advantage_aggregation=advantage_aggregation,
                                  aoc_config={"mode": mode, "tau": 0.0, "lambda": 0.6,
                                              "lambda_scaling": "constant", **aoc})
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop in a real run
    trainer.model.train()
    return trainer


def batch(advantages=(1.0, -0.4, 0.7, -0.2)) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "prompt_ids": torch.randint(3, len(VOCAB), (4, 3), generator=generator),
        "prompt_mask": torch.ones(4, 3, dtype=torch.long),
        "completion_ids": torch.randint(3, len(VOCAB), (4, 5), generator=generator),
        "completion_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
        "advantages": torch.tensor(advantages),
        "is_medical": torch.tensor([True, True, False, False]),
        "num_items_in_batch": torch.tensor(13.0),
    }


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters() if p.requires_grad]


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads if g is not None])


def _reference(trainer, inputs):
    """Per-capability gradients and the full-batch gradient, computed independently.

    In fp32 like AOC's own gradients (TRL's GRPOConfig defaults to bf16 autocast)."""
    from balancedbio.grpo import _fp32_forward

    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    with _fp32_forward(trainer, model):
        loss_r, loss_i = trainer.capability_losses(model, inputs)
        g_r = torch.autograd.grad(loss_r, params)
        g_i = torch.autograd.grad(loss_i, params)
        full = trainer._compute_loss(model, inputs)
        g_full = torch.autograd.grad(full, params)
    return loss_r, loss_i, full, g_r, g_i, g_full


def test_capability_losses_sum_to_the_trl_loss(tmp_path):
    trainer = make_trainer(tmp_path, "monitor")
    loss_r, loss_i, full, g_r, g_i, g_full = _reference(trainer, batch())
    assert float(loss_r + loss_i) == pytest.approx(float(full), rel=1e-5, abs=1e-7)
    assert torch.allclose(_flat(g_r) + _flat(g_i), _flat(g_full), rtol=1e-3, atol=1e-4)


def test_monitor_logs_the_cosine_and_leaves_trl_update_untouched(tmp_path):
    trainer = make_trainer(tmp_path, "monitor")
    inputs = batch()
    _, _, _, g_r, g_i, g_full = _reference(trainer, inputs)
    trainer.model.zero_grad()
    trainer.orthogonality_step(trainer.model, inputs)
    record = trainer.pop_step_record()
    expected = float(torch.nn.functional.cosine_similarity(_flat(g_r), _flat(g_i), dim=0))
    assert record["s_cos"] == pytest.approx(expected, rel=1e-4)
    assert record["l_orth"] == 0.0
    assert torch.allclose(_flat(_grads(trainer.model)), _flat(g_full), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("how", ["exact", "finite_difference"])
def test_penalty_changes_the_update(tmp_path, how):
    monitor, penalty = make_trainer(tmp_path, "monitor"), make_trainer(tmp_path, "penalty", penalty_gradient=how)
    for trainer in (monitor, penalty):
        trainer.model.zero_grad()
        trainer.orthogonality_step(trainer.model, batch())
    record = penalty.pop_step_record()
    assert record["l_orth"] == pytest.approx(0.6 * record["s_cos"] ** 2, rel=1e-4)
    difference = _flat(_grads(penalty.model)) - _flat(_grads(monitor.model))
    assert float(difference.norm()) > 1e-6 * float(_flat(_grads(monitor.model)).norm())
    # The penalty's gradient pushes |S_cos| down: a small step along it lowers S_cos^2.
    params = [p for p in penalty.model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, d in zip(params, torch.split(difference, [p.numel() for p in params])):
            p -= 1e-2 / float(difference.norm()) * d.view_as(p)
    loss_r, loss_i = penalty.capability_losses(penalty.model, batch())
    cos_after = gradient_cosine(torch.autograd.grad(loss_r, params), torch.autograd.grad(loss_i, params))
    assert abs(float(cos_after)) < abs(record["s_cos"])


@pytest.mark.parametrize("mode", ["monitor", "penalty"])
def test_chunked_capability_passes_give_the_whole_batch_update(tmp_path, mode):
    """aoc.micro_batch_rows bounds memory only: one row at a time gives the one-pass S_cos and update."""
    results = []
    for rows in (None, 1):
        trainer = make_trainer(tmp_path / str(rows), mode, micro_batch_rows=rows)
        trainer.model.zero_grad()
        trainer.orthogonality_step(trainer.model, batch())
        results.append((trainer.pop_step_record(), _flat(_grads(trainer.model)), len(trainer._capability_parts[0])))
    (whole, whole_grad, whole_chunks), (chunked, chunked_grad, chunked_chunks) = results
    assert (whole_chunks, chunked_chunks) == (1, 2)  # two medical rows: one pass vs two
    assert chunked["s_cos"] == pytest.approx(whole["s_cos"], rel=1e-4, abs=1e-6)
    assert chunked["l_orth"] == pytest.approx(whole["l_orth"], rel=1e-4, abs=1e-8)
    assert torch.allclose(chunked_grad, whole_grad, rtol=1e-3, atol=1e-6)
    if mode == "penalty":
        assert chunked["aoc_fired"] and chunked["l_orth"] > 0


def test_project_applies_pcgrad_to_the_two_gradients(tmp_path):
    trainer = make_trainer(tmp_path, "project", projection="pcgrad")
    inputs = batch()
    _, _, _, g_r, g_i, _ = _reference(trainer, inputs)
    trainer.model.zero_grad()
    trainer.orthogonality_step(trainer.model, inputs)
    expected = _flat(Projector("pcgrad").combine(list(g_r), list(g_i)))
    got = _flat(_grads(trainer.model))
    assert torch.allclose(got, expected, atol=1e-6)
    assert float(got @ _flat(g_r)) >= -1e-7 and float(got @ _flat(g_i)) >= -1e-7


def test_zero_advantage_capability_makes_the_cosine_undefined(tmp_path):
    trainer = make_trainer(tmp_path, "penalty")
    trainer.orthogonality_step(trainer.model, batch(advantages=(1.0, -1.0, 0.0, 0.0)))
    record = trainer.pop_step_record()
    assert math.isnan(record["s_cos"]) and record["l_orth"] == 0.0
    assert "instruction" in record["aoc_note"]


def test_reward_weights_follow_the_controller(tmp_path):
    trainer = make_trainer(tmp_path, "off")
    rates_before = list(trainer.weight_controller.weights)
    # What _calculate_rewards does after TRL scored the batch (the functions reported through log_extra):
    trainer.model.train()
    from unittest import mock

    def scored(*args):
        trainer._log_completion_extra("success/accuracy", [False, False, True, False])  # accuracy 25 %
        trainer._log_completion_extra("success/instruction", [True, True, True, None])  # instruction 100 %
        return torch.zeros(4, 2)

    with mock.patch("trl.GRPOTrainer._calculate_rewards", side_effect=scored):
        trainer._calculate_rewards([{}] * 4, ["p"] * 4, ["c"] * 4, [[1]] * 4)
    assert rates_before == [1.0, 1.0]
    assert float(trainer.reward_weights[0]) > 1.0 > float(trainer.reward_weights[1])
    record = trainer.pop_step_record()
    assert record["batch_success_accuracy"] == 0.25 and record["batch_success_instruction"] == 1.0


def test_finite_difference_penalty_gradient_matches_the_double_backward(tmp_path):
    updates = {}
    for how in ("exact", "finite_difference"):
        monitor, penalty = make_trainer(tmp_path, "monitor"), make_trainer(tmp_path, "penalty", penalty_gradient=how)
        for trainer in (monitor, penalty):
            trainer.model.zero_grad()
            trainer.orthogonality_step(trainer.model, batch())
        updates[how] = _flat(_grads(penalty.model)) - _flat(_grads(monitor.model))
    exact, approx = updates["exact"], updates["finite_difference"]
    # A forward difference in float32: agreement to within a few percent, measured 0.985 here.
    assert float(torch.nn.functional.cosine_similarity(exact, approx, dim=0)) > 0.95
    assert float(approx.norm()) == pytest.approx(float(exact.norm()), rel=0.1)


# -- eq. 11 advantages ------------------------------------------------------------------------
NAN = float("nan")
# One medical prompt (accuracy only) and one instruction prompt (instruction only), G = 2.
GROUP_REWARDS = torch.tensor([[1.0, NAN], [0.0, NAN], [NAN, 1.0], [NAN, 0.5]])


def _scored_step(tmp_path, aggregation: str, w_inst: float, rewards=GROUP_REWARDS):
    """A real generation + scoring step of the tiny model (rewards fixed), then both capabilities' gradients."""
    from unittest import mock

    controller = StaticWeights(["accuracy", "instruction"], [1.0, w_inst])
    trainer = make_trainer(tmp_path, "off", controller=controller, advantage_aggregation=aggregation)
    rows = [dict(trainer.train_dataset[i]) for i in (0, 0, 1, 1)]
    torch.manual_seed(3)  # the same completions in every call
    with mock.patch("trl.GRPOTrainer._calculate_rewards", return_value=rewards.clone()):
        output = trainer._generate_and_score_completions(rows)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    norms = {}
    for name, mask in (("medical", output["is_medical"]), ("instruction", ~output["is_medical"])):
        part = {k: v[mask] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 4 else v
                for k, v in output.items()}
        grads = torch.autograd.grad(trainer._compute_loss(trainer.model, part), params, allow_unused=True)
        norms[name] = float(_flat([g for g in grads if g is not None]).norm())
    share = norms["instruction"] / (norms["medical"] + norms["instruction"])
    return output, share, trainer.pop_step_record()


def test_weighted_components_advantages_by_hand(tmp_path):
    output, _, record = _scored_step(tmp_path, "weighted_components", 10.0)
    # accuracy [1, 0] centred +-0.5, batch std 0.5; instruction [1, 0.5] centred +-0.25, std 0.25.
    assert output["advantages"].tolist() == pytest.approx([1.0, -1.0, 10.0, -10.0])
    assert record["update_share_instruction"] == pytest.approx(20 / 22)
    # The counterfactual of the same batch at equal weights: A = [1, -1, 1, -1].
    assert record["update_share_instruction_equal_weights"] == pytest.approx(0.5)


def test_raising_w_inst_raises_the_instruction_share_only_under_eq_11(tmp_path):
    shares = {(agg, w): _scored_step(tmp_path, agg, w)[1]
              for agg in ("weighted_components", "sum_then_normalize") for w in (1.0, 10.0)}
    # Eq. 11: w_inst 1 -> 10 multiplies the instruction rows' advantages, hence their gradient, by 10.
    low, high = shares[("weighted_components", 1.0)], shares[("weighted_components", 10.0)]
    assert high > low + 0.2
    assert high / (1 - high) == pytest.approx(10 * low / (1 - low), rel=1e-3)
    # TRL's sum_then_normalize group-normalises R_total: the instruction group only carries R_inst,
    # so w_inst cancels inside it and the share does not move (the reason eq. 11 is the default);
    # only TRL's +1e-4 in the std denominator differs (measured: 0.53711 vs 0.53711, 1.4e-5 apart).
    assert shares[("sum_then_normalize", 10.0)] == pytest.approx(shares[("sum_then_normalize", 1.0)], rel=1e-3)


def test_std_floor_keeps_a_nearly_constant_component_small():
    from balancedbio.grpo import weighted_component_advantages

    rewards = torch.tensor([[1.0, NAN], [0.0, NAN], [NAN, 0.50], [NAN, 0.51]])
    advantages = weighted_component_advantages(rewards, torch.tensor([1.0, 1.0]), 2, std_floor=0.1)
    # The instruction spread (+-0.005) is divided by the floor 0.1, not by its own std (-> +-1).
    assert advantages.tolist() == pytest.approx([1.0, -1.0, -0.05, 0.05])
    unscorable = weighted_component_advantages(torch.tensor([[NAN, NAN], [NAN, NAN]]), torch.ones(2), 2, 0.1)
    assert unscorable.tolist() == [0.0, 0.0]


def test_weighted_advantages_keep_this_process_rows(tmp_path):
    """Under data parallel TRL gathers the rewards of all processes; each keeps its own contiguous slice."""
    from unittest import mock

    from balancedbio.grpo import weighted_component_advantages

    both = torch.cat([GROUP_REWARDS, torch.tensor([[0.0, NAN], [1.0, NAN], [NAN, 0.0], [NAN, 1.0]])])
    trainer = make_trainer(tmp_path, "off", controller=StaticWeights(["accuracy", "instruction"], [1.0, 2.0]))
    rows = [dict(trainer.train_dataset[i]) for i in (0, 0, 1, 1)]
    with mock.patch("trl.GRPOTrainer._calculate_rewards", return_value=both.clone()), \
            mock.patch.object(type(trainer.accelerator), "process_index", new_callable=mock.PropertyMock,
                              return_value=1):
        output = trainer._generate_and_score_completions(rows)
    expected = weighted_component_advantages(both, torch.tensor([1.0, 2.0]), 2, 0.1)[4:]
    assert output["advantages"].tolist() == pytest.approx(expected.tolist())


# -- dynamic sampling of constant groups --------------------------------------------------------
class ScriptedReward:
    """A plain reward callable for one capability: 1.0 on every completion of a prompt in ``constant``
    (a group without variance), else 1, 0, 1, 0 ... (a group of 2 with variance); None elsewhere. Like
    any TRL reward function it keeps no state: success goes to TRL's log_extra, a count to log_metric."""

    def __init__(self, name: str, capability: str, constant: set[str]):
        self.name = self.__name__ = name
        self.capability, self.constant = capability, constant

    def __call__(self, prompts, completions, capability, log_extra, log_metric, **_):
        scores = [None if c != self.capability else 1.0 if p in self.constant else float(i % 2 == 0)
                  for i, (p, c) in enumerate(zip(prompts, capability))]
        log_extra(f"success/{self.name}", [None if s is None else s == 1.0 for s in scores])
        log_metric(f"{self.name}_calls", 1.0)
        return scores


def _resampling_trainer(tmp_path, rounds: int):
    trainer = make_trainer(tmp_path, "off", controller=StaticWeights(["accuracy", "instruction"], [1.0, 1.0]))
    trainer.reward_funcs = [ScriptedReward("accuracy", "medical", set()),
                            ScriptedReward("instruction", "instruction", {"w3 w4"})]
    trainer.train_dataset = Dataset.from_list([
        {"prompt": "w1 w2", "capability": "medical", "answer": "A"},
        {"prompt": "w3 w4", "capability": "instruction", "answer": None},   # always the same reward
        {"prompt": "w5 w6", "capability": "instruction", "answer": None},   # rewards that vary
    ])
    trainer.args.resample_constant_groups = rounds
    return trainer


def test_dynamic_sampling_replaces_a_constant_group_and_counts_what_it_discarded(tmp_path):
    trainer = _resampling_trainer(tmp_path, rounds=2)
    rows = [dict(trainer.train_dataset[i]) for i in (0, 0, 1, 1)]
    from unittest import mock

    with mock.patch.object(trainer, "_log_metric", wraps=trainer._log_metric) as log_metric:
        output = trainer._generate_and_score_completions(rows)
    record = trainer.pop_step_record()
    # The constant instruction group (w3 w4) was replaced by the only other instruction prompt, in place.
    assert [row["prompt"] for row in rows] == ["w1 w2", "w1 w2", "w5 w6", "w5 w6"]
    assert record["constant_groups_sampled"] == 1 and record["groups_resampled"] == 1
    assert record["constant_groups_kept"] == 0
    # Both capabilities now carry a policy gradient: S_cos is defined on this step.
    advantages = output["advantages"]
    assert float(advantages[2:].abs().sum()) > 0 and float(advantages[:2].abs().sum()) > 0
    assert 0 < record["update_share_instruction"] < 1
    # The controller's rate counts every sampled instruction completion: the discarded group's two
    # successes and the kept group's one of two -> 3/4 (the kept rows alone would say 1/2).
    assert record["batch_success_instruction"] == pytest.approx(0.75)
    # The checking calls stayed out of TRL's metrics: one scoring of the final batch per reward function.
    assert [c.args[0] for c in log_metric.call_args_list] == ["accuracy_calls", "instruction_calls"]


def test_without_dynamic_sampling_the_constant_group_stays(tmp_path):
    trainer = _resampling_trainer(tmp_path, rounds=0)
    rows = [dict(trainer.train_dataset[i]) for i in (0, 0, 1, 1)]
    output = trainer._generate_and_score_completions(rows)
    record = trainer.pop_step_record()
    assert [row["prompt"] for row in rows] == ["w1 w2", "w1 w2", "w3 w4", "w3 w4"]
    assert "groups_resampled" not in record
    assert output["advantages"][2:].tolist() == [0.0, 0.0]
    assert record["update_share_instruction"] == 0.0


def test_dynamic_sampling_keeps_a_group_no_draw_could_fix(tmp_path):
    trainer = _resampling_trainer(tmp_path, rounds=2)
    trainer.reward_funcs[1].constant = {"w3 w4", "w5 w6"}  # every instruction prompt is constant
    rows = [dict(trainer.train_dataset[i]) for i in (0, 0, 1, 1)]
    trainer._generate_and_score_completions(rows)
    record = trainer.pop_step_record()
    assert record["groups_resampled"] == 2 and record["constant_groups_kept"] == 1
    assert [row["prompt"] for row in rows][2:] == ["w3 w4", "w3 w4"]  # not swapped for another constant one
    # The rate counts the two discarded candidate groups as well: 6 of 6 instruction completions passed.
    assert record["batch_success_instruction"] == pytest.approx(1.0)


# -- the method's signals in TRL's metrics: every tracker, the log history, dynamics.jsonl ------------
def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_training_run_sends_weights_success_and_s_cos_to_tensorboard_and_the_dynamics(tmp_path):
    from balancedbio.grpo import dynamics_rows
    from balancedbio.tracking import keep_tensorboard_events

    # A real 2-step run of the tiny model; AOC in monitor mode measures S_cos on every step, and both
    # groups' rewards vary (1, 0), so it is defined.
    trainer = make_trainer(tmp_path / "run", "monitor", grpo_args={"report_to": ["tensorboard"], "max_steps": 2})
    trainer.reward_funcs = [ScriptedReward("accuracy", "medical", set()),
                            ScriptedReward("instruction", "instruction", set())]
    folder = keep_tensorboard_events(trainer, tmp_path / "run" / "checkpoints")
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    scalars = _scalars(folder)
    for tag in ("weights/accuracy", "weights/instruction", "success/accuracy", "success/instruction",
                "success/batch_accuracy", "aoc/s_cos", "aoc/l_orth", "aoc/fired",
                "weights/update_share_instruction", "weights/update_share_instruction_equal_weights"):
        assert [step for step, _ in scalars[f"train/{tag}"]] == [1, 2], tag
        assert [value for _, value in scalars[f"train/{tag}"]] == pytest.approx([e[tag] for e in logged]), tag
    # One success of two per capability and batch: S_k = 0.5 both, so the PID weights stay at 1.
    assert [e["success/batch_instruction"] for e in logged] == [0.5, 0.5]
    assert all(-1.0 <= e["aoc/s_cos"] <= 1.0 and e["aoc/fired"] == 0.0 for e in logged)  # monitor never fires

    rows = dynamics_rows(trainer.state.log_history, ["accuracy", "instruction"])
    assert [row["step"] for row in rows] == [1, 2]
    for row, entry in zip(rows, logged):
        assert row["s_cos"] == entry["aoc/s_cos"] and row["aoc_fired"] is False and row["l_orth"] == 0.0
        assert row["weight_accuracy"] == entry["weights/accuracy"] == 1.0
        assert row["success_instruction"] == entry["success/instruction"]
        assert row["batch_success_accuracy"] == 0.5 and row["reward_accuracy"] == entry["rewards/accuracy/mean"]
        assert row["entropy"] == entry["entropy"] and row["loss"] == entry["loss"] and "kl" not in row  # beta 0
        assert row["update_share_instruction"] == entry["weights/update_share_instruction"]


def test_signals_survive_trl_averaging_and_come_back_under_their_old_names():
    from collections import defaultdict

    from balancedbio.grpo.signals import dynamics_rows, flush_signals, metric_key, record_name

    names = ["weight_accuracy", "error_reasoning", "success_instruction", "batch_success_accuracy", "s_cos",
             "l_orth", "aoc_lambda", "aoc_fired", "aoc_note", "grad_norm_medical", "update_share_instruction",
             "update_share_instruction_equal_weights", "constant_groups_sampled", "groups_resampled"]
    assert [record_name(metric_key(name)) for name in names] == names
    assert record_name("sampling/importance_sampling_ratio/min") is None and record_name("kl") is None
    metrics, text = defaultdict(list), {}
    # Two steps of one logging window: S_cos undefined on the first (NaN) must not drag the second.
    flush_signals({"s_cos": math.nan, "aoc_fired": False, "batch_success_reasoning": None,
                   "aoc_note": "single capability", "constant_groups_sampled": 3}, metrics, text)
    flush_signals({"s_cos": -0.25, "aoc_fired": True, "batch_success_reasoning": None,
                   "projection_weights": [0.75, 1.0], "constant_groups_sampled": 1}, metrics, text)
    assert text == {"aoc/note": "single capability"}
    # What TRL's GRPOTrainer.log does with each list: the mean of the non-NaN values, None when none.
    averaged = {key: (sum(v for v in values if not math.isnan(v)) / n if (n := sum(not math.isnan(v) for v in values))
                      else None) for key, values in metrics.items()}
    assert averaged["aoc/s_cos"] == -0.25 and averaged["success/batch_reasoning"] is None
    assert metrics["aoc/s_cos"] == [-0.25]  # an undefined S_cos is left out, not handed to the trackers
    row, = dynamics_rows([{"loss": 0.5, "step": 2, "epoch": 1.0, **averaged, **text}], ["reasoning"])
    assert row == {"step": 2, "epoch": 1.0, "loss": 0.5, "s_cos": -0.25, "aoc_fired": True, "l_orth": None,
                   "batch_success_reasoning": None, "aoc_note": "single capability", "constant_groups_sampled": 2,
                   "projection_weights": [0.75, 1.0]}


# -- rewards without hidden state ---------------------------------------------------------------
def test_real_rewards_report_success_through_trls_hook_and_the_controller_reads_it(tmp_path):
    """AccuracyReward and InstructionReward on real completions, called by TRL's own _calculate_rewards."""
    from balancedbio.rewards import RewardResult

    trainer = make_trainer(tmp_path, "off")
    medical = {"prompt": "w1 w2", "capability": "medical", "answer": "B", "options": {"A": "x", "B": "y"},
               "instruction_id_list": [], "kwargs": [], "prompt_text": None}
    instruction = {"prompt": "w3 w4", "capability": "instruction", "answer": None, "options": None,
                   "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "prompt_text": "Say hi."}
    inputs = [medical, medical, instruction, instruction]
    completions = ["The answer is B.", "The answer is A.", "hi there", "hi, there"]
    accuracy = trainer.reward_funcs[0]
    result = accuracy.evaluate(["w1 w2"] * 4, completions, **{k: [row[k] for row in inputs] for k in medical})
    assert result == RewardResult([1.0, 0.0, None, None], [True, False, None, None], {"not_applicable": 2})
    assert not vars(accuracy).keys() - {"__name__", "nli", "nli_threshold"}  # nothing kept from the call
    trainer.model.train()
    rewards = trainer._calculate_rewards(inputs, [row["prompt"] for row in inputs], completions, [[3]] * 4)
    assert rewards[:, 0].tolist()[:2] == [1.0, 0.0] and rewards[:, 1].tolist()[2:] == [1.0, 0.0]
    record = trainer.pop_step_record()
    assert record["batch_success_accuracy"] == 0.5 and record["batch_success_instruction"] == 0.5
    # TRL's completions table gets the flags; its metrics the counters (half the rows: not applicable).
    assert list(trainer._pending_extra_logs["success/instruction"]) == [None, None, True, False]
    assert trainer._pending_metrics["rewards/instruction/not_applicable"] == [0.5]
