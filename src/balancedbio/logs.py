"""Logging for workflow scripts: one log file per rule (Snakemake's ``log:``) plus stderr."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send the package's and the libraries' log records to ``log_file`` and stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)
    return logging.getLogger("balancedbio")


def setup_rule_logging(log_file: str | os.PathLike, level: int = logging.INFO) -> logging.Logger:
    """``setup_logging`` for a Snakemake ``script:`` rule, plus: an uncaught exception is logged.

    Snakemake tells the user to read the rule's log file, but a script's traceback would reach
    only the console; the hook writes it (with the exception's one-line message) to the log
    first. The process still exits non-zero.
    """
    logger = setup_logging(log_file, level)

    def log_uncaught(kind, error, traceback):
        if issubclass(kind, KeyboardInterrupt):
            logger.error("interrupted")
        else:
            logger.error("failed: %s: %s", kind.__name__, error, exc_info=(kind, error, traceback))
        logging.shutdown()  # flush the log file before the interpreter exits

    sys.excepthook = log_uncaught
    return logger
