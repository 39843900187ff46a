"""Step 1b (MiniPost): an aligned mini-model from a pretrained masked LM (ours or a Hugging Face XLM-R/BERT).

Keeps the source's embeddings and first k layers frozen, adds new layer(s) + an MLM head on top and trains them on
source-language MLM, so the mini-model's output space stays aligned with the source (the primary model).

    python pretrain/minipost.py --config configs/minipost/tiny.yaml [key.sub=value ...]
    deepspeed --num_gpus 8 pretrain/minipost.py --config configs/minipost/xlmr_base.yaml
"""
from minimodel.cli import run_stage
from minimodel.minipost.build import MiniPostError
from minimodel.minipost.train import MiniPostConfig, run_minipost

if __name__ == "__main__":
    result = run_stage(MiniPostConfig, run_minipost, __doc__, MiniPostError)
    if result.mini_dir is not None:
        print(f"mini-model: {result.mini_dir}\nalignment: {result.alignment['end']}")
