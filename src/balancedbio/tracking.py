"""Experiment tracking of the trainers: transformers' ``report_to`` (config ``logging.report_to``),
with TensorBoard's event files kept beside the stage's outputs.

transformers 5 has no ``logging_dir`` argument: its TensorBoard callback writes under
``output_dir/runs/``, and ``output_dir`` is the checkpoint folder that a finished stage deletes.
``keep_tensorboard_events`` points the callback at ``<stage folder>/tensorboard/<launch>/``
instead, so ``tensorboard --logdir results`` shows every stage and variant, one run per launch.
"""

from __future__ import annotations

import os
from pathlib import Path


def tensorboard_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """``results/sft/checkpoints`` -> ``results/sft/tensorboard``: the folder that outlives a stage."""
    return Path(checkpoint_dir).parent / "tensorboard"


def keep_tensorboard_events(trainer, checkpoint_dir: str | os.PathLike) -> Path | None:
    """Send the trainer's TensorBoard events to ``tensorboard_dir(checkpoint_dir)/<time>_<host>``.

    Returns that folder, or None when the trainer does not report to TensorBoard. A folder named
    by TENSORBOARD_LOGGING_DIR (transformers' own setting) is left as the user chose it.
    """
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
    if not callbacks:
        return None
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return Path(callbacks[0].logging_dir)
    folder = tensorboard_dir(checkpoint_dir) / Path(default_logdir()).name
    for callback in callbacks:
        callback.logging_dir = str(folder)
    return folder
