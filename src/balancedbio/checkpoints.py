"""Resumable training: which checkpoint is safe to resume from.

A run killed while writing ``checkpoint-N`` leaves a folder that looks like a checkpoint but
lacks files; ``transformers.get_last_checkpoint`` would pick it and the resume would crash.
``CompletionMarker`` writes ``.complete`` into a checkpoint once the trainer has finished
saving it (``on_save`` runs after the whole save), and only marked folders are resumed from.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)

MARKER = ".complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CompletionMarker(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / MARKER).touch()


def last_complete_checkpoint(root: str | Path) -> str | None:
    root = Path(root)
    if not root.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name))), reverse=True)
    for step, folder in found:
        if (folder / MARKER).exists():
            return str(folder)
        log.warning("ignoring %s: it was not completely written (the run stopped while saving)", folder)
    return None
