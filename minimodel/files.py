"""Writing files and directories so that nothing already written is lost."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable


def stat_signature(paths: Iterable[str | os.PathLike]) -> list:
    """[path, size, mtime_ns] of each file and of every file under each directory ([path, None, None] for a missing
    one): it changes when any of them is written, replaced or removed, and costs no read (a corpus may be large)."""
    out = []
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat() if file.exists() else None
            out.append([str(file), stat and stat.st_size, stat and stat.st_mtime_ns])
    return out


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` so that readers, a crash or a preemption see the old content or the new, never half:
    a temporary file beside it (one per process: concurrent writers do not clobber each other), fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if something failed
    return path


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the finished directory `new` (written beside `final`) in place of `final`. The old `final`, if any, is
    first moved aside and deleted only after the swap, so a crash leaves the old or the new directory complete."""
    new, final = Path(new), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
