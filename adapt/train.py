"""Step 2: learn target-language token embeddings with the body frozen, over a mini-model or the full model.

    deepspeed [--num_gpus N | --hostfile H] adapt/train.py --config configs/adapt/default.yaml [key=value ...]
    e.g. over=full (standard adaptation), target_lang=sw (one language of the list), train.zero_config=...

Exit status: 0 when every selected language finished, 75 when a signal stopped it after checkpointing (run the same
command again to resume), 1 when a language failed (the others still ran; see <output_dir>/summary.json). The
deepspeed launcher itself exits 143 on a signal and kills the ranks 30 s later: signal the ranks, as the pipeline and
slurm/*.sh do (README, "What survives what").
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("adapt", __doc__)
