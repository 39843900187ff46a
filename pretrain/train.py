"""Step 1 (MiniJoint): pretrain a masked LM with a secondary MLM head at a middle layer.

    torchrun --nproc-per-node N pretrain/train.py --config configs/pretrain/minijoint_tiny.yaml [key.sub=value ...]

Rerunning the same command resumes from the newest complete checkpoint. On SIGTERM / SIGUSR1 every rank saves a
checkpoint at the next step boundary and exits with code 75 (PREEMPTED_EXIT_CODE).
"""
from minimodel.cli import main

if __name__ == "__main__":  # required: dist_checkpointing starts a spawn-context process that re-imports this file
    main("pretrain", __doc__)
