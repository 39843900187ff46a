"""minimodel.files: the old content or the new, never half, and no temporary file left; stat signatures that see
every file a stage reads."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from minimodel import files
from minimodel.files import replace_dir, stat_signature, write_text_atomic


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


def _tree(root, text):
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f.txt").write_text(text)
    return root


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_swaps_in_the_new_directory_and_leaves_nothing_else(tmp_path, monkeypatch, exchange):
    if not exchange:  # a filesystem without renameat2's exchange (NFS): the two-rename path
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    final = _tree(tmp_path / "final", "old")
    replace_dir(_tree(tmp_path / ".final.partial", "new"), final)
    assert (final / "sub" / "f.txt").read_text() == "new" and os.listdir(tmp_path) == ["final"]


def test_replace_dir_puts_the_old_directory_back_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    """It was left under .final.old-<pid> (nothing there restores it): `final` gone, a checkpoint's `latest`
    naming nothing."""
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    final = _tree(tmp_path / "final", "old")
    real_replace = os.replace

    def fail_second(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="cross-device"):
        replace_dir(_tree(tmp_path / ".final.partial", "new"), final)
    assert (final / "sub" / "f.txt").read_text() == "old"


def test_stat_signature_follows_linked_directories_and_ends_on_a_loop(tmp_path):
    """A corpus directory linked in from shared storage: its files count (an edit there reran nothing)."""
    shared = _tree(tmp_path / "shared", "verse")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "linked").symlink_to(shared)
    (shared / "sub" / "loop").symlink_to(shared)  # a loop: each real directory is read once
    before = stat_signature([corpus])
    assert [Path(entry[0]).name for entry in before] == ["f.txt"]
    (shared / "sub" / "f.txt").write_text("verse, edited")
    assert stat_signature([corpus]) != before
