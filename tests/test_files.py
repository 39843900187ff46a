"""minimodel.files.write_text_atomic: the old content or the new, never half, and no temporary file left."""
from __future__ import annotations

import os

import pytest

from minimodel.files import write_text_atomic


def test_writes_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "new" / "dir" / "stamp.json"
    assert write_text_atomic(path, "first") == path and path.read_text() == "first"
    write_text_atomic(path, "second")
    assert path.read_text() == "second" and os.listdir(path.parent) == ["stamp.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    write_text_atomic(path, "old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["manifest.json"]
