"""Faults and bad input (issue 17): kills, stale checkpoints, two trainers, broken files.

The kill tests run a real trainer (tests/fault_sft_job.py: run_sft on a 2-layer random Llama)
in a subprocess and SIGKILL it between checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balancedbio.checkpoints import CheckpointFolderBusy, hold_checkpoint_folder

JOB = Path(__file__).with_name("fault_sft_job.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def _start(workdir: Path, learning_rate: float, seconds_per_step: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, str(JOB), str(workdir), str(learning_rate), str(seconds_per_step)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _written_by(marker: Path, learning_rate: float) -> bool:
    try:
        return json.loads(marker.read_text())["fingerprint"]["settings"]["sft"]["learning_rate"] == learning_rate
    except (OSError, ValueError):
        return False


def _kill_after_checkpoint(job: subprocess.Popen, workdir: Path, step: int, learning_rate: float) -> None:
    """SIGKILL ``job`` once it has completely saved ``checkpoint-<step>`` itself (not an older run)."""
    marker = workdir / "checkpoints" / f"checkpoint-{step}" / ".complete"
    deadline = time.time() + 240
    while not _written_by(marker, learning_rate):
        assert job.poll() is None, (workdir / "job.log").read_text()[-3000:]
        assert time.time() < deadline, f"no checkpoint-{step} within 4 minutes"
        time.sleep(0.1)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (workdir / "out").exists(), "the job finished before it was killed"


def test_stale_checkpoint_is_not_resumed_and_a_second_trainer_is_refused(tmp_path):
    # 1. lr 1e-3, killed after checkpoint-2. While it runs, a second trainer may not claim the folder.
    first = _start(tmp_path, 1e-3, 0.2)
    lock = tmp_path / "checkpoints" / ".trainer.lock"
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "checkpoint-1" / ".complete").exists():
        assert first.poll() is None and time.time() < deadline, (tmp_path / "job.log").read_text()[-3000:]
        time.sleep(0.1)
    with pytest.raises(CheckpointFolderBusy, match=rf"in use by another trainer \(pid {first.pid}\)"):
        hold_checkpoint_folder(tmp_path / "checkpoints")
    assert lock.read_text().strip() == str(first.pid)
    _kill_after_checkpoint(first, tmp_path, 2, 1e-3)
    recorded = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / ".complete").read_text())
    assert recorded["fingerprint"]["settings"]["sft"]["learning_rate"] == 1e-3
    assert len(recorded["fingerprint"]["inputs"]["model"]) == 64  # a SHA-256 of the folder's bytes

    # 2. lr changed: the old checkpoints are not resumed; the log names the field. Killed again.
    second = _start(tmp_path, 2e-3, 0.2)
    _kill_after_checkpoint(second, tmp_path, 2, 2e-3)
    log = (tmp_path / "job.log").read_text()
    assert "not resuming from" in log and "settings.sft.learning_rate: 0.001 -> 0.002" in log
    assert "resuming SFT" not in log
    recorded = json.loads((tmp_path / "checkpoints" / "checkpoint-2" / ".complete").read_text())
    assert recorded["fingerprint"]["settings"]["sft"]["learning_rate"] == 2e-3

    # 3. Same settings again: resumes its own checkpoint-2 and finishes.
    third = _start(tmp_path, 2e-3, 0.0)
    assert third.wait(timeout=240) == 0, (tmp_path / "job.log").read_text()[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(tmp_path / "checkpoints" / "checkpoint-2")
    assert metrics["global_step"] == 6
    assert "resuming SFT from" in (tmp_path / "job.log").read_text()


def test_one_bad_byte_costs_its_line_not_the_ingest_dataset(tmp_path, caplog):
    from balancedbio.data.pipeline import ingest_dataset

    rows = [json.dumps({"question": f"Which organ {i}?", "options": ["Liver", "Pancreas"], "answer": 1}).encode()
            for i in range(6)]
    rows[3] = rows[3].replace(b"organ", b"org\xffan")
    path = tmp_path / "six.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    spec = {"name": "six", "source": str(path), "schema": "mcq"}
    with caplog.at_level("WARNING"):
        status = ingest_dataset(spec, tmp_path / "rows.jsonl", tmp_path / "status.json")
    assert status["status"] == "ok" and status["rows"] == 5 and status["malformed_rows"] == 1
    assert status["malformed_examples"] == [f"{path}:4: not valid UTF-8 (byte 0xff at column 24)"]
    assert f"{path}:4" in caplog.text
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 5


def test_a_failing_script_rule_writes_its_traceback_to_its_own_log(tmp_path):
    # The rule's script in a fresh interpreter, as Snakemake's `script:` runs it (the global
    # `snakemake` object is what Snakemake's preamble defines).
    script = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "ingest.py"
    log = tmp_path / "logs" / "ingest_gone.log"
    spec = {"name": "gone", "source": str(tmp_path / "missing.jsonl"), "schema": "mcq", "required": True}
    code = ("import runpy, types\n"
            f"sm = types.SimpleNamespace(log=[{str(log)!r}], params=types.SimpleNamespace(spec={spec!r}),"
            f" output=types.SimpleNamespace(rows={str(tmp_path / 'r.jsonl')!r}, status={str(tmp_path / 's.json')!r}))\n"
            f"runpy.run_path({str(script)!r}, init_globals={{'snakemake': sm}}, run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    text = log.read_text()
    assert "Traceback (most recent call last)" in text
    assert f"failed: DatasetUnavailable: dataset 'gone': local file '{spec['source']}' does not exist" in text


def test_gpu_lock_files_do_not_follow_planted_links_and_live_in_a_private_folder(tmp_path):
    from balancedbio.gpu_slots import claim

    lock_dir = tmp_path / "locks"
    gpus, handles = claim(1, total=1, lock_dir=lock_dir)
    assert gpus == [0] and (lock_dir.stat().st_mode & 0o777) == 0o700
    for handle in handles:
        handle.close()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (lock_dir / "gpu0.lock").unlink()
    (lock_dir / "gpu0.lock").symlink_to(victim)
    with pytest.raises(RuntimeError, match="is a symbolic link; refusing to follow it"):
        claim(1, total=1, lock_dir=lock_dir, timeout_s=0)
    assert victim.read_text() == "precious"
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(RuntimeError, match="must be a folder owned by you with mode 0700"):
        claim(1, total=1, lock_dir=shared, timeout_s=0)


def test_atomic_outputs_get_the_users_umask_not_owner_only(tmp_path):
    from balancedbio.io import atomic_dir, write_json

    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "result.json", {"ok": 1})
        with atomic_dir(tmp_path / "model") as folder:
            (folder / "weights").write_text("w")
    finally:
        os.umask(previous)
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_a_library_logging_a_huge_completion_is_cut_in_the_rule_log(tmp_path):
    import logging

    from balancedbio.logs import setup_logging

    log_file = tmp_path / "rule.log"
    setup_logging(log_file)
    try:
        from lm_eval.tasks.ifeval.instructions import ResponseLanguageChecker

        checker = ResponseLanguageChecker("task")
        checker.build_description(language="en")
        completion = "1234567890 " * 2_000  # 22 kB that langdetect cannot classify
        assert checker.check_following(completion)  # lm-eval counts it as followed, and logs the text
    finally:
        logging.shutdown()
        setup_logging(None)
    text = log_file.read_text()
    assert "Unable to detect language" in text and "more characters]" in text
    assert len(text) < 5_000


def test_a_torn_last_dynamics_line_is_dropped_with_a_warning_on_resume(tmp_path, caplog):
    from balancedbio.checkpoints import truncate_step_log as truncate_dynamics

    path = tmp_path / "dynamics.jsonl"
    lines = [json.dumps({"step": step, "loss": 0.1 * step}) for step in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 4, "lo', encoding="utf-8")  # killed mid-write
    with caplog.at_level("WARNING"):
        truncate_dynamics(path, last_step=2)
    assert path.read_text(encoding="utf-8") == lines[0] + "\n" + lines[1] + "\n"
    assert f"{path}:4: dropping a torn or malformed line" in caplog.text


def test_fingerprint_sees_changed_bytes_behind_an_unchanged_size_and_mtime(tmp_path):
    from balancedbio.checkpoints import fingerprint_differences, training_fingerprint

    model, data = tmp_path / "model", tmp_path / "data.jsonl"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x01" * 64)
    data.write_text('{"q": "a"}\n')
    settings = {"sft": {"learning_rate": 1e-4, "save_steps": 5, "logging_steps": 1}, "seed": 0}
    before = training_fingerprint(settings, {"model": model, "data": data})
    stat = (model / "model.safetensors").stat()
    (model / "model.safetensors").write_bytes(b"\x02" * 64)  # same size; mtime put back below
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # How often a run saves or logs does not change what it learns: not a reason to start over.
    later = {"sft": {"learning_rate": 1e-4, "save_steps": 1, "logging_steps": 10}, "seed": 0}
    after = training_fingerprint(later, {"model": model, "data": data})
    assert fingerprint_differences(before, after) == ["inputs.model: its contents changed"]
    assert fingerprint_differences(before, training_fingerprint(settings, {"model": tmp_path / "gone",
                                                                           "data": data}))
    assert fingerprint_differences(None, after) == ["the checkpoint records no fingerprint "
                                                    "(written by an older version)"]


def test_grpo_does_not_resume_a_checkpoint_of_other_settings_and_names_them(tmp_path, caplog):
    # Issue 17.1's case: a checkpoint of a run with another learning rate and AOC mode lies in
    # the folder; the rerun must start over (not "resuming full from checkpoint-2").
    from fault_sft_job import build_grpo_inputs

    from balancedbio.checkpoints import training_fingerprint
    from balancedbio.config import load_config
    from balancedbio.grpo import run_grpo
    from balancedbio.variants import variant_settings

    mcq, prompts = build_grpo_inputs(tmp_path)
    config = load_config(Path(__file__).resolve().parents[1] / ".test" / "config" / "config.yaml")
    settings = variant_settings(config, "no_prm")
    settings["grpo"].update(max_steps=1, save_steps=1, max_completion_length=4, rollout_weights="policy",
                            learning_rate=7.5e-5)
    inputs = {"model": tmp_path / "model", "mcq": mcq, "prompts": prompts, "prm": None}
    stale = tmp_path / "checkpoints" / "checkpoint-2"
    stale.mkdir(parents=True)
    # The marker CompletionMarker writes: the old run's fingerprint.
    (stale / ".complete").write_text(json.dumps({"step": 2, "fingerprint": training_fingerprint(settings, inputs)}))
    (tmp_path / "checkpoints" / "dynamics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')

    settings["grpo"]["learning_rate"] = 0.03
    settings["aoc"]["mode"] = "off"
    with caplog.at_level("INFO"):
        summary = run_grpo(model_dir=str(tmp_path / "model"), mcq_path=str(mcq), prompts_path=str(prompts),
                           prm_dir=None, out_dir=str(tmp_path / "out"), dynamics_path=str(tmp_path / "d.jsonl"),
                           checkpoint_dir=str(tmp_path / "checkpoints"), settings=settings)
    assert f"not resuming from {stale}" in caplog.text
    assert "settings.aoc.mode: 'penalty' -> 'off'" in caplog.text
    assert "settings.grpo.learning_rate: 7.5e-05 -> 0.03" in caplog.text
    assert "resuming no_prm" not in caplog.text
    assert summary["resumed_from"] is None and summary["global_step"] == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "d.jsonl").read_text().splitlines()] == [1]


# --- issue 24: NaN models, torn checkpoints, full disks, SIGTERM ------------------------------

def _start_job(workdir: Path, learning_rate, seconds_per_step: float, save_steps: int = 1,
               checkpoint_dir: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [sys.executable, str(JOB), str(workdir), str(learning_rate), str(seconds_per_step), str(save_steps)]
    if checkpoint_dir is not None:
        args.append(str(checkpoint_dir))
    with open(workdir / "stderr.txt", "ab") as stderr:  # the traceback's last line is the error
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def _job_log(workdir: Path) -> str:
    """The job's log file, then its stderr."""
    return "".join(path.read_text(errors="replace") for path in (workdir / "job.log", workdir / "stderr.txt")
                   if path.exists())


def test_a_non_finite_run_stops_before_saving_and_names_the_step(tmp_path):
    """lr=inf used to train to the end and save a model with 210 of 272 tensors NaN/Inf."""
    job = _start_job(tmp_path, "inf", 0.0)
    assert job.wait(timeout=300) != 0
    log = _job_log(tmp_path)
    assert "NonFiniteTraining: training stopped at step 1: the weight 'model." in log, log[-3000:]
    assert "is NaN or infinite; nothing of this step was saved" in log
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics.json").exists()
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*")), "no NaN checkpoint is written"


def test_a_nan_loss_in_the_log_stops_the_run_naming_the_step():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from balancedbio.checkpoints import CompletionMarker, NonFiniteTraining

    state = TrainerState()
    state.global_step = 7
    args = TrainingArguments(output_dir="/nonexistent/checkpoints", report_to=[])
    with pytest.raises(NonFiniteTraining, match=r"training stopped at step 7: the loss is nan"):
        CompletionMarker().on_log(args, state, TrainerControl(), logs={"loss": float("nan")})
    CompletionMarker().on_log(args, state, TrainerControl(), logs={"loss": 0.5, "grad_norm": 1.0})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_resumes_there(tmp_path, signum):
    """SLURM sends SIGTERM at the time limit (SIGUSR1 ahead of it with --signal); with save_steps
    100 the run used to die at once and lose every step since the start."""
    job = _start_job(tmp_path, 1e-3, 0.5, save_steps=100)
    progress = tmp_path / "progress"
    deadline = time.time() + 240
    while not (progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= 2):
        assert job.poll() is None and time.time() < deadline, _job_log(tmp_path)[-3000:]
        time.sleep(0.05)
    job.send_signal(signum)
    assert job.wait(timeout=120) == 128 + signum
    log = _job_log(tmp_path)
    saved = sorted((tmp_path / "checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / ".complete").exists(), log[-3000:]
    step = int(saved[0].name.split("-")[1])
    assert step >= 2
    assert f"{signal.Signals(signum).name} received: saved {saved[0]} at step {step} and stopped" in log
    assert not (tmp_path / "out").exists()

    rerun = _start_job(tmp_path, 1e-3, 0.0, save_steps=100)
    assert rerun.wait(timeout=300) == 0, _job_log(tmp_path)[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(saved[0]) and metrics["global_step"] == 6


def test_a_torn_file_in_the_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """optimizer.pt truncated inside a complete checkpoint used to fail every rerun with
    'PytorchStreamReader failed reading zip archive'."""
    job = _start_job(tmp_path, 1e-3, 0.3)
    _kill_after_checkpoint(job, tmp_path, 3, 1e-3)
    newest = tmp_path / "checkpoints" / "checkpoint-3"
    sizes = json.loads((newest / ".complete").read_text())["files"]
    assert sizes["optimizer.pt"] == (newest / "optimizer.pt").stat().st_size > 0
    torn = (newest / "optimizer.pt").read_bytes()
    (newest / "optimizer.pt").write_bytes(torn[: len(torn) // 2])

    rerun = _start_job(tmp_path, 1e-3, 0.0)
    assert rerun.wait(timeout=300) == 0, _job_log(tmp_path)[-3000:]
    log = (tmp_path / "job.log").read_text()
    skipped = [line for line in log.splitlines() if "skipping" in line and "checkpoint-3" in line]
    assert len(skipped) == 1 and f"optimizer.pt has {len(torn) // 2} bytes, {len(torn)} when it was saved" in skipped[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(tmp_path / "checkpoints" / "checkpoint-2")
    assert metrics["global_step"] == 6


def test_a_checkpoint_whose_marker_lists_no_sizes_is_still_checked_for_torn_archives(tmp_path, caplog):
    import torch

    from balancedbio.checkpoints import MARKER, last_complete_checkpoint

    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        torch.save({"state": torch.zeros(1000)}, folder / "optimizer.pt")
        (folder / MARKER).write_text(json.dumps({"step": step, "fingerprint": None}))  # an older marker
    data = (tmp_path / "checkpoint-2" / "optimizer.pt").read_bytes()
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(data[:-200])
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert "checkpoint-2: optimizer.pt does not open" in caplog.text
    assert not (tmp_path / "checkpoint-2").exists(), "the broken checkpoint is deleted"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a real full disk); skipped where mounting is not allowed."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (needs root): {done.stderr.strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_checkpoint_that_cannot_fit_stops_the_run_with_one_line(tmp_path, small_tmpfs):
    """Checkpoints on a full disk used to fail with 'RuntimeError: [enforce fail at
    inline_container.cc:672]' and leave half a checkpoint; now nothing is written."""
    (small_tmpfs / "filler").write_bytes(b"\0" * (1000 * 1024))  # ~24 kB left; a checkpoint needs more
    job = _start_job(tmp_path, 1e-3, 0.0, checkpoint_dir=small_tmpfs / "checkpoints")
    assert job.wait(timeout=300) != 0
    lines = [line for line in _job_log(tmp_path).splitlines() if line.startswith("balancedbio.io.DiskFullError:")]
    assert lines, _job_log(tmp_path)[-3000:]
    assert f"No space left in {small_tmpfs / 'checkpoints'}: checkpoint-1 needs about" in lines[0]
    assert "bytes" in lines[0] and "are free" in lines[0]
    assert not list((small_tmpfs / "checkpoints").glob("checkpoint-*"))
    assert not (tmp_path / "out").exists()


def test_a_save_that_fills_the_disk_midway_is_named_and_removed(small_tmpfs):
    """When the disk fills during a checkpoint save (the check before it did not foresee it): one
    error naming the folder and the bytes, and no half-written checkpoint left behind."""
    from balancedbio.checkpoints import disk_full_named
    from balancedbio.io import DiskFullError

    root = small_tmpfs / "checkpoints"
    (root / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(DiskFullError, match=rf"No space left in {root}: the write needs more than [\d,]+ bytes"):
        with disk_full_named(root):
            with open(root / "checkpoint-5" / "optimizer.pt", "wb") as handle:
                for _ in range(4096):
                    handle.write(b"\0" * 1024)  # 4 MiB into 1 MiB: a real ENOSPC
                    handle.flush()
    assert not (root / "checkpoint-5").exists()


def test_atomic_writes_on_a_full_disk_name_the_folder_and_keep_nothing(small_tmpfs):
    from balancedbio.io import DiskFullError, atomic_dir, write_json

    with pytest.raises(DiskFullError, match=rf"No space left in {small_tmpfs}: the write needs more than"):
        write_json(small_tmpfs / "big.json", {"text": "x" * (3 * 2**20)})
    with pytest.raises(DiskFullError, match=rf"No space left in {small_tmpfs}"):
        with atomic_dir(small_tmpfs / "model") as folder:
            (folder / "weights.bin").write_bytes(b"\0" * (3 * 2**20))
    assert list(small_tmpfs.iterdir()) == [], "nothing half-written is kept"
