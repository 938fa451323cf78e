"""Atomic writes and JSONL reading with file:line errors."""

from __future__ import annotations

import pytest

from balancedbio.io import DataFormatError, atomic_dir, atomic_file, read_jsonl, write_jsonl


def test_failed_atomic_dir_leaves_previous_output_untouched(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "no partial folder may remain"


def test_failed_atomic_file_leaves_no_file(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(ValueError):
        with atomic_file(target) as handle:
            handle.write("{")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_jsonl_roundtrip_and_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, [{"a": 1}, {"a": "é"}]) == 2
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": "é"}]
    path.write_text('{"a": 1}\n\n{"a": \n[1, 2]\n')
    with pytest.raises(DataFormatError, match=rf"{path}:3: not valid JSON"):
        list(read_jsonl(path))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataFormatError, match=rf"{path}:2: expected a JSON object, got list"):
        list(read_jsonl(path))


def test_save_figure_writes_a_png_atomically(tmp_path):
    from balancedbio.io import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    target = tmp_path / "figures" / "line.png"
    save_figure(fig, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in target.parent.iterdir()] == ["line.png"], "no temporary file left behind"
    assert not plt.get_fignums(), "the figure is closed"


def test_a_non_utf8_line_is_named_by_file_line_and_byte(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": "caf\xe9"}\n')
    rows = read_jsonl(path)
    assert next(rows) == {"a": 1} and next(rows) == {"a": 2}  # the lines before the bad one still read
    with pytest.raises(DataFormatError, match=rf"{path}:3: not valid UTF-8 \(byte 0xe9 at column 11\)"):
        next(rows)


def test_an_empty_file_is_named_when_rows_are_required(tmp_path):
    from balancedbio.io import read_jsonl_rows

    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataFormatError, match=rf"{path}: the file is empty"):
        read_jsonl_rows(path)
