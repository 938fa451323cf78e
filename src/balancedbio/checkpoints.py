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

``last_complete_checkpoint`` also claims the checkpoint folder for this process with an OS lock
(``fcntl.flock`` on ``.trainer.lock``), held until the process ends: a second trainer on the
same folder (say an orphan left by a killed Snakemake master) fails at once instead of mixing
its checkpoints and logs with the first one's.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
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
    """Marks each fully saved checkpoint, recording the fingerprint of the run that wrote it."""

    def __init__(self, fingerprint: dict | None = None):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                from balancedbio.io import write_json

                write_json(folder / MARKER, {"step": state.global_step, "fingerprint": self.fingerprint})


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
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name))), reverse=True)
    for step, folder in found:
        if not (folder / MARKER).exists():
            log.warning("ignoring %s: it was not completely written (the run stopped while saving)", folder)
            continue
        if fingerprint is None:
            return str(folder)
        marker = _read_marker(folder)
        differences = fingerprint_differences(marker.get("fingerprint") if isinstance(marker, dict) else None,
                                              fingerprint)
        if not differences:
            return str(folder)
        log.warning("not resuming from %s: it was written by a different run (%s); starting over and deleting "
                    "its checkpoints", folder, "; ".join(differences[:8]) + (" ..." if len(differences) > 8 else ""))
        if _is_main_process():
            for _, stale in found:
                shutil.rmtree(stale, ignore_errors=True)
        return None
    return None


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
