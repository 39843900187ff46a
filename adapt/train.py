"""Step 2: learn target-language token embeddings with the body frozen, over a mini-model or the full model.

    deepspeed [--num_gpus N | --hostfile H] adapt/train.py --config configs/adapt/minijoint.yaml [key=value ...]
    e.g. over=full (standard adaptation), target_lang=sw (one language of the list), train.zero_config=...

Exit status: 0 when every selected language finished or was stopped by a signal after checkpointing (run the same
command again to resume), 1 when a language failed (the others still ran; see <output_dir>/summary.json).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain script run from anywhere

from minimodel.adaptation.train import AdaptConfig, run_adaptation  # noqa: E402
from minimodel.config import parse_cli  # noqa: E402


def main() -> int:
    import torch.distributed as dist

    cfg = parse_cli(AdaptConfig, description=__doc__)
    statuses = run_adaptation(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if any(s.startswith("failed") for s in statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
