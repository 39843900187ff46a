"""What every stage entry point (pretrain/, adapt/, evaluate/) does around its stage function.

    if __name__ == "__main__":
        paths = run_stage(ReportConfig, report, __doc__, EvaluationError)

Logging set up (progress from minimodel's own loggers on rank 0, warnings from everything), the config read from
`--config file.yaml key.sub=value ...`, the stage run, and the process group (if the stage started one) closed.
The user's own mistakes (a bad config or input, a mismatched model: ConfigError, ManifestError and the stage's
`errors`) end the process with one line on stderr and exit code 2, not a traceback; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, TypeVar

from minimodel.config import ConfigError, parse_cli
from minimodel.manifest import ManifestError
from minimodel.tracking import global_rank

C = TypeVar("C")
R = TypeVar("R")

USER_ERROR_EXIT_CODE = 2


def is_rank0() -> bool:
    return global_rank() == 0


def setup_logging() -> None:
    """INFO from minimodel's loggers on global rank 0 (WARNING on the others), WARNING from libraries."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("minimodel").setLevel(logging.INFO if is_rank0() else logging.WARNING)


def _script_name() -> str:
    """"pretrain/train" for pretrain/train.py: the prefix of error lines."""
    script = Path(sys.argv[0])
    return f"{script.parent.name}/{script.stem}" if script.parent.name else script.stem


def run_stage(config_cls: type[C], stage: Callable[[C], R], description: str,
              *errors: type[Exception]) -> R:
    """Parse the command line into `config_cls`, run `stage(cfg)` and return its result (see the module doc)."""
    setup_logging()
    cfg = parse_cli(config_cls, description=description)
    try:
        result = stage(cfg)
    except (ConfigError, ManifestError, *errors) as e:
        kind = "config error: " if isinstance(e, ConfigError) else ""
        print(f"{_script_name()}: {kind}{e}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
    _destroy_process_group()  # after success only: on an error, another rank may still be in a collective
    return result


def _destroy_process_group() -> None:
    dist = sys.modules.get("torch.distributed")  # not imported by the stage: nothing to close
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
