"""Resumable training: which checkpoint is safe to resume from, and who may write the folder.

A run killed while writing ``checkpoint-N`` leaves a folder that looks like a checkpoint but
lacks files; ``transformers.get_last_checkpoint`` would pick it and the resume would crash.
``CompletionMarker`` writes ``.complete`` into a checkpoint once the trainer has finished
saving it (``on_save`` runs after the whole save), and only marked folders are resumed from.

The marker also records the run's *fingerprint* (``training_fingerprint``): the settings that
shape training, a SHA-256 of every input file and of every file in the input model folders,
and the package versions. A checkpoint is resumed only when its fingerprint equals the
current one; otherwise the stale checkpoints are deleted and training starts over, and the
log says which field differs. Whole-file digests (not sizes and mtimes, which a copy or a
re-run of an upstream rule can keep while changing the bytes) cost a few seconds per GB once
per job start, small against the training they protect.

The marker lists every file of the checkpoint with its size. A checkpoint whose files do not
match (a file torn by a full disk or a copy) or do not open (a torch zip archive without its
directory, a safetensors file without its header) is skipped with one log line and deleted,
and the previous complete checkpoint is resumed instead.

``CompletionMarker`` also guards the run it marks (every trainer attaches it):

- a non-finite loss or trainable weight stops training before anything of that step is saved,
  the error naming the step (``NonFiniteTraining``);
- before each save it checks the checkpoint fits on the disk (the previous checkpoint's size,
  else the weights' and Adam's), and stops with one line naming the folder and the bytes
  needed (``balancedbio.io.DiskFullError``) instead of writing half a checkpoint;
- SIGTERM (SLURM's time limit) and SIGUSR1 (SLURM's ``--signal`` warning) save a checkpoint at
  the next step boundary and exit non-zero (128 + the signal's number) with a message; the
  rerun resumes from that checkpoint.

``last_complete_checkpoint`` also claims the checkpoint folder for this process with an OS lock
(``fcntl.flock`` on ``.trainer.lock``), held until the process ends: a second trainer on the
same folder (say an orphan left by a killed Snakemake master) fails at once instead of mixing
its checkpoints and logs with the first one's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any, Mapping

from transformers import TrainerCallback

log = logging.getLogger(__name__)

MARKER = ".complete"
LOCK_FILE = ".trainer.lock"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings that change when or how often a run logs or saves, never what it learns.
NON_SHAPING_KEYS = frozenset({"save_steps", "logging_steps", "save_total_limit"})
_VERSIONED = ("balancedbio", "transformers", "trl", "peft", "torch")


class CheckpointFolderBusy(RuntimeError):
    """Another live process trains into the same checkpoint folder."""


class NonFiniteTraining(FloatingPointError):
    """The loss or a trainable weight became NaN or infinite; nothing of that step was saved."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed (a model's weights never sit in memory twice)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def path_digest(path: str | os.PathLike | None) -> str | None:
    """Digest of a file, or of a folder: every file's relative path and bytes, in sorted order."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return f"missing:{path}"
    digest = hashlib.sha256()
    for member in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(member.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file_digest(member).encode() + b"\n")
    return digest.hexdigest()


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for dist in _VERSIONED:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    from balancedbio import __version__

    found["balancedbio"] = found["balancedbio"] or __version__
    return found


def _shaping(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _shaping(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                if k not in NON_SHAPING_KEYS}
    if isinstance(value, (list, tuple)):
        return [_shaping(v) for v in value]
    return value


def training_fingerprint(settings: Mapping[str, Any], inputs: Mapping[str, str | os.PathLike | None]) -> dict:
    """What a checkpoint must match to be resumed: settings, input digests, package versions.

    ``inputs`` maps a name (``model``, ``data``...) to a file or folder; ``None`` (an input the
    run does not use) is recorded as such.
    """
    return {"settings": json.loads(json.dumps(_shaping(settings), default=str)),
            "inputs": {name: path_digest(p) for name, p in sorted(inputs.items())},
            "versions": _versions()}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def fingerprint_differences(recorded: Any, current: dict) -> list[str]:
    """One line per differing field, e.g. ``settings.grpo.learning_rate: 0.0001 -> 0.03``."""
    if not isinstance(recorded, dict):
        return ["the checkpoint records no fingerprint (written by an older version)"]
    old, new = _flatten(recorded), _flatten(current)
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            if key.startswith("inputs."):
                lines.append(f"{key}: its contents changed")
            else:
                lines.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return lines


class CompletionMarker(TrainerCallback):
    """Marks each fully saved checkpoint (fingerprint and file sizes) and guards the run that
    writes them: non-finite loss or weights, a full disk, SIGTERM / SIGUSR1 (module docstring)."""

    def __init__(self, fingerprint: dict | None = None, *, stop_signals: tuple = STOP_SIGNALS):
        self.fingerprint = fingerprint
        self.stop_signals = stop_signals
        self.signalled: int | None = None  # the stop signal received, until the run stops
        self._previous_handlers: dict[int, Any] = {}

    # -- SIGTERM / SIGUSR1: checkpoint at the next step boundary, then exit non-zero ------------
    def _on_signal(self, signum, frame):
        self.signalled = signum  # only a flag: the step in progress finishes first

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            for signum in self.stop_signals:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _stop_requested(self, args) -> int | None:
        """The signal any rank received (all ranks must stop at the same step)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.signalled
        import torch

        flag = torch.tensor([self.signalled or 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    # -- the guards before each save --------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteTraining(f"training stopped at step {state.global_step}: the {key} is {value}; "
                                        f"nothing of this step was saved ({_last_saved(args)}). Lower the "
                                        "learning rate or check the data.")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            bad = non_finite_weight(model)
            if bad:
                raise NonFiniteTraining(f"training stopped at step {state.global_step}: the weight '{bad}' is NaN "
                                        f"or infinite; nothing of this step was saved ({_last_saved(args)}). "
                                        "Lower the learning rate or check the data.")
        signalled = self._stop_requested(args)
        if signalled:
            self.signalled = signalled
            control.should_save = True
            control.should_training_stop = True
        if control.should_save:
            from balancedbio.io import require_free_space

            require_free_space(args.output_dir, checkpoint_bytes(args.output_dir, model),
                               f"checkpoint-{state.global_step}")
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            from balancedbio.io import write_json

            files = {p.relative_to(folder).as_posix(): p.stat().st_size
                     for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
            write_json(folder / MARKER, {"step": state.global_step, "fingerprint": self.fingerprint,
                                         "files": files})
        if self.signalled:
            name = signal.Signals(self.signalled).name
            log.error("%s received: saved %s at step %d and stopped; rerun to resume from there", name, folder,
                      state.global_step)
            raise SystemExit(128 + self.signalled)


@contextlib.contextmanager
def disk_full_named(root: str | os.PathLike):
    """Around ``trainer.train``: a checkpoint save that fails for want of space (which the check
    before each save did not foresee) becomes one DiskFullError line naming ``root``, and the
    half-written checkpoint is deleted."""
    from balancedbio.io import _size_of, disk_full

    try:
        yield
    except Exception as err:
        partial = [folder for _, folder in _checkpoints(Path(root)) if not (folder / MARKER).exists()]
        full = disk_full(err, root, sum(_size_of(folder) for folder in partial))
        if full is None:
            raise
        for folder in partial:
            _delete(folder)
        raise full from err


def _last_saved(args) -> str:
    saved = next((folder for _, folder in _checkpoints(Path(args.output_dir)) if (folder / MARKER).exists()), None)
    return f"the last checkpoint, {saved.name}, is kept" if saved else "no checkpoint was saved"


def non_finite_weight(model) -> str | None:
    """The name of the first trainable weight holding NaN or Inf, or None (one sync, not one per tensor)."""
    import torch

    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.numel()]
    if not params:
        return None
    # A sum is NaN or infinite when any element is (the weights are far below overflow).
    sums = torch.stack([torch.sum(p.detach(), dtype=torch.float32) for _, p in params])
    if bool(torch.isfinite(sums).all()):
        return None
    return next(name for (name, _), total in zip(params, sums.tolist()) if not math.isfinite(total))


def checkpoint_bytes(root: str | os.PathLike, model=None) -> int:
    """About what the next checkpoint under ``root`` takes: the newest complete one's size, else
    the model's weights (the trainable ones only, for an adapter) and Adam's two moments."""
    for _, folder in _checkpoints(Path(root)):
        marker = _read_marker(folder)
        if isinstance(marker, dict) and isinstance(marker.get("files"), dict):
            return sum(int(size) for size in marker["files"].values())
    if model is None:
        return 0
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    saved = trainable if hasattr(model, "peft_config") else sum(p.numel() * p.element_size()
                                                               for p in model.parameters())
    return saved + 2 * trainable


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder under ``root``, newest first."""
    if not root.is_dir():
        return []
    return sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name))), reverse=True)


def checkpoint_problem(folder: Path, marker: Any) -> str | None:
    """Why ``folder`` cannot be resumed from though marked complete, or None: a file the marker
    lists is missing or has another size, or a weights / state file does not open."""
    recorded = marker.get("files") if isinstance(marker, dict) else None
    if isinstance(recorded, dict):
        for name, size in recorded.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} when it was saved (a torn file)"
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".pt", ".pth", ".bin") and path.is_file():
            try:
                with zipfile.ZipFile(path) as archive:  # torch.save's format; reads the directory only
                    archive.namelist()
            except (zipfile.BadZipFile, OSError) as err:
                return f"{path.name} does not open ({err})"
        elif path.suffix == ".safetensors" and path.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="np"):
                    pass
            except Exception as err:  # safetensors raises its own error types
                return f"{path.name} does not open ({err})"
    return None


def _read_marker(folder: Path) -> Any:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8") or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# Lock files this process holds, by checkpoint folder: kept open (locked) until the process ends.
_HELD: dict[str, int] = {}


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def hold_checkpoint_folder(root: str | os.PathLike) -> None:
    """Lock ``root`` for this process until it exits; raise CheckpointFolderBusy if another holds it.

    Only the main process of a multi-process launch locks (its ranks share the folder).
    """
    if not _is_main_process():
        return
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / LOCK_FILE
    key = str(root.resolve())
    held = _HELD.get(key)
    if held is not None:
        try:
            same = os.fstat(held).st_ino == os.stat(lock_path, follow_symlinks=False).st_ino
        except FileNotFoundError:  # the folder was removed after a finished run
            same = False
        if same:
            return
        os.close(_HELD.pop(key))
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise CheckpointFolderBusy(
            f"checkpoint folder '{root}' is in use by another trainer (pid {owner}); it may be an orphan of "
            f"a killed workflow. Wait for it to finish or kill it (kill {owner}), then rerun.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def last_complete_checkpoint(root: str | os.PathLike, fingerprint: dict | None = None) -> str | None:
    """The newest fully saved checkpoint under ``root`` that may be resumed, or None.

    Claims ``root`` for this process first (see ``hold_checkpoint_folder``). With a
    ``fingerprint``, a checkpoint written under other settings or inputs is not resumed: every
    checkpoint under ``root`` is deleted (they all belong to that stale run) and the log names
    the fields that differ.
    """
    root = Path(root)
    hold_checkpoint_folder(root)
    found = _checkpoints(root)
    for step, folder in found:
        if not (folder / MARKER).exists():
            log.warning("deleting %s: it was not completely written (the run stopped while saving)", folder)
            _delete(folder)
            continue
        marker = _read_marker(folder)
        differences = [] if fingerprint is None else fingerprint_differences(
            marker.get("fingerprint") if isinstance(marker, dict) else None, fingerprint)
        if not differences:
            problem = checkpoint_problem(folder, marker)
            if problem is None:
                return str(folder)
            log.warning("skipping %s: %s; deleting it and resuming from the previous complete checkpoint",
                        folder, problem)
            _delete(folder)
            continue
        log.warning("not resuming from %s: it was written by a different run (%s); starting over and deleting "
                    "its checkpoints", folder, "; ".join(differences[:8]) + (" ..." if len(differences) > 8 else ""))
        for _, stale in found:
            _delete(stale)
        return None
    return None


def _delete(folder: Path) -> None:
    if _is_main_process():
        shutil.rmtree(folder, ignore_errors=True)


def truncate_step_log(path: str | os.PathLike, last_step: int) -> None:
    """Keep the JSON lines of ``path`` up to ``last_step`` (those past it will be recomputed).

    A line that is not valid JSON (the last one, torn by a kill mid-write) is dropped with a
    warning naming file and line instead of failing the resume.
    """
    from balancedbio.io import atomic_file

    path = Path(path)
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            log.warning("%s:%d: dropping a torn or malformed line (the run was killed while writing it): %.80r",
                        path, number, line)
            continue
        if step <= last_step:
            kept.append(line)
    with atomic_file(path) as handle:
        handle.write("".join(line + "\n" for line in kept))
