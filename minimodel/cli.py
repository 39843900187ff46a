"""What every stage entry point (pretrain/, adapt/, evaluate/) does around its stage function.

    if __name__ == "__main__":
        main("report", __doc__)      # a kind of minimodel.stages.KINDS

Logging set up (progress from minimodel's own loggers on rank 0, warnings from everything), the config read from
`--config file.yaml key.sub=value ...`, torch's global generator seeded (it starts from a random seed in every
process, so a draw a stage does not seed itself would differ between a run and its rerun), the stage run, its
outputs printed, the process group (if the stage started one) closed, and the stage's status turned into the exit
code: finished 0, interrupted 75 (stopped by a signal after checkpointing: run the same command again to resume;
Slurm requeues), failed 1. The user's own mistakes
(minimodel.errors.UserError: a bad config or input, a mismatched model) end the process with one line on stderr
and exit code 2, not a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import torch

from minimodel.config import ConfigError, parse_cli
from minimodel import distributed, faults
from minimodel.errors import UserError
from minimodel.stages import KINDS, StageResult
from minimodel.training.preemption import Interrupted, ignore_signals, stop_outside_training

C = TypeVar("C")

USER_ERROR_EXIT_CODE = 2


def setup_logging() -> None:
    """INFO from minimodel's loggers on global rank 0 (WARNING on the others), WARNING from libraries."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("minimodel").setLevel(logging.INFO if distributed.is_rank0() else logging.WARNING)


def _script_name() -> str:
    """"pretrain/train" for pretrain/train.py: the prefix of error lines."""
    script = Path(sys.argv[0])
    return f"{script.parent.name}/{script.stem}" if script.parent.name else script.stem


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return " ".join(f"{k}={_format(v)}" for k, v in value.items())
    return str(value)


def run_stage(config_cls: type[C], stage: Callable[[C], StageResult], description: str) -> int:
    """Parse the command line into `config_cls`, run `stage(cfg)`; returns the exit code (see the module doc)."""
    setup_logging()
    cfg = parse_cli(config_cls, description=description)
    torch.manual_seed(0)  # stages seed what they draw from their configs; this covers any draw that they do not
    handled = stop_outside_training()
    try:
        result = stage(cfg)
    except Interrupted as e:  # what it wrote is atomic, its claim unfinished: a rerun resumes or redoes it
        ignore_signals(handled)
        print(f"{_script_name()}: interrupted ({e}, outside training): run the same command again to resume",
              file=sys.stderr)
        distributed.destroy()
        return StageResult("interrupted").exit_code
    except UserError as e:
        kind = "config error: " if isinstance(e, ConfigError) else ""
        print(f"{_script_name()}: {kind}{e}", file=sys.stderr)
        # local teardown (no barrier: another rank may be elsewhere): a process group left up can abort the
        # interpreter's exit in gloo's threads ("terminate called without an active exception"), losing exit code 2
        distributed.destroy()
        return USER_ERROR_EXIT_CODE
    finally:
        ignore_signals(handled)  # the stage is over: a late signal must not turn its outcome into a traceback
    # after a return only (on an error, another rank may still be in a collective): every rank has done its part
    # (rank 0 writes the summaries) before any exits, as a launcher ends the others once one exits with 75
    distributed.barrier()
    distributed.destroy()
    if distributed.is_rank0():
        for name, value in result.outputs.items():
            print(f"{name}: {_format(value)}", flush=True)
        if result.status == "interrupted":
            print(f"{_script_name()}: interrupted: run the same command again to resume", file=sys.stderr)
        elif result.status == "failed":
            print(f"{_script_name()}: failed (see above)", file=sys.stderr)
    return result.exit_code


def main(kind: str, description: str) -> NoReturn:
    """The whole entry point of the stage kind `kind` (minimodel.stages.KINDS)."""
    stage = KINDS[kind]
    faults.stage_kind = kind
    raise SystemExit(run_stage(stage.config_class(), stage.stage_function(), description))
