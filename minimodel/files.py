"""Writing files and directories so that nothing already written is lost."""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Iterable


def stat_signature(paths: Iterable[str | os.PathLike]) -> list:
    """[path, size, mtime_ns] of each file and of every file under each directory ([path, None, None] for a missing
    one): it changes when any of them is written, replaced or removed, and costs no read (a corpus may be large)."""
    out = []
    for path in map(Path, paths):
        files = files_under(path) if path.is_dir() else [path]
        for file in files:
            stat = file.stat() if file.exists() else None
            out.append([str(file), stat and stat.st_size, stat and stat.st_mtime_ns])
    return out


def files_under(root: Path) -> list[Path]:
    """Every file under `root`, symlinked directories followed (a corpus linked in from shared storage), each
    real directory once (a link loop ends)."""
    seen, files = set(), []
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subdirectories[:] = []
            continue
        seen.add(real)
        files += [Path(directory) / name for name in names]
    return sorted(f for f in files if f.is_file())


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically: see write_bytes_atomic."""
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | os.PathLike, content: bytes) -> Path:
    """Write `content` to `path` so that readers, a crash or a preemption see the old content or the new, never half:
    a temporary file beside it (one per process: concurrent writers do not clobber each other), fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if something failed
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system or the
    filesystem cannot (e.g. NFS), having changed nothing."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    return renameat2 is not None and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                                               rename_exchange) == 0


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the finished directory `new` (written beside `final`) in place of `final`, so that `final` always holds
    the old or the new directory complete: one atomic exchange where the filesystem can; else the old one is moved
    aside, put back if the new one cannot take its place, and deleted only after the swap."""
    new, final = Path(new), Path(final)
    if final.exists() and _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # holds the old directory now
        return final
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final
