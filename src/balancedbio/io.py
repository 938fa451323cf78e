"""Atomic file and folder writes: an interrupted rule never leaves a half-written output, and
a full disk is said in one line naming the folder and the bytes it needed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def _umask() -> int:
    current = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(current)
    return current


def _chmod_as_created(path: str | os.PathLike, is_dir: bool) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the mode a plain create would have had."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


class DiskFullError(OSError):
    """No space left where an output is written; the message names the folder and the bytes."""


# What torch and its C++ streams say when a write fails for want of space (no errno reaches Python).
_WRITE_FAILED = ("file write failed", "failed writing file", "iostream error", "no space left")


def _bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:,.1f} MiB)"


def require_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise DiskFullError before writing ``what`` (about ``needed`` bytes) into ``folder``
    when its file system has less free."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DiskFullError(errno.ENOSPC, f"No space left in {folder}: {what} needs about {_bytes(needed)}, "
                                          f"{_bytes(free)} are free; free some space and rerun")


def disk_full(err: BaseException, folder: str | os.PathLike, written: int) -> DiskFullError | None:
    """A DiskFullError naming ``folder`` when ``err`` is a write that failed for want of space
    (``written`` bytes were written before it), else None."""
    if isinstance(err, DiskFullError):
        return None
    out_of_space = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    if not out_of_space and isinstance(err, Exception):  # torch and safetensors raise their own types
        message = str(err).lower()
        with contextlib.suppress(OSError):
            out_of_space = (any(s in message for s in _WRITE_FAILED)
                            and shutil.disk_usage(folder).free < max(written, 1 << 20))
    if not out_of_space:
        return None
    free = shutil.disk_usage(folder).free if Path(folder).exists() else 0
    return DiskFullError(errno.ENOSPC, f"No space left in {folder}: the write needs more than {_bytes(written)} "
                                       f"(written when the disk filled, now removed), {_bytes(free)} are free; "
                                       "free some space and rerun")


def _size_of(path: str | os.PathLike) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _chmod_as_created(tmp, is_dir=True)
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as err:
        written = _size_of(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(err, target.parent, written)
        if full is not None:
            raise full from err
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary sibling of ``target`` for writing; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    if "b" in mode:
        encoding = None
    try:
        _chmod_as_created(tmp_name, is_dir=False)
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException as err:
        written = _size_of(tmp_name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        full = disk_full(err, target.parent, written)
        if full is not None:
            raise full from err
        raise


def write_json(target: str | os.PathLike, obj: Any) -> None:
    with atomic_file(target) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False, sort_keys=False)
        handle.write("\n")


def write_jsonl(target: str | os.PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_file(target) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


class DataFormatError(ValueError):
    """A data file has a row that cannot be used; the message names the file and line."""


def decoded_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | DataFormatError]]:
    """(line number, text) for each line of a UTF-8 text file, decoded one line at a time.

    A line that is not valid UTF-8 comes as a DataFormatError naming file, line and column,
    so a caller can skip that one line or stop with a precise message.
    """
    path = Path(path)
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_number, DataFormatError(
                    f"{path}:{line_number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})")


def parse_json_line(path: str | os.PathLike, line_number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{line_number}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataFormatError(f"{path}:{line_number}: JSON nested too deeply") from None
    if not isinstance(row, dict):
        raise DataFormatError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file; a malformed line raises naming file and line."""
    for line_number, line in decoded_lines(path):
        if isinstance(line, DataFormatError):
            raise line
        if line.strip():
            yield parse_json_line(path, line_number, line)


def read_jsonl_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """All (line number, object) pairs of a JSONL file; an empty file or a bad line raises naming it."""
    rows = []
    for line_number, line in decoded_lines(path):
        if isinstance(line, DataFormatError):
            raise line
        if line.strip():
            rows.append((line_number, parse_json_line(path, line_number, line)))
    if not rows:
        raise DataFormatError(f"{path}: the file is empty (no JSON lines)")
    return rows


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (rules run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Lay out, write as PNG atomically (a killed job leaves no half-written figure) and close."""
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:  # a figure made with layout="constrained" keeps its own
        fig.tight_layout()
    with atomic_file(path, mode="wb", encoding=None) as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    plt.close(fig)
