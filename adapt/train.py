"""Step 2: learn target-language token embeddings with the body frozen, over a mini-model or the full model.

    deepspeed [--num_gpus N | --hostfile H] adapt/train.py --config configs/adapt/minijoint.yaml [key=value ...]
    e.g. over=full (standard adaptation), target_lang=sw (one language of the list), train.zero_config=...

Exit status: 0 when every selected language finished or was stopped by a signal after checkpointing (run the same
command again to resume), 1 when a language failed (the others still ran; see <output_dir>/summary.json).
"""
from minimodel.adaptation.train import AdaptConfig, run_adaptation
from minimodel.cli import run_stage

if __name__ == "__main__":
    statuses = run_stage(AdaptConfig, run_adaptation, __doc__)
    raise SystemExit(1 if any(s.startswith("failed") for s in statuses.values()) else 0)
