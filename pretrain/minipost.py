"""Step 1b (MiniPost): an aligned mini-model from a pretrained masked LM (ours or a Hugging Face XLM-R/BERT).

Keeps the source's embeddings and first k layers frozen, adds new layer(s) + an MLM head on top and trains them on
source-language MLM, so the mini-model's output space stays aligned with the source (the primary model).

    python pretrain/minipost.py --config configs/minipost/tiny.yaml [key.sub=value ...]
    deepspeed --num_gpus 8 pretrain/minipost.py --config configs/minipost/xlmr_base.yaml
"""
import logging
import sys

import torch.distributed as dist

from minimodel.config import ConfigError, parse_cli
from minimodel.manifest import ManifestError
from minimodel.minipost.build import MiniPostError
from minimodel.minipost.train import MiniPostConfig, run_minipost

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("minimodel").setLevel(logging.INFO)
    cfg = parse_cli(MiniPostConfig, description=__doc__)
    try:
        result = run_minipost(cfg)
    except (MiniPostError, ConfigError, ManifestError) as e:
        print(f"minipost: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if result.mini_dir is not None:
        print(f"mini-model: {result.mini_dir}\nalignment: {result.alignment['end']}")
    if dist.is_initialized():
        dist.destroy_process_group()
