"""SFT and GRPO for real on the smoke workflow's outputs: dynamics, weights, kill-and-resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from balancedbio.grpo import variant_settings
from balancedbio.variants import grpo_recipe
from balancedbio.weights import build_weight_controller

pytestmark = pytest.mark.slow

DYNAMICS_FIELDS = {"step", "loss", "reward", "kl", "clip_fraction", "completion_length", "step_seconds",
                   "s_cos", "l_orth", "reward_accuracy", "reward_instruction", "reward_reasoning",
                   "success_accuracy", "success_reasoning", "success_instruction",
                   "weight_accuracy", "weight_reasoning", "weight_instruction"}
NAMES = ["accuracy", "reasoning", "instruction"]
TEST_CONFIG_PATH = Path(__file__).resolve().parents[1] / ".test" / "config" / "config.yaml"


def _dynamics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_trains_on_assistant_turns_and_saves_a_plain_model(smoke_workdir):
    metrics = json.loads((smoke_workdir / "results" / "sft" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["lora"] is True
    assert metrics["first_logged_loss"] > 0
    model_dir = smoke_workdir / "results" / "models" / "sft"
    assert (model_dir / "model.safetensors").is_file() and not (model_dir / "adapter_config.json").exists()
    assert (smoke_workdir / "results" / "sft" / "loss.png").stat().st_size > 1000
    assert not (smoke_workdir / "results" / "sft" / "checkpoints").exists()


def test_grpo_full_logs_every_field_and_pid_weights_follow_the_success_rates(smoke_workdir, smoke_config):
    rows = _dynamics(smoke_workdir / "results" / "grpo_full" / "dynamics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert DYNAMICS_FIELDS <= set(row), DYNAMICS_FIELDS - set(row)
        assert row["s_cos"] is None or -1.0 <= row["s_cos"] <= 1.0
    # Replaying the logged batch success rates through a fresh controller gives the logged weights.
    controller = build_weight_controller(smoke_config["weights"], NAMES)
    for row in rows:
        expected = controller.update([row[f"batch_success_{n}"] for n in NAMES])
        assert [row[f"weight_{n}"] for n in NAMES] == pytest.approx(expected)
    summary = json.loads((smoke_workdir / "results" / "models" / "grpo_full" / "balancedbio_training.json")
                         .read_text())
    assert summary["global_step"] == 2 and summary["settings"]["aoc"]["mode"] == "penalty"
    assert (smoke_workdir / "results" / "grpo_full" / "dynamics.png").stat().st_size > 1000
    # The GRPO job's TensorBoard events (logging.report_to in the smoke config) hold the method's signals.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((smoke_workdir / "results" / "grpo_full" / "tensorboard").iterdir())))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in NAMES:
        assert {f"train/weights/{name}", f"train/success/{name}", f"train/success/batch_{name}"} <= tags, tags
        assert [e.value for e in events.Scalars(f"train/weights/{name}")] == \
            pytest.approx([row[f"weight_{name}"] for row in rows])
    # S_cos is a scalar on every step it is defined, and the smoke's instruction prompts (constraints a
    # 16-token answer meets or misses by chance) make it defined on at least one step.
    defined = [row["s_cos"] for row in rows if row["s_cos"] is not None]
    assert defined, "S_cos undefined on every smoke step"
    assert "train/aoc/s_cos" in tags, tags
    assert [e.value for e in events.Scalars("train/aoc/s_cos")] == pytest.approx(defined, abs=1e-6)
    # The recipe the rule wrote and ran: the variant's settings, a record beside its results.
    recipe = yaml.safe_load((smoke_workdir / "results" / "grpo_full" / "recipe.yaml").read_text())
    assert recipe["variant"] == "full" and recipe["aoc_mode"] == "penalty"
    assert recipe["dynamics"] == "results/grpo_full/dynamics.jsonl"
    assert (smoke_workdir / "logs" / "grpo_full.log").is_file()
    assert (smoke_workdir / "benchmarks" / "grpo_full.tsv").is_file()


def test_static_weights_variant_keeps_the_weights(smoke_workdir):
    rows = _dynamics(smoke_workdir / "results" / "grpo_static_weights" / "dynamics.jsonl")
    assert rows and all(row[f"weight_{n}"] == 1.0 for row in rows for n in NAMES)


def test_killed_grpo_resumes_from_its_last_checkpoint(smoke_workdir, smoke_config, tmp_path):
    settings = variant_settings(smoke_config, "full")
    settings["grpo"].update(max_steps=4, save_steps=1)
    results = smoke_workdir / "results"
    checkpoints, out, dynamics = tmp_path / "checkpoints", tmp_path / "model", tmp_path / "dynamics.jsonl"
    # The recipe the workflow writes for this variant, run by the command the rule runs.
    recipe = grpo_recipe(settings, {"model": str(results / "models" / "sft"),
                                    "mcq": str(results / "data" / "clean" / "mcq_train.jsonl"),
                                    "prompts": str(results / "data" / "clean" / "prompts.jsonl"),
                                    "prm": str(results / "models" / "prm"), "out": str(out),
                                    "dynamics": str(dynamics), "checkpoints": str(checkpoints)})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    cmd = [sys.executable, "-m", "balancedbio", "train", "grpo", "--config", str(tmp_path / "recipe.yaml")]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not (checkpoints / "checkpoint-2" / ".complete").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint-2 within 10 minutes"
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists(), "the first run finished before it was killed"
    # The newest completely written checkpoint (a later one may have been cut mid-save).
    marker = sorted(checkpoints.glob("checkpoint-*/.complete"), key=lambda p: int(p.parent.name.split("-")[1]))[-1]
    saved = marker.parent / "balancedbio_state.json"
    resume_step = int(saved.parent.name.split("-")[1])
    state = json.loads(saved.read_text())["weights"]

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resuming full from {saved.parent}" in second.stderr
    rows = _dynamics(dynamics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    at_resume = next(r for r in rows if r["step"] == resume_step)
    assert [at_resume[f"weight_{n}"] for n in NAMES] == pytest.approx(state["weights"])
    summary = json.loads((out / "balancedbio_training.json").read_text())
    assert summary["global_step"] == 4 and summary["resumed_from"] == str(saved.parent)
    assert not checkpoints.exists()


def test_smoke_run_evaluates_each_model_on_each_benchmark(smoke_workdir):
    for model in ("base", "grpo_full"):
        for benchmark in ("mmlu_med", "ifeval", "ifbench", "kg_mcq"):
            result = json.loads((smoke_workdir / "results" / "eval" / model / f"{benchmark}.json").read_text())
            assert result["status"] in {"ok", "skipped"}
            if result["status"] == "ok":
                assert result["n"] > 0 and result["metrics"]
                items = (smoke_workdir / "results" / "eval" / model / f"{benchmark}.items.jsonl").read_text()
                assert len(items.splitlines()) == result["n"]
    kg = json.loads((smoke_workdir / "results" / "eval" / "base" / "kg_mcq.json").read_text())
    assert kg["status"] == "ok" and kg["n"] == 6
    skipped = json.loads((smoke_workdir / "results" / "eval" / "skipped.json").read_text())
    assert isinstance(skipped, list)


def test_a_resumed_run_keeps_the_dynamics_of_the_steps_before_its_checkpoint(tmp_path, caplog):
    """dynamics.jsonl comes from the trainer's log history, which checkpoints carry: a run that dies after
    checkpoint-1 and is started again writes steps 1 and 2, step 1 as the first attempt logged it."""
    from fault_sft_job import build_grpo_inputs
    from transformers import TrainerCallback

    from balancedbio.config import load_config
    from balancedbio.grpo import run_grpo

    class DieAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt("killed after checkpoint-1")

    mcq, prompts = build_grpo_inputs(tmp_path)
    settings = variant_settings(load_config(TEST_CONFIG_PATH), "no_prm")
    settings["grpo"].update(max_steps=2, save_steps=1, max_completion_length=4, rollout_weights="policy")
    settings["aoc"]["mode"] = "monitor"
    paths = dict(model_dir=str(tmp_path / "model"), mcq_path=str(mcq), prompts_path=str(prompts), prm_dir=None,
                 out_dir=str(tmp_path / "out"), dynamics_path=str(tmp_path / "dynamics.jsonl"),
                 checkpoint_dir=str(tmp_path / "checkpoints"), settings=settings)
    with pytest.raises(KeyboardInterrupt):
        run_grpo(**paths, callbacks=[DieAtStep2()])
    saved = json.loads((tmp_path / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())
    first_attempt = [entry for entry in saved["log_history"] if "loss" in entry]
    assert not (tmp_path / "dynamics.jsonl").exists()
    with caplog.at_level("INFO"):
        summary = run_grpo(**paths)
    assert summary["resumed_from"] == str(tmp_path / "checkpoints" / "checkpoint-1")
    rows = _dynamics(tmp_path / "dynamics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["weight_accuracy"] == first_attempt[0]["weights/accuracy"]
    assert rows[0]["loss"] == first_attempt[0]["loss"] and rows[0]["s_cos"] == first_attempt[0].get("aoc/s_cos")
    assert rows[1]["success_instruction"] is not None and rows[1]["aoc_fired"] is False
