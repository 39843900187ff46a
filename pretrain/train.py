"""Step 1 (MiniJoint): pretrain a masked LM with a secondary MLM head at a middle layer.

    torchrun --nproc-per-node N pretrain/train.py --config configs/pretrain/minijoint_tiny.yaml [key.sub=value ...]

Rerunning the same command resumes from the newest complete checkpoint. On SIGTERM / SIGUSR1 every rank saves a
checkpoint at the next step boundary and exits with code 75 (PREEMPTED_EXIT_CODE).
"""
import logging
import os
import sys

from minimodel.config import ConfigError, parse_cli
from minimodel.training.preemption import PREEMPTED_EXIT_CODE
from minimodel.training.pretrain import PretrainConfig, pretrain

if __name__ == "__main__":  # required: dist_checkpointing.save starts a spawn-context process that re-imports this file
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_cli(PretrainConfig, description=__doc__)
    try:
        result = pretrain(cfg)
    except ConfigError as e:  # found at start-up (data files, vocabulary, layout): the user's input, no traceback
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(PREEMPTED_EXIT_CODE if result.preempted else 0)
