"""Logging for workflow scripts: one log file per rule (Snakemake's ``log:``) plus stderr."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


MAX_LOGGED_ARGUMENT_CHARS = 300


def _shorten(value, limit: int):
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}... [{len(value) - limit} more characters]"
    return value


class ShortenLongValues(logging.Filter):
    """Cut long strings in log records (a library logging a whole 1 MB completion, as lm-eval's
    IFEval language check does when detection fails), keeping the start and saying how much went."""

    def __init__(self, limit: int = MAX_LOGGED_ARGUMENT_CHARS):
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_shorten(arg, self.limit) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _shorten(v, self.limit) for k, v in record.args.items()}
        if not record.args and isinstance(record.msg, str):
            record.msg = _shorten(record.msg, 10 * self.limit)
        return True


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send the package's and the libraries' log records to ``log_file`` and stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    for handler in handlers:
        handler.addFilter(ShortenLongValues())
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
