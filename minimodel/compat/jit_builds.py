"""Torch C++ extensions that DeepSpeed builds at first use (e.g. `deepspeed_shm_comm`, always built on a CPU
init_distributed): built in this environment, at setup time, and never waited on in silence.

- Where: TORCH_EXTENSIONS_DIR defaults to <virtual environment>/torch_extensions (set when minimodel is imported,
  inherited by every launcher and rank), not torch's ~/.cache default that every clone on the machine shares: an op
  built for another environment's paths is rebuilt, and a build killed there poisons every clone.
- When: scripts/setup.sh builds the ops a run needs here, once (`build_deepspeed_ops`).
- A build killed half-way (Ctrl-C, a test timeout, preemption) leaves torch's lock file (`<dir>/<op>/lock`) behind,
  and torch waits for it to go away forever, printing nothing. `check_build_locks` (before every DeepSpeed start)
  removes a lock no live process holds open, with a warning (torch's builder keeps the lock open while it builds),
  and says which process a live lock belongs to before the wait. On a filesystem other machines share (a cluster's
  venv on NFS, Lustre, ...) a build on another node holds the lock where this node cannot see it: such a lock is
  waited for until it goes, or removed once older than any build (STALE_AFTER_S; torch's own wait never ends).
"""
from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = "lock"  # torch.utils.file_baton.FileBaton's file in each extension's build directory
SHARED_FILESYSTEMS = ("nfs", "lustre", "gpfs", "beegfs", "cifs", "smb", "ceph", "glusterfs", "fuse.")  # type prefixes
STALE_AFTER_S = 3600  # no op builds for an hour: a lock that old on a shared filesystem is a killed build's
POLL_S = 5.0  # how often a lock another node may hold is looked at


def use_environment_dir() -> None:
    """Default TORCH_EXTENSIONS_DIR to this environment's own directory (an explicit setting wins)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def extensions_root() -> Path:
    """The directory torch builds extensions under: <root>/<op name>/."""
    use_environment_dir()
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def _holders(lock: Path) -> list[int] | None:
    """The ids of the processes that hold `lock` open; None if that cannot be told (no /proc)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target, holders = str(lock.resolve()), []
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
        except OSError:  # gone, or another user's: not ours to judge
            continue
    return holders


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the filesystem `path` lies on, from /proc/mounts (or `mounts`, its text); "" if unknown."""
    try:
        mounts = Path("/proc/mounts").read_text() if mounts is None else mounts
    except OSError:
        return ""
    target, best, kind = str(Path(path).resolve()), "", ""
    for fields in (line.split() for line in mounts.splitlines()):
        point = fields[1].replace("\\040", " ") if len(fields) > 2 else None
        if point and (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _command(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def check_build_locks() -> None:
    """Remove the build locks under the extensions directory that no live process holds (a killed build's), and
    say which process a held one waits for. One process checks at a time, so two ranks never both judge a lock."""
    root = extensions_root()
    if not root.is_dir():
        return
    with open(root / ".minimodel-lock-check", "w") as serial:
        fcntl.flock(serial, fcntl.LOCK_EX)
        for lock in sorted(root.glob(f"*/{LOCK}")):
            holders = _holders(lock)
            try:
                stat = lock.stat()
            except FileNotFoundError:  # released meanwhile: a rank loading the op takes the lock for a moment
                continue
            if holders:
                log.warning("waiting for process %s (%s) to finish building the torch extension %s in %s",
                            holders[0], _command(holders[0]), lock.parent.name, lock.parent)
            elif holders is None:
                log.warning("%s exists: if no process is building %s, delete it, or this run waits forever",
                            lock, lock.parent.name)
            else:
                stale_at = stat.st_mtime + STALE_AFTER_S
                if time.time() < stale_at and filesystem_type(lock).startswith(SHARED_FILESYSTEMS):
                    log.warning("%s is on a filesystem other machines share: no process here holds it, so another "
                                "node may be building %s; waiting for it, at most until the lock is %d s old (if no "
                                "build is running, delete it)", lock, lock.parent.name, STALE_AFTER_S)
                    if _gone_by(lock, stat, stale_at):
                        continue
                if stat.st_uid == os.getuid():
                    log.warning("removing %s: a build of %s was killed half-way and left it (no process holds "
                                "it); the extension is built again", lock, lock.parent.name)
                    lock.unlink(missing_ok=True)
                else:
                    log.warning("%s belongs to another user and no process here holds it: if no build of %s is "
                                "running, ask them to delete it, or this run waits forever", lock, lock.parent.name)


def _gone_by(lock: Path, seen: os.stat_result, deadline: float) -> bool:
    """Whether the lock file `seen` goes before `deadline` (a time.time()), looked at every POLL_S; one taken again
    meanwhile (another inode or mtime: a new build's) counts as gone, and is left to torch to wait for."""
    while True:
        try:
            now = lock.stat()
        except FileNotFoundError:
            return True
        if (now.st_ino, now.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
            return True
        if time.time() >= deadline:
            return False
        time.sleep(min(POLL_S, max(0.0, deadline - time.time())))


def build_deepspeed_ops() -> None:
    """Build the ops DeepSpeed's init_distributed builds at first use on this machine's accelerator (none on CUDA:
    NCCL needs none), as DeepSpeed would (deepspeed.comm.torch.build_shm_op)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    check_build_locks()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load()
        print(f"setup: {builder.absolute_name()} built in {extensions_root()}")

