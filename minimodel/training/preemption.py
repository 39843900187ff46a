"""Slurm preemption: SIGTERM / SIGUSR1 (preemption, `--signal` time-limit warnings) become a flag that the training
loops check at step boundaries, so every rank saves a checkpoint at the same step and exits cleanly."""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from minimodel.supervisor import die_with_parent

PREEMPTED_EXIT_CODE = 75  # sysexits EX_TEMPFAIL, "try again later": requeue the job and it resumes
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def leave_stop_signals_to_the_parent(parent: int) -> None:
    """Initializer of a helper process that a training process (pid `parent`) needs to save its checkpoint: Slurm
    sends the stop signals to every process of the job step, and they are the trainer's to act on. The helper ignores
    them and dies with its parent instead (else, ignoring SIGTERM, it would outlive a killed trainer)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # it died before the kernel was told
        os._exit(1)


# The last stop signal this process received in a PreemptionSignal context: one that came as a training ended is
# not forgotten by the next training in the same process (a stage's next language or phase stops at its first step).
_received: int | None = None


class Interrupted(BaseException):
    """A stop signal came while no training loop was listening: the stage ends as interrupted (exit 75)."""


def stop_outside_training() -> list[int]:
    """Called as a stage starts. A rank under a launcher that must outlive it (slurm/on_node.sh) inherits the stop
    signals ignored: one that came while no training loop listened (data preparation, model loading, between
    languages, the final writes) was lost, and the job ran on to its time limit, unrequeued. Such a signal now
    raises Interrupted there; a training loop's own handler (PreemptionSignal) checkpoints first. Returns the signals
    it handles (ignore_signals gives them back once the stage is over)."""
    handled = [sig for sig in PREEMPTION_SIGNALS if signal.getsignal(sig) == signal.SIG_IGN]
    for sig in handled:
        signal.signal(sig, _interrupt)
    return handled


def ignore_signals(signals: list[int]) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _interrupt(signum, frame) -> None:
    global _received
    _received = signum
    raise Interrupted(signal.Signals(signum).name)


class PreemptionSignal:
    """Context manager recording the last preemption signal received (`received`, None if none; one received in an
    earlier context of this process counts)."""

    SIGNALS = PREEMPTION_SIGNALS

    def __init__(self):
        self.received: int | None = _received
        self._previous: dict = {}

    def __enter__(self) -> "PreemptionSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame) -> None:
        global _received
        self.received = _received = signum

    def vote(self, device: torch.device) -> int:
        """The signal any rank has received (0 if none), the same on every rank: all ranks agree to stop at the
        same step. Collective."""
        flag = torch.tensor([self.received or 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
