"""The end of a launch's log (`tail`), and what a test says when a launch it started hangs: the end of the launch's log and the Python stack of every process
in its group (py-spy), taken before the group is killed. A hang otherwise leaves only "timed out after N seconds"."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"


def group_pids(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def tail(log: Path, n: int = 60) -> str:
    """The last `n` lines of a launch's log."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.is_file() else "(no log)"


def describe_hang(pgid: int, log: Path | None = None, log_lines: int = 40) -> str:
    parts = []
    if log is not None:
        parts.append(f"--- the end of {log}\n{tail(log, log_lines)}")
    for pid in group_pids(pgid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
        except OSError:
            continue
        stacks = subprocess.run([str(PY_SPY), "dump", "--pid", str(pid)], capture_output=True, text=True,
                                timeout=60) if PY_SPY.exists() else None
        dump = (stacks.stdout + stacks.stderr) if stacks else "(py-spy is not installed: no stacks)"
        parts.append(f"--- process {pid}: {command}\n{dump}")
    return "\n".join(parts)
