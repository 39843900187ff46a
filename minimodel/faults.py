"""Deterministic fault injection (tests/test_faults.py): named points in the stage code where a test can stop the
pipeline, as preemption, Ctrl-C or a dead node would, at exactly that moment.

    MINIMODEL_FAULT=<stage kind>.<point>[@<step>]:<TERM|KILL>    e.g. pretrain.checkpoint@10:KILL

At the named point of a stage of that kind (at that step, if given), global rank 0 sends
- TERM: SIGTERM to the pipeline that runs the stage (as Ctrl-C or Slurm would: it passes it on to the stage's process
  group and starts nothing else) and to the stage's group itself, so that this very step is the last one, on every
  rank: training stages checkpoint at its end and exit 75, the others are ended by the signal;
- KILL: SIGKILL to its process group (the stage's launcher and ranks at once, as a dead node; a torchrun rank: its
  own, and torchrun ends the rest), no cleanup: what the stage wrote so far must not be taken for a result.
Unset (always, outside the tests), `point` returns at once.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "MINIMODEL_FAULT"
stage_kind: str | None = None  # set by minimodel.cli.main for the stage this process runs


def _pipeline_pid() -> int | None:
    """The `python -m minimodel.pipeline` process this stage runs under, if any: the nearest such ancestor (a rank
    may be its launcher's child in a session of its own, as torchrun starts them)."""
    pid = os.getppid()
    while pid > 1:
        if b"minimodel.pipeline" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return None


def point(name: str, step: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec or stage_kind is None:
        return
    where, _, how = spec.rpartition(":")
    at, _, at_step = where.partition("@")
    if at != f"{stage_kind}.{name}" or (at_step and int(at_step) != step) or os.environ.get("RANK", "0") != "0":
        return
    os.environ.pop(ENV)  # once: a stage carries on to its step boundary after TERM
    if how == "KILL":
        os.killpg(0, signal.SIGKILL)
    pipeline = _pipeline_pid()
    if pipeline is not None:
        os.kill(pipeline, signal.SIGTERM)
    os.killpg(0, signal.SIGTERM)  # delivered to this process before killpg returns: it stops at this step
