"""Step 1b (MiniPost): an aligned mini-model from a pretrained masked LM (ours or a Hugging Face XLM-R/BERT).

Keeps the source's embeddings and first k layers frozen, adds new layer(s) + an MLM head on top and trains them on
source-language MLM, so the mini-model's output space stays aligned with the source (the primary model).

    python pretrain/minipost.py --config configs/minipost/tiny.yaml [key.sub=value ...]
    deepspeed --num_gpus 8 pretrain/minipost.py --config configs/minipost/xlmr_base.yaml

Rerunning the same command resumes; on SIGTERM / SIGUSR1 it checkpoints and exits with code 75 (requeue).
"""
from minimodel.cli import main

if __name__ == "__main__":
    main("minipost", __doc__)
