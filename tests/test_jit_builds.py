"""minimodel.compat.jit_builds: a torch-extension build killed half-way cannot hang later DeepSpeed processes.

torch's FileBaton leaves an empty `<extensions dir>/<op>/lock` behind when its builder is killed, and every later
build of the op waited for it forever, printing nothing (issue 20, defect 3)."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minimodel.compat import jit_builds
from minimodel.compat.jit_builds import LOCK, check_build_locks, extensions_root

OP = "deepspeed_shm_comm"


def test_minimodel_builds_in_its_own_environment_not_a_cache_every_clone_shares():
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    proc = subprocess.run([sys.executable, "-c", "import os, minimodel; print(os.environ['TORCH_EXTENSIONS_DIR'])"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == str(Path(sys.prefix) / "torch_extensions"), proc.stderr


def test_a_lock_held_by_a_live_build_is_kept_and_its_owner_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / OP / LOCK
    lock.parent.mkdir()
    # a builder as torch's: creates the lock exclusively and keeps it open while it builds
    holder = subprocess.Popen([sys.executable, "-c", f"import os, sys; fd = os.open({str(lock)!r}, "
                               "os.O_CREAT | os.O_EXCL); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level(logging.WARNING, "minimodel.compat.jit_builds"):
            check_build_locks()
        assert lock.exists()
        assert f"waiting for process {holder.pid}" in caplog.text and OP in caplog.text
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_lock_released_while_it_is_checked_is_no_error(tmp_path, monkeypatch, caplog):
    """Every process that loads the op takes its lock for a moment: another rank's may vanish mid-check (seen in CI:
    FileNotFoundError from the check of an adaptation rank)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / OP / LOCK
    lock.parent.mkdir()
    lock.touch()

    def released(found):  # the holder releases the lock right after the check found it
        found.unlink()
        return []

    monkeypatch.setattr(jit_builds, "_holders", released)
    with caplog.at_level(logging.WARNING, "minimodel.compat.jit_builds"):
        check_build_locks()
    assert not lock.exists() and "removing" not in caplog.text


def test_the_filesystem_of_a_path_is_its_longest_mount_point():
    mounts = "/dev/sda1 / ext4 rw 0 0\nserver:/home /home nfs4 rw 0 0\nfs /home/u/my\\040dir lustre rw 0 0\n"
    assert jit_builds.filesystem_type(Path("/home/u/.venv/torch_extensions"), mounts) == "nfs4"
    assert jit_builds.filesystem_type(Path("/home/u/my dir/x"), mounts) == "lustre"
    assert jit_builds.filesystem_type(Path("/homework/x"), mounts) == "ext4"  # not under /home


def test_on_a_shared_filesystem_an_unheld_lock_is_waited_for_until_it_goes_or_is_older_than_any_build(
        tmp_path, monkeypatch, caplog):
    """A cluster's venv on NFS: another node's build holds the lock where this node's /proc cannot see it. The lock
    is waited for while it may be a live build's, then removed: the old check only warned, and torch's own wait for
    a killed build's lock never ended (a whole allocation spent waiting)."""
    import threading
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(jit_builds, "filesystem_type", lambda path: "nfs4")
    monkeypatch.setattr(jit_builds, "POLL_S", 0.05)
    lock = tmp_path / OP / LOCK
    lock.parent.mkdir()
    lock.touch()
    threading.Timer(0.5, lock.unlink).start()  # the other node's build ends
    with caplog.at_level(logging.WARNING, "minimodel.compat.jit_builds"):
        check_build_locks()
    assert not lock.exists() and "another node may be building" in caplog.text and "removing" not in caplog.text
    lock.touch()
    monkeypatch.setattr(jit_builds, "STALE_AFTER_S", 3.0)  # 2.7 s for the timer below to fire first
    threading.Timer(0.3, lambda: (lock.unlink(), lock.touch())).start()  # ... and another node's new build starts
    check_build_locks()
    assert lock.exists() and "removing" not in caplog.text  # the new build's lock: never removed at the old one's age
    lock.unlink()
    lock.touch()  # a killed build's: it never goes
    check_build_locks()  # returns once the lock is older than any build (a hang: CI's timeout)
    assert not lock.exists() and "removing" in caplog.text
    old = time.time() - 60  # already older than any build: removed at once
    lock.touch()
    os.utime(lock, (old, old))
    check_build_locks()
    assert not lock.exists()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_deepspeed_process(tmp_path):
    built = extensions_root() / OP  # built at setup time (scripts/setup.sh)
    if not (built / f"{OP}.so").is_file():
        pytest.skip(f"{built} holds no built {OP}: on this accelerator DeepSpeed builds none")
    ext = tmp_path / "extensions"
    shutil.copytree(built, ext / OP, ignore=shutil.ignore_patterns(LOCK))  # mtimes kept: ninja rebuilds nothing
    lock = ext / OP / LOCK
    lock.touch()  # what a killed FileBaton holder leaves: an empty file that no process holds
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1")
    start = [sys.executable, "-c", "from minimodel import distributed; distributed.initialize_deepspeed(); "
                                   "print('distributed up', flush=True)"]
    try:
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the DeepSpeed process hung on the stale lock {lock}: {e.stderr}")
    assert proc.returncode == 0 and "distributed up" in proc.stdout, proc.stderr[-3000:]
    assert f"removing {lock}: a build of {OP} was killed half-way" in proc.stderr
    assert not lock.exists()
