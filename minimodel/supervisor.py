"""The leader of a stage's process group: `python minimodel/supervisor.py <pipeline pid> <command...>` runs the
command and exits as it did (minimodel/stages.py starts every stage under it).

The kernel tells only the leader that the pipeline died (PR_SET_PDEATHSIG); a launcher told so may die without
passing it on (deepspeed's single-node runner does: its launch.py and ranks were left running), and ranks may run in
process groups of their own (torchrun's), so the supervisor sends SIGTERM, the signal a stop of the pipeline sends,
to every process under it. It is their subreaper (PR_SET_CHILD_SUBREAPER): whatever is left under it once the
command has exited (ranks a launcher left behind) gets SIGTERM, then SIGKILL after GRACE_S. A SIGTERM while the
pipeline lives is the pipeline's own stop: the group has it already.

Run by path, not as a module: it imports nothing of minimodel (whose package import loads torch), so each stage's
supervisor costs a bare interpreter.
"""
import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 60


def die_with_parent(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux: PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)
    except (OSError, AttributeError):
        pass


def descendants(root: int | None = None) -> set[int]:
    """The live processes under `root` (default: this one) from Linux's /proc (elsewhere none are known)."""
    parents = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
            if state != "Z":
                parents[int(name)] = int(ppid)
    found, frontier = set(), {os.getpid() if root is None else root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


def signal_all(signum, pids):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def main(pipeline: int, command: list[str]) -> int:
    stopping = 0.0
    early: list[int] = []  # the pipeline's stop for the group, come before the stage existed to get it

    def stop_all(signum=None, frame=None):
        nonlocal stopping
        if signum is not None and child is None:
            early.append(signum)
        if os.getppid() != pipeline and not stopping:  # the pipeline died: stop the stage as its signal would
            stopping = time.monotonic()
            signal_all(signal.SIGTERM, descendants())

    child = None
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans below come to us
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    child = subprocess.Popen(command)
    if early:  # as the group's signal would have reached it
        child.send_signal(signal.SIGTERM)
    stop_all()  # the pipeline may have died before the kernel was told to tell us
    while True:
        try:
            code = child.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:  # stopped, but still running after the grace: killed
            if stopping and time.monotonic() > stopping + GRACE_S:
                signal_all(signal.SIGKILL, descendants())
    left = descendants()
    if left:
        signal_all(signal.SIGTERM, left)
        deadline = time.monotonic() + GRACE_S
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            while True:  # reap the orphans that came to us
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
            left = descendants()
        signal_all(signal.SIGKILL, left)
    return code


if __name__ == "__main__":
    code = main(int(sys.argv[1]), sys.argv[2:])
    if code < 0:  # died of a signal: so does the supervisor, for the pipeline to see
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset (and need none)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)
